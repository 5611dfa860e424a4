"""reshard: split LLM safetensors checkpoints for tensor parallelism, and merge them back bit for bit."""

from reshard.config import ModelConfig, TPConfig
from reshard.errors import InputError, OutputError, PlanError, ReshardError, RulesError, UsageError
from reshard.merge import merge
from reshard.plan import Plan, TensorCut, build_plan, make_plan
from reshard.split import split
from reshard.verify import verify

__version__ = "0.1.0"

__all__ = [
    "InputError",
    "ModelConfig",
    "OutputError",
    "Plan",
    "PlanError",
    "ReshardError",
    "RulesError",
    "TPConfig",
    "TensorCut",
    "UsageError",
    "build_plan",
    "make_plan",
    "merge",
    "split",
    "verify",
]

"""reshard: split LLM safetensors checkpoints for tensor parallelism, and merge them back bit for bit."""

from reshard.config import ModelConfig, TPConfig
from reshard.errors import InputError, OutputError, PlanError, ReshardError, RulesError, UsageError
from reshard.merge import merge
from reshard.plan import Plan, TensorCut, build_plan, make_plan
from reshard.split import split
from reshard.verify import verify

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # load_rank needs torch, which reshard itself does not: imported on first use.
    if name == "load_rank":
        from reshard.runtime import load_rank

        return load_rank
    raise AttributeError(f"module 'reshard' has no attribute {name!r}")


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
    "load_rank",
    "make_plan",
    "merge",
    "split",
    "verify",
]

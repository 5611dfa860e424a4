"""reshard: split LLM safetensors checkpoints for tensor parallelism, and merge them back bit for bit.

The package runs one way, stage by stage: model (config, rules) -> plan (each tensor's cut, the range walk) ->
formats (safetensors, split folders) -> engine (split, merge, verify) and runtime (load_rank, communicator,
forward check) -> report and cli. A lower stage never imports a higher one.
"""

from reshard.engine.merge import merge
from reshard.engine.planning import make_plan
from reshard.engine.split import split
from reshard.engine.verify import verify
from reshard.errors import InputError, OutputError, PlanError, ReshardError, RulesError, UsageError
from reshard.model.config import ModelConfig, TPConfig
from reshard.plan.build import build_plan
from reshard.plan.cut import Plan, TensorCut
from reshard.runtime.load import load_rank
from reshard.version import __version__

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
    "__version__",
    "build_plan",
    "load_rank",
    "make_plan",
    "merge",
    "split",
    "verify",
]

"""reshard: split LLM safetensors checkpoints for tensor parallelism, and merge them back bit for bit.

The package runs one way, stage by stage: model (config, rules) -> plan (each tensor's cut, the range walk) ->
formats (safetensors, split folders) -> engine (split, merge, verify) and runtime (load_rank, communicator,
forward check) -> report and cli. A lower stage never imports a higher one.

The public names below are imported when first used, so `import reshard` (and `reshard --version`) stays as
quick as a Python start.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from reshard.errors import InputError, OutputError, PlanError, ReshardError, RulesError, UsageError
from reshard.version import __version__

if TYPE_CHECKING:
    from reshard.engine.merge import merge
    from reshard.engine.planning import make_plan
    from reshard.engine.split import split
    from reshard.engine.verify import verify
    from reshard.formats.hub import locate_model
    from reshard.model.config import ModelConfig, TPConfig
    from reshard.plan.build import build_plan
    from reshard.plan.cut import Plan, TensorCut
    from reshard.runtime.load import load_rank

# Where each public name lives.
_LAZY = {
    "merge": "reshard.engine.merge",
    "make_plan": "reshard.engine.planning",
    "split": "reshard.engine.split",
    "verify": "reshard.engine.verify",
    "locate_model": "reshard.formats.hub",
    "ModelConfig": "reshard.model.config",
    "TPConfig": "reshard.model.config",
    "build_plan": "reshard.plan.build",
    "Plan": "reshard.plan.cut",
    "TensorCut": "reshard.plan.cut",
    "load_rank": "reshard.runtime.load",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'reshard' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


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
    "locate_model",
    "make_plan",
    "merge",
    "split",
    "verify",
]

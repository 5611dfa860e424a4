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

from reshard.errors import InputError, OutputError, PlanError, Problem, ReshardError, RulesError, UsageError
from reshard.version import __version__

if TYPE_CHECKING:
    from reshard.engine.merge import MergeResult, merge
    from reshard.engine.planning import Planned, make_plan
    from reshard.engine.split import SplitResult, split
    from reshard.engine.verify import VerifyReport, verify
    from reshard.formats.hub import locate_model
    from reshard.formats.names import CHECKSUMS, DEFAULT_CHECKSUM
    from reshard.model.config import ModelConfig, TPConfig, parse_size, resolve_tp
    from reshard.model.rules import Family, builtin_families
    from reshard.plan.build import build_plan
    from reshard.plan.cut import Plan, TensorCut
    from reshard.runtime.forward import KindError, run_forward
    from reshard.runtime.load import load_rank

# Where each public name lives.
_LAZY = {
    "merge": "reshard.engine.merge",
    "MergeResult": "reshard.engine.merge",
    "make_plan": "reshard.engine.planning",
    "Planned": "reshard.engine.planning",
    "split": "reshard.engine.split",
    "SplitResult": "reshard.engine.split",
    "verify": "reshard.engine.verify",
    "VerifyReport": "reshard.engine.verify",
    "locate_model": "reshard.formats.hub",
    "CHECKSUMS": "reshard.formats.names",
    "DEFAULT_CHECKSUM": "reshard.formats.names",
    "ModelConfig": "reshard.model.config",
    "TPConfig": "reshard.model.config",
    "parse_size": "reshard.model.config",
    "resolve_tp": "reshard.model.config",
    "Family": "reshard.model.rules",
    "builtin_families": "reshard.model.rules",
    "build_plan": "reshard.plan.build",
    "Plan": "reshard.plan.cut",
    "TensorCut": "reshard.plan.cut",
    "KindError": "reshard.runtime.forward",
    "run_forward": "reshard.runtime.forward",
    "load_rank": "reshard.runtime.load",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'reshard' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "CHECKSUMS",
    "DEFAULT_CHECKSUM",
    "Family",
    "InputError",
    "KindError",
    "MergeResult",
    "ModelConfig",
    "OutputError",
    "Plan",
    "PlanError",
    "Planned",
    "Problem",
    "ReshardError",
    "RulesError",
    "SplitResult",
    "TPConfig",
    "TensorCut",
    "UsageError",
    "VerifyReport",
    "__version__",
    "build_plan",
    "builtin_families",
    "load_rank",
    "locate_model",
    "make_plan",
    "merge",
    "parse_size",
    "resolve_tp",
    "run_forward",
    "split",
    "verify",
]

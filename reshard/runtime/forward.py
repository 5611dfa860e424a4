"""`reshard verify --forward`: run every sharded weight the way a tensor-parallel engine runs it and compare.

The cuts are not taken from the manifest: they are derived again from the source config and the rules, and a
manifest (or rank file) that disagrees fails, naming the tensor. Then tp processes each load their own rank with
`load_rank`, multiply every sharded weight by the same random input and combine the partial results with the
communicator: an all-gather for column-parallel weights, an all-reduce for row-parallel ones, and for
vocabulary-parallel embeddings a masked lookup (rows this rank does not hold give zeros) that is all-reduced.
Each result is compared with the product of the full weight: the source checkpoint's when it is given, which
catches any rank holding the wrong bytes; otherwise the weight rebuilt from the rank files, which catches ranks
that disagree with each other (a kv-head replica that differs from its original) and results combined in the
wrong order. Needs torch (the torch extra: `pip install -e ".[torch]"`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reshard.errors import CheckFailed, InputError, UsageError, shown
from reshard.formats.checkpoint import open_checkpoint
from reshard.formats.io import Reorder
from reshard.formats.names import MANIFEST_NAME
from reshard.formats.split_folder import SplitFolder
from reshard.model.rules import builtin_families, read_rules
from reshard.plan.build import first_difference
from reshard.plan.cut import TensorCut, coverage, rank_spans
from reshard.runtime.load import load_rank, piece

if TYPE_CHECKING:
    import torch

    from reshard.runtime.parallel import Communicator

BATCH = 4


@dataclass(frozen=True)
class KindError:
    """The worst relative error over the tensors of one kind (the rule that cut them)."""

    kind: str
    how: str  # all-gather, all-reduce, masked lookup, or copy (replicated)
    tensors: int
    worst: float
    worst_tensor: str


def expected_cuts(folder: SplitFolder, *, rules: Path | None = None) -> tuple[TensorCut, ...]:
    """Every tensor's cut as the built-in rules of the manifest's family (or the rules file given) cut it for
    the recorded config, checked against the manifest's: a split made with a rule the model does not run with
    fails here, naming the tensor."""
    manifest, where = folder.manifest, folder.path / MANIFEST_NAME
    given = read_rules(rules) if rules is not None else None
    if given is None and manifest.family not in builtin_families():
        given = manifest.rules  # a family of its own: its recorded rules are all there is to go by
    plan = folder.replan(rules=given)
    found = first_difference(manifest.tensors, plan.tensors)
    if found is not None:
        recorded, derived = found
        raise InputError(
            f"{where}: tensor {shown(recorded.name)} is {recorded.describe()}, but the {manifest.family} rules cut it "
            f"{derived.describe()}; split again (or pass the rules it was split with, --rules FILE)"
        )
    return plan.tensors


def run_rank(
    split_dir: Path, comm: Communicator, *, device: str | None = None, source: Path | None = None, rules: Path | None = None
) -> list[KindError]:
    """This rank's part of the check. Every rank runs its share of each product; rank 0 alone reads the reference
    weights and measures the errors (the others return no errors), so the model is read once, not once per rank."""
    import torch

    folder = SplitFolder(split_dir).require(purpose="--forward")
    if comm.world_size != folder.tp:
        raise UsageError(f"{folder.path} is split for tp {folder.tp}, but {comm.world_size} processes were started")
    cuts = expected_cuts(folder, rules=rules)
    weights = load_rank(folder.path, comm.rank, device=device)
    zeroed = [folder.zeroed(r) for r in range(folder.tp)]  # what an engine layout keeps on rank 0 alone
    place = next(iter(weights.values())).device if weights else torch.device("cpu")
    errors: dict[str, list[tuple[float, str, str]]] = {}
    with ExitStack() as stack:
        full = _references(folder, source, stack) if comm.rank == 0 else None
        for index, cut in enumerate(cuts):
            reference = full(cut).to(place) if full is not None else None
            generator = torch.Generator(device="cpu").manual_seed(index)
            held_as_zeros = {r for r, names in enumerate(zeroed) if cut.name in names}
            how, error = _check(cut, weights[cut.name], reference, comm, generator, held_as_zeros)
            errors.setdefault(cut.rule or cut.style, []).append((error, cut.name, how))
    if comm.rank != 0:
        return []
    return [KindError(kind, found[0][2], len(found), *max((e, n) for e, n, _ in found)) for kind, found in errors.items()]


def _references(folder: SplitFolder, source: Path | None, stack: ExitStack) -> Any:
    """A function giving each tensor's full weight: the source's, or rebuilt from the rank files."""
    from safetensors import safe_open

    if source is not None:
        handles: dict[str, Any] = {}
        for f in open_checkpoint(source).files:
            handle = stack.enter_context(safe_open(str(f.path), framework="pt", device="cpu"))
            handles |= {t.name: handle for t in f.tensors}

        def original(cut: TensorCut) -> torch.Tensor:
            if cut.name not in handles:
                raise UsageError(f"{source}: has no tensor {cut.name}; pass the checkpoint this folder was split from")
            return handles[cut.name].get_tensor(cut.name)

        return original
    ranks = [
        {name: stack.enter_context(safe_open(str(folder.path / name), framework="pt", device="cpu")) for name in files}
        for files in folder.manifest.rank_files
    ]
    layout, tensors = folder.manifest.layout, folder.manifest.tensors
    places = [layout.placements(tensors, r) for r in range(folder.tp)]
    reorders = [layout.reorders(tensors, r) for r in range(folder.tp)]
    return lambda cut: _rebuilt(cut, ranks, places, reorders)


def _rebuilt(
    cut: TensorCut,
    ranks: Sequence[Mapping[str, Any]],
    places: Sequence[Mapping[str, tuple[str, int]]],
    reorders: Sequence[Mapping[str, Reorder]],
) -> torch.Tensor:
    """The unsharded tensor, rebuilt from the rank files as merge would, without the merge engine."""
    import torch

    def rank_tensor(rank: int) -> torch.Tensor:
        name, offset = places[rank][cut.name]
        handle = next(h for h in ranks[rank].values() if name in h.keys())
        return piece(handle.get_tensor(name), offset, cut.rank_shape(rank), reorder=reorders[rank].get(cut.name))

    if cut.dim is None:
        return rank_tensor(0)
    pieces = [rank_tensor(p.rank).narrow(cut.dim, p.at, p.stop - p.start) for p in coverage(cut)]
    return torch.cat(pieces, dim=cut.dim)


def _expected_slice(cut: TensorCut, full: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """What rank `rank`'s slice of `full` along `dim` must be: its spans in order, zeros for padding."""
    import torch

    parts = []
    for s in rank_spans(cut, rank):
        if s.zeros:
            shape = list(full.shape)
            shape[dim] = s.length
            parts.append(torch.zeros(shape, dtype=full.dtype, device=full.device))
        else:
            parts.append(full.narrow(dim, s.start, s.length))
    return torch.cat(parts, dim=dim)


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| over the finite results; a result finite on one side only is an infinite error.

    Weights holding NaN or infinities (random bit patterns, a broken checkpoint) give non-finite products on
    both sides in the same places, which agree."""
    import torch

    got, want = got.double(), want.double()
    finite = torch.isfinite(want)
    if not torch.equal(finite, torch.isfinite(got)):
        return float("inf")
    scale = torch.linalg.vector_norm(want[finite])
    diff = torch.linalg.vector_norm(got[finite] - want[finite])
    return float(diff) if scale == 0 else float(diff / scale)


def _check(
    cut: TensorCut,
    local: torch.Tensor,
    full: torch.Tensor | None,
    comm: Communicator,
    generator: torch.Generator,
    zeroed: set[int] | None = None,
) -> tuple[str, float]:
    """Run one tensor's share on this rank and combine; on rank 0 (`full` given) also measure the error. The ranks
    in `zeroed` hold a replicated tensor as zeros (the engine adds it on rank 0 alone)."""
    if not (local.is_floating_point() and local.dim() in (1, 2) and cut.dim is not None):
        return "copy", _check_bytes(cut, local, full, comm, zeroed or set())
    if cut.style == "vocab" and local.dim() == 2 and cut.dim == 0:
        return "masked lookup", _check_lookup(cut, local, full, comm, generator)
    if local.dim() == 1:
        return "all-gather", _check_bias(cut, local, full, comm)
    if cut.style in ("colwise", "vocab"):
        return "all-gather", _check_colwise(cut, local, full, comm, generator)
    return "all-reduce", _check_rowwise(cut, local, full, comm, generator)


def _check_bytes(cut: TensorCut, local: torch.Tensor, full: torch.Tensor | None, comm: Communicator, zeroed: set[int]) -> float:
    """Replicated tensors, integer or packed data: rank 0 checks every rank's bytes against its slice (zeros on the
    ranks in `zeroed`)."""
    import torch

    tp = comm.world_size
    mine = local.reshape(-1).view(torch.uint8)  # 1-D first: a 0-d scalar cannot change its element size
    gathered = torch.empty(tp * mine.numel(), dtype=torch.uint8, device=local.device)
    comm.all_gather(mine, gathered, dim=0)
    if full is None:
        return 0.0
    wants = [full if cut.dim is None else _expected_slice(cut, full, r, cut.dim) for r in range(tp)]
    wants = [torch.zeros_like(w) if r in zeroed else w for r, w in enumerate(wants)]
    want = torch.cat([w.reshape(-1).view(torch.uint8) for w in wants])
    return 0.0 if torch.equal(gathered, want) else 1.0


def _check_lookup(cut: TensorCut, local: torch.Tensor, full: torch.Tensor | None, comm: Communicator, generator: torch.Generator) -> float:
    """Vocabulary-parallel lookup: each rank answers the ids in its rows, zeros elsewhere; the sum is the lookup."""
    import torch

    weight = local.float()
    ids = torch.randint(0, cut.shape[0], (BATCH * 4,), generator=generator).to(local.device)
    out = torch.zeros(ids.shape[0], weight.shape[1], device=local.device)
    for s in rank_spans(cut, comm.rank):
        if not s.zeros:
            mine = (ids >= s.start) & (ids < s.stop)
            out[mine] = weight[ids[mine] - s.start + s.at]
    comm.all_reduce_sum(out)
    return _relative(out, full.float()[ids]) if full is not None else 0.0


def _check_bias(cut: TensorCut, local: torch.Tensor, full: torch.Tensor | None, comm: Communicator) -> float:
    """A bias cut with its rows: gathered, it is every rank's slice in rank order."""
    import torch

    gathered = torch.empty(comm.world_size * local.shape[0], device=local.device)
    comm.all_gather(local.float(), gathered, dim=0)
    if full is None:
        return 0.0
    return _relative(gathered, torch.cat([_expected_slice(cut, full.float(), r, 0) for r in range(comm.world_size)]))


def _dims(cut: TensorCut) -> tuple[int, int]:
    """(out, in) dims of a 2-D weight: nn.Linear stores [out, in] (x @ W.T); GPT-2's Conv1D stores [in, out]."""
    dim = cut.dim or 0
    out_dim = dim if cut.style in ("colwise", "vocab") else 1 - dim
    return out_dim, 1 - out_dim


def _product(x: torch.Tensor, w: torch.Tensor, out_dim: int) -> torch.Tensor:
    return x @ (w.T if out_dim == 0 else w)


def _check_colwise(cut: TensorCut, local: torch.Tensor, full: torch.Tensor | None, comm: Communicator, generator: torch.Generator) -> float:
    """Column-parallel: each rank computes its outputs; gathered in rank order they are the full product's slices."""
    import torch

    out_dim, in_dim = _dims(cut)
    x = torch.randn(BATCH, cut.shape[in_dim], generator=generator).to(local.device)
    mine = _product(x, local.float(), out_dim)
    gathered = torch.empty(BATCH, comm.world_size * mine.shape[1], device=local.device)
    comm.all_gather(mine, gathered, dim=1)
    if full is None:
        return 0.0
    reference = _product(x, full.float(), out_dim)
    return _relative(gathered, torch.cat([_expected_slice(cut, reference, r, 1) for r in range(comm.world_size)], dim=1))


def _check_rowwise(cut: TensorCut, local: torch.Tensor, full: torch.Tensor | None, comm: Communicator, generator: torch.Generator) -> float:
    """Row-parallel: each rank multiplies its columns of x by its rows of W; the sum is the product."""
    import torch

    out_dim, in_dim = _dims(cut)
    x = torch.randn(BATCH, cut.shape[in_dim], generator=generator).to(local.device)
    partial = _product(_expected_slice(cut, x, comm.rank, 1), local.float(), out_dim)
    comm.all_reduce_sum(partial)
    return _relative(partial, _product(x, full.float(), out_dim)) if full is not None else 0.0


@dataclass(frozen=True)
class _Options:
    """What every rank process is asked to do."""

    device: str | None
    source: Path | None
    rules: Path | None

    def run(self, split_dir: Path, comm: Communicator) -> list[KindError]:
        return run_rank(split_dir, comm, device=self.device, source=self.source, rules=self.rules)


def _worker(rank: int, split_dir: str, init: str, backend: str, options: _Options, results: Any) -> None:
    from reshard.runtime.parallel import TorchDistributed

    comm = TorchDistributed.start(rank, results["tp"], init, backend=backend)
    try:
        found = options.run(Path(split_dir), comm)
        if rank == 0:
            results["errors"] = found
    finally:
        comm.close()


def run_forward(split_dir: Path, *, device: str | None = None, source: Path | None = None, rules: Path | None = None) -> list[KindError]:
    """Start one process per rank (or, under torchrun, be one of them) and return the errors per kind."""
    import torch

    folder = SplitFolder(split_dir).require(purpose="--forward")
    expected_cuts(folder, rules=rules)  # a manifest the rules disagree with fails here, before any process starts
    # On GPUs each rank goes on its manifest device and talks over NCCL; without CUDA, on the CPU over gloo.
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    backend = "nccl" if cuda else "gloo"
    options = _Options(device if device is not None else (None if cuda else "cpu"), source, rules)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        from reshard.runtime.parallel import TorchDistributed

        comm = TorchDistributed.from_env(backend=backend)
        try:
            return options.run(folder.path, comm)
        finally:
            comm.close()
    return _spawn(folder, backend, options)


def _spawn(folder: SplitFolder, backend: str, options: _Options) -> list[KindError]:
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    with context.Manager() as manager, tempfile.TemporaryDirectory(prefix="reshard-forward-") as scratch:
        results: Any = manager.dict(tp=folder.tp)
        init = f"file://{Path(scratch) / 'rendezvous'}"
        try:
            mp.start_processes(_worker, args=(str(folder.path), init, backend, options, results), nprocs=folder.tp, start_method="spawn")
        except mp.ProcessRaisedException as e:
            # The child's traceback ends with its error: that line is what the user needs.
            last = str(e).strip().splitlines()[-1]
            raise CheckFailed([f"--forward: a rank process failed: {last.split(': ', 1)[-1]}"]) from e
        except mp.ProcessExitedException as e:
            raise CheckFailed([f"--forward: a rank process died ({e}); run again with RESHARD_DEBUG=1"]) from e
        errors: list[KindError] = list(results["errors"])
        return errors

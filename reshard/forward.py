"""`reshard verify --forward`: run every sharded weight the way a tensor-parallel engine runs it and compare.

tp processes each load their own rank with `load_rank`, multiply every sharded weight by the same random input
and combine the partial results with the communicator: an all-gather for column-parallel weights, an all-reduce
for row-parallel ones, and for vocabulary-parallel embeddings a masked lookup (rows this rank does not hold give
zeros) that is all-reduced. Each result is compared with the product of the full weight: the source checkpoint's
when it is given, which catches any rank holding the wrong bytes; otherwise the weight rebuilt from the rank
files, which catches ranks that disagree with each other (a kv-head replica that differs from its original) and
results combined in the wrong order. Needs torch (`pip install reshard[torch]`).
"""

from __future__ import annotations

import os
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from reshard.checkpoint import open_checkpoint
from reshard.errors import ReshardError, UsageError
from reshard.manifest import Manifest, read_manifest
from reshard.split_folder import coverage, require_all_ranks
from reshard.plan import TensorCut

if TYPE_CHECKING:
    import torch

    from reshard.parallel import Communicator

BATCH = 4
TOLERANCE = 1e-5


@dataclass(frozen=True)
class KindError:
    """The worst relative error over the tensors of one kind (the rule that cut them)."""

    kind: str
    how: str  # all-gather, all-reduce, masked lookup, or copy (replicated)
    tensors: int
    worst: float
    worst_tensor: str


def run_rank(split_dir: Path, comm: Communicator, device: str | None = None, source: Path | None = None) -> list[KindError]:
    """This rank's part of the check. Every rank runs its share of each product; rank 0 alone reads the reference
    weights and measures the errors (the others return no errors), so the model is read once, not once per rank."""
    import torch
    from safetensors import safe_open

    from reshard.runtime import load_rank

    split_dir = Path(split_dir)
    manifest = read_manifest(split_dir)
    require_all_ranks(split_dir, manifest, "--forward")
    if comm.world_size != manifest.tp_config.tp:
        raise UsageError(f"{split_dir} is split for tp {manifest.tp_config.tp}, but {comm.world_size} processes were started")
    rank = comm.rank
    weights = load_rank(split_dir, rank, device=device)
    place = next(iter(weights.values())).device if weights else torch.device("cpu")
    lead = rank == 0
    errors: dict[str, list[tuple[float, str, str]]] = {}
    with ExitStack() as stack:
        handles = [
            {name: stack.enter_context(safe_open(str(split_dir / name), framework="pt", device="cpu")) for name in files}
            for files in (manifest.rank_files if lead else ())
        ]
        originals = {}
        if source is not None and lead:
            for f in open_checkpoint(source).files:
                handle = stack.enter_context(safe_open(str(f.path), framework="pt", device="cpu"))
                originals |= {t.name: handle for t in f.tensors}
        for index, cut in enumerate(manifest.tensors):
            full = None
            if lead:
                if source is not None and cut.name not in originals:
                    raise UsageError(f"{source}: has no tensor {cut.name}; pass the checkpoint this folder was split from")
                full = (originals[cut.name].get_tensor(cut.name) if source is not None else _full_tensor(cut, handles)).to(place)
            generator = torch.Generator(device="cpu").manual_seed(index)
            how, error = _check(cut, weights[cut.name], full, rank, comm, generator)
            errors.setdefault(cut.rule or cut.style, []).append((error, cut.name, how))
    if not lead:
        return []
    return [
        KindError(kind, found[0][2], len(found), *max((e, n) for e, n, _ in found))
        for kind, found in errors.items()
    ]


def _full_tensor(cut: TensorCut, handles: list[dict[str, object]]) -> torch.Tensor:
    """The unsharded tensor, rebuilt from the rank files as merge would, without the merge engine."""
    import torch

    def rank_tensor(rank: int) -> torch.Tensor:
        for handle in handles[rank].values():
            if cut.name in handle.keys():  # type: ignore[attr-defined]
                return handle.get_tensor(cut.name)  # type: ignore[attr-defined]
        raise UsageError(f"rank {rank} has no tensor {cut.name}; verify the folder's checksums first")

    if cut.dim is None:
        return rank_tensor(0)
    pieces = [rank_tensor(r).narrow(cut.dim, pos, b - a) for a, b, r, pos in coverage(cut)]
    return torch.cat(pieces, dim=cut.dim)


def _expected_slices(cut: TensorCut, full: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """What rank `rank`'s slice of `full` along `dim` must be: its ranges in order, zero padding past the end."""
    import torch

    length = full.shape[dim]
    parts = []
    for a, b in cut.slices[rank]:
        if a < length:
            parts.append(full.narrow(dim, a, min(b, length) - a))
        if b > length:
            shape = list(full.shape)
            shape[dim] = b - max(a, length)
            parts.append(torch.zeros(shape, dtype=full.dtype, device=full.device))
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
    if scale == 0:
        return float(diff)
    return float(diff / scale)


def _check(
    cut: TensorCut, local: torch.Tensor, full: torch.Tensor | None, rank: int, comm: Communicator, generator: torch.Generator
) -> tuple[str, float]:
    """Run one tensor's share on this rank and combine; on rank 0 (`full` given) also measure the error."""
    import torch

    tp = comm.world_size
    numeric = local.is_floating_point() and local.dim() in (1, 2) and cut.dim is not None
    if not numeric:
        # Replicated tensors, integer or packed data: rank 0 checks every rank's bytes against its slice.
        mine = local.reshape(-1).view(torch.uint8)  # 1-D first: a 0-d scalar cannot change its element size
        gathered = torch.empty(tp * mine.numel(), dtype=torch.uint8, device=local.device)
        comm.all_gather(mine, gathered, dim=0)
        if full is None:
            return "copy", 0.0
        wants = [full if cut.dim is None else _expected_slices(cut, full, r, cut.dim) for r in range(tp)]
        want = torch.cat([w.reshape(-1).view(torch.uint8) for w in wants])
        return "copy", 0.0 if torch.equal(gathered, want) else 1.0
    w_local = local.float()
    w_full = full.float() if full is not None else None
    if cut.style == "vocab" and local.dim() == 2 and cut.dim == 0:
        # Vocabulary-parallel lookup: each rank answers the ids in its rows, zeros elsewhere; the sum is the lookup.
        vocab = cut.shape[0]
        ids = torch.randint(0, vocab, (BATCH * 4,), generator=generator).to(local.device)
        out = torch.zeros(ids.shape[0], w_local.shape[1], device=local.device)
        at = 0
        for a, b in cut.slices[rank]:
            mine = (ids >= a) & (ids < b)
            out[mine] = w_local[ids[mine] - a + at]
            at += b - a
        comm.all_reduce_sum(out)
        return "masked lookup", _relative(out, w_full[ids]) if w_full is not None else 0.0
    if local.dim() == 1:
        # A bias cut with its rows: gathered, it is every rank's slice in rank order.
        gathered = torch.empty(tp * local.shape[0], device=local.device)
        comm.all_gather(w_local, gathered, dim=0)
        if w_full is None:
            return "all-gather", 0.0
        want = torch.cat([_expected_slices(cut, w_full, r, 0) for r in range(tp)])
        return "all-gather", _relative(gathered, want)
    # A 2-D weight: nn.Linear stores [out, in] and is used as x @ W.T; GPT-2's Conv1D stores [in, out].
    out_dim = cut.dim if cut.style in ("colwise", "vocab") else 1 - cut.dim
    in_dim = 1 - out_dim

    def product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x @ (w.T if out_dim == 0 else w)

    x = torch.randn(BATCH, cut.shape[in_dim], generator=generator).to(local.device)
    reference = product(x, w_full) if w_full is not None else None
    if cut.style in ("colwise", "vocab"):
        mine = product(x, w_local)
        gathered = torch.empty(BATCH, tp * mine.shape[1], device=local.device)
        comm.all_gather(mine, gathered, dim=1)
        if reference is None:
            return "all-gather", 0.0
        want = torch.cat([_expected_slices(cut, reference, r, 1) for r in range(tp)], dim=1)
        return "all-gather", _relative(gathered, want)
    # Row-parallel: each rank multiplies its columns of x by its rows of W; the sum is the product.
    x_mine = torch.cat([x[:, a:b] for a, b in cut.slices[rank]], dim=1)
    partial = product(x_mine, w_local)
    comm.all_reduce_sum(partial)
    return "all-reduce", _relative(partial, reference) if reference is not None else 0.0


def _worker(rank: int, split_dir: str, init: str, backend: str, device: str | None, source: str | None, results: dict) -> None:
    from reshard.parallel import TorchDistributed

    comm = TorchDistributed.start(rank, results["tp"], init, backend=backend)
    try:
        found = run_rank(Path(split_dir), comm, device, Path(source) if source else None)
        if rank == 0:
            results["errors"] = found
    finally:
        comm.close()


def run_forward(split_dir: Path, device: str | None = None, source: Path | None = None) -> list[KindError]:
    """Start one process per rank (or, under torchrun, be one of them) and return the errors per kind."""
    import torch

    split_dir = Path(split_dir)
    manifest = read_manifest(split_dir)
    # On GPUs each rank goes on its manifest device and talks over NCCL; without CUDA, on the CPU over gloo.
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    backend = "nccl" if cuda else "gloo"
    place = device if device is not None else (None if cuda else "cpu")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        from reshard.parallel import TorchDistributed

        comm = TorchDistributed.from_env(backend)
        try:
            return run_rank(split_dir, comm, place, source)
        finally:
            comm.close()
    context = torch.multiprocessing.get_context("spawn")
    with context.Manager() as manager, tempfile.TemporaryDirectory(prefix="reshard-forward-") as scratch:
        results = manager.dict(tp=manifest.tp_config.tp)
        try:
            torch.multiprocessing.start_processes(
                _worker,
                args=(str(split_dir), f"file://{Path(scratch) / 'rendezvous'}", backend, place, str(source) if source else None, results),
                nprocs=manifest.tp_config.tp,
                start_method="spawn",
            )
        except torch.multiprocessing.ProcessRaisedException as e:
            # The child's traceback ends with its error: that line is what the user needs.
            last = str(e).strip().splitlines()[-1]
            raise ReshardError(f"--forward: a rank process failed: {last.split(': ', 1)[-1]}") from e
        except torch.multiprocessing.ProcessExitedException as e:
            raise ReshardError(f"--forward: a rank process died ({e}); run again with RESHARD_DEBUG=1") from e
        return list(results["errors"])


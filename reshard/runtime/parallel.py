"""How ranks talk: the communicator of the tensor-parallel runtime, over torch.distributed, plus a single-device
stand-in for tp 1. Needs torch (the torch extra: `pip install -e ".[torch]"`), imported when a communicator is made.

Every operation is collective: all ranks of the group call it, in the same order.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol

from reshard.errors import UsageError

if TYPE_CHECKING:
    import torch


class Communicator(Protocol):
    """What a rank needs from its peers to run a sharded model."""

    @property
    def world_size(self) -> int: ...

    @property
    def rank(self) -> int: ...

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        """Replace `tensor`, on every rank, by the sum of every rank's `tensor` (row-parallel outputs)."""

    def all_gather(self, local: torch.Tensor, output: torch.Tensor, *, dim: int = -1) -> None:
        """Fill `output` with every rank's `local`, in rank order, concatenated along `dim` (column-parallel outputs)."""

    def scatter(self, input: torch.Tensor | None, output: torch.Tensor, *, dim: int = -1) -> None:
        """Fill `output` with this rank's chunk of rank 0's `input`, cut into world_size equal chunks along `dim`."""

    def barrier(self) -> None:
        """Return once every rank has called it."""


class SingleDevice:
    """tp 1: every operation is the identity, so the same model code runs unsharded."""

    world_size = 1
    rank = 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        pass

    def all_gather(self, local: torch.Tensor, output: torch.Tensor, *, dim: int = -1) -> None:
        output.copy_(local)

    def scatter(self, input: torch.Tensor | None, output: torch.Tensor, *, dim: int = -1) -> None:
        if input is None:
            raise UsageError("scatter: rank 0 must pass the input to scatter")
        output.copy_(input)

    def barrier(self) -> None:
        pass


class TorchDistributed:
    """The communicator over a torch.distributed process group: gloo on CPU, NCCL on GPUs.

    Use `TorchDistributed.from_env()` under torchrun (it reads RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT),
    or `TorchDistributed.start(rank, world_size, init_method)` from processes started another way.
    """

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise UsageError("torch.distributed is not initialised; use TorchDistributed.from_env() or .start()")
        self._dist = dist
        self._group = group

    @classmethod
    def start(cls, rank: int, world_size: int, init_method: str, *, backend: str | None = None, timeout_s: float = 300) -> TorchDistributed:
        import torch
        import torch.distributed as dist

        if not 0 <= rank < world_size:
            raise UsageError(f"rank {rank} is outside a world of {world_size}")
        backend = backend or ("nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo")
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
        return cls()

    @classmethod
    def from_env(cls, *, backend: str | None = None) -> TorchDistributed:
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise UsageError(f"{', '.join(missing)} not set; start the processes with torchrun")
        return cls.start(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://", backend=backend)

    @property
    def world_size(self) -> int:
        return self._dist.get_world_size(self._group)

    @property
    def rank(self) -> int:
        return self._dist.get_rank(self._group)

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        self._dist.all_reduce(tensor, op=self._dist.ReduceOp.SUM, group=self._group)

    def all_gather(self, local: torch.Tensor, output: torch.Tensor, *, dim: int = -1) -> None:
        import torch

        pieces = [torch.empty_like(local) for _ in range(self.world_size)]
        self._dist.all_gather(pieces, local.contiguous(), group=self._group)
        torch.cat(pieces, dim=dim, out=output)

    def scatter(self, input: torch.Tensor | None, output: torch.Tensor, *, dim: int = -1) -> None:
        import torch

        chunks = None
        if self.rank == 0:
            if input is None:
                raise UsageError("scatter: rank 0 must pass the input to scatter")
            if input.shape[dim] % self.world_size:
                raise UsageError(f"scatter: dim {dim} of size {input.shape[dim]} does not divide by {self.world_size} ranks")
            chunks = [c.contiguous() for c in torch.chunk(input, self.world_size, dim=dim)]
        received = torch.empty_like(output).contiguous()
        self._dist.scatter(received, chunks, src=self._global(0), group=self._group)
        output.copy_(received)

    def barrier(self) -> None:
        self._dist.barrier(group=self._group)

    def close(self) -> None:
        if self._dist.is_initialized():
            self._dist.destroy_process_group()

    def _global(self, rank: int) -> int:
        return rank if self._group is None else self._dist.get_global_rank(self._group, rank)

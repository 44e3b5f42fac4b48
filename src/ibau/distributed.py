"""Data parallelism over several processes with ``torch.distributed`` (``torchrun``).

Launch any command with ``torchrun --nproc-per-node N -m ibau ...``: every process
(rank) runs the same program, holds one shard of each batch, and the ranks combine
their partial results with all-reduces, so that the outcome equals a single process's
on the whole data with the same global batch size and seed (up to float rounding):

* I-BAU (:class:`ibau.IBAU`): the gradient of the one shared perturbation, every
  vector of the implicit-hypergradient solver and the final parameter gradient are
  summed over ranks (each rank's loss weighted by its share of the batch);
* training (:func:`ibau.train.train`): DistributedDataParallel, each global batch
  split across ranks, the loss weighted so that the averaged gradient is the global
  batch's mean;
* evaluation (:func:`count_correct`): each rank counts on its shard, counts are summed.

Only rank 0 writes files and shows progress. The backend is gloo on CPU and NCCL on
GPUs (one GPU per rank: ``cuda:LOCAL_RANK``). Nothing changes for a single process:
:func:`current` is ``None`` and every helper is the identity. Code written for several
processes runs unchanged in one through :func:`communicator`, which returns the group's
:class:`Comm` or the :class:`SingleProcess` stand-in (rank 0 of 1, every reduction the
identity).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Comm", "SingleProcess", "communicator", "current", "init_from_env", "launched", "shard_slice",
           "is_main", "count_correct", "shutdown"]


@dataclass
class Comm:
    """The process group as I-BAU uses it, with a tally of what was communicated."""

    rank: int
    world: int
    bytes_reduced: int = 0
    calls: int = 0
    _group: object = field(default=None, repr=False)

    def all_reduce_sum(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Element-wise sums over ranks, as new tensors (one flat all-reduce for the list)."""
        tensors = list(tensors)
        if not tensors:
            return []
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self._group)
        self.bytes_reduced += flat.numel() * flat.element_size()
        self.calls += 1
        out, i = [], 0
        for t in tensors:
            out.append(flat[i:i + t.numel()].view_as(t))
            i += t.numel()
        return out

    def sum_float(self, value: float, device: torch.device | str = "cpu") -> float:
        (t,) = self.all_reduce_sum([torch.tensor([float(value)], dtype=torch.float64, device=device)])
        return float(t)

    def broadcast_(self, tensors: Sequence[Tensor], src: int = 0) -> None:
        """Overwrite every rank's tensors with rank ``src``'s (in place)."""
        for t in tensors:
            dist.broadcast(t.data, src=src, group=self._group)

    def same_everywhere(self, value: float, device: torch.device | str = "cpu") -> bool:
        """Whether ``value`` is equal on every rank."""
        t = torch.tensor([float(value), -float(value)], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group)
        return float(t[0]) == float(value) and -float(t[1]) == float(value)

    def shard(self, n: int) -> slice:
        """This rank's contiguous part of ``n`` items (:func:`shard_slice`)."""
        return shard_slice(n, self.rank, self.world)

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and shows progress."""
        return self.rank == 0


@dataclass
class SingleProcess(Comm):
    """The stand-in for one process: rank 0 of 1; sums over ranks return their input
    (the same tensors), broadcasts do nothing, every value is the same everywhere."""

    rank: int = 0
    world: int = 1

    def all_reduce_sum(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        return list(tensors)

    def sum_float(self, value: float, device: torch.device | str = "cpu") -> float:
        return value

    def broadcast_(self, tensors: Sequence[Tensor], src: int = 0) -> None:
        return None

    def same_everywhere(self, value: float, device: torch.device | str = "cpu") -> bool:
        return True


def communicator(distributed: bool | None = None) -> Comm:
    """The communicator data-parallel code uses: the initialised group of several
    processes (:func:`current`) when ``distributed`` is ``None`` (use it if there is one)
    or ``True`` (require it), else :class:`SingleProcess`.

    Raises:
        InputError: ``distributed=True`` without such a group.
    """
    comm = None if distributed is False else current()
    if comm is None:
        if distributed:
            from .errors import InputError

            raise InputError("distributed=True needs an initialised torch.distributed group of several processes "
                             "(launch with torchrun)")
        return SingleProcess()
    return comm


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher) with several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def current() -> Comm | None:
    """The initialised process group with more than one rank, else ``None``."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if dist.get_world_size() < 2:
        return None
    global _COMM_CACHE
    if _COMM_CACHE is None or _COMM_CACHE.world != dist.get_world_size():
        _COMM_CACHE = Comm(dist.get_rank(), dist.get_world_size())
    return _COMM_CACHE


_COMM_CACHE: Comm | None = None


def init_from_env(device: str | torch.device | None = None, *, timeout_s: float = 600.0) -> tuple[Comm | None, torch.device]:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...).

    Returns the communicator (``None`` for a single process) and this rank's device:
    ``cuda:LOCAL_RANK`` when ``device`` is ``"cuda"`` (or ``None`` and a GPU is present),
    else the CPU. The backend is NCCL for GPUs, gloo for the CPU.
    """
    want = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not launched():
        return None, want
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if want.type == "cuda":
        want = torch.device("cuda", local)
        torch.cuda.set_device(want)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=timeout_s))
    return current(), want


def shutdown() -> None:
    global _COMM_CACHE
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _COMM_CACHE = None


def is_main() -> bool:
    """Rank 0, or the only process: the one that writes files and shows progress."""
    comm = current()
    return comm is None or comm.rank == 0


def shard_slice(n: int, rank: int, world: int) -> slice:
    """This rank's contiguous part of ``n`` items (sizes differ by at most one; the
    first ``n % world`` ranks get one more). May be empty when ``n < world``."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def count_correct(model, x: Tensor, y: Tensor, *, transform=None, batch_size: int = 500) -> tuple[int, int]:
    """(correct, total) predictions of ``model`` on ``(x, y)``; under a process group each
    rank predicts its shard and the counts are summed."""
    from .metrics import predict

    comm = current()
    if comm is not None:
        sl = shard_slice(len(x), comm.rank, comm.world)
        x, y = x[sl], y[sl]
    correct = int((predict(model, x, batch_size=batch_size, transform=transform) == torch.as_tensor(y)).sum()) if len(x) else 0
    total = len(x)
    if comm is not None:
        from .metrics import model_device

        counts = torch.tensor([correct, total], dtype=torch.float64, device=model_device(model))
        c, t = comm.all_reduce_sum([counts])[0].tolist()
        correct, total = int(c), int(t)
    return correct, total

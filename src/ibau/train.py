"""The training recipe for poisoned (and clean reference) models: seeded, with progress,
per-epoch checkpoints and resume after an interruption."""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import InputError, check_int, check_number
from .metrics import model_device

__all__ = ["TrainConfig", "train", "train_classifier", "load_checkpoint"]


@dataclass
class TrainConfig:
    """The paper's recipe (Appendix A.4.1): Adam, 50 epochs, batch 128.

    ``lr`` is Adam's default 1e-3 (the paper does not state it).
    """

    epochs: int = 50
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("epochs", self.epochs, low=0, high=100_000)
        check_int("batch_size", self.batch_size, low=1, high=1_000_000)
        check_number("lr", self.lr, low=0, low_open=True, high=10)
        check_int("seed", self.seed, low=0, high=2**63 - 1)

    def as_dict(self) -> dict:
        return asdict(self)


_CHECKPOINT_KEYS = {"model": dict, "optimizer": dict, "generator": Tensor, "torch_rng": Tensor, "epoch": int,
                    "config": dict}


def load_checkpoint(path: str | os.PathLike, config: TrainConfig) -> dict:
    """A training checkpoint written by :func:`train`, read with ``weights_only=True``
    (nothing is unpickled beyond plain tensors and containers) and checked: its keys and
    types, its epoch, and that it was written with ``config``. A corrupt, foreign or
    hostile file is refused with :class:`~ibau.errors.InputError` saying how to start over."""
    path = Path(path)
    fix = f"delete {path} to start the training over"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"the checkpoint {path} cannot be read safely ({type(exc).__name__}); {fix}") from None
    if isinstance(state, dict) and isinstance(state.get("config"), dict) and state["config"] != config.as_dict():
        raise InputError(f"the checkpoint {path} was written with another config {state['config']}; "
                         f"run with that config to resume, or {fix}")
    if not isinstance(state, dict) or any(not isinstance(state.get(k), t) for k, t in _CHECKPOINT_KEYS.items()):
        raise InputError(f"the checkpoint {path} is not a training checkpoint of ibau; {fix}")
    if not 0 <= state["epoch"] <= config.epochs:
        raise InputError(f"the checkpoint {path} has an impossible epoch {state['epoch']}; {fix}")
    return state


def _as_set(data):
    from .data.poison import TensorSet

    if isinstance(data, tuple):
        return TensorSet(*data)
    return data


def train(model: nn.Module, data, config: TrainConfig = TrainConfig(), *, checkpoint: str | os.PathLike | None = None,
          progress: bool = True, desc: str = "training", distributed: bool | None = None) -> nn.Module:
    """Train ``model`` on ``data`` (a ``(x, y)`` pair or any set with ``__len__`` and
    ``batch(idx)``, e.g. :class:`ibau.data.poison.PoisonedSet`).

    With ``checkpoint``, the model, optimiser, epoch and shuffling state are saved
    atomically after every epoch, and a run started again with the same path resumes
    after the last finished epoch (giving the same weights as an uninterrupted run).
    The checkpoint is deleted when training completes. Dropout draws from a generator
    seeded by ``config.seed`` too.

    Under a ``torch.distributed`` group of several processes (``torchrun``; ``distributed``
    ``None`` = when there is one, ``False`` = never) the model is wrapped in
    ``DistributedDataParallel``. Sampling is distributed: every process draws the same
    seeded permutation and takes its contiguous part of each global batch of
    ``config.batch_size``; each loss is weighted by its part's size so that DDP's
    averaged gradient is the global batch's mean gradient. Without BatchNorm in training
    mode or dropout this gives one process's result up to float rounding (BatchNorm
    statistics are per process, dropout masks differ by process). A last batch with
    fewer images than processes is skipped. Only rank 0 writes the checkpoint and
    shows progress.
    """
    from tqdm.auto import tqdm

    from .distributed import current, shard_slice

    data = _as_set(data)
    device = model_device(model)
    comm = None if distributed is False else current()
    if distributed and comm is None:
        raise ValueError("distributed=True needs an initialised torch.distributed group of several processes")
    net: nn.Module = model
    if comm is not None:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        progress = progress and comm.rank == 0
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    g = torch.Generator().manual_seed(config.seed)
    start = 0
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and ckpt.exists():
        state = load_checkpoint(ckpt, config)
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            g.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
        except Exception as exc:
            raise InputError(f"the checkpoint {ckpt} does not fit this model or run ({type(exc).__name__}); "
                             "delete it to start the training over") from None
        start = int(state["epoch"])
    else:
        torch.manual_seed(config.seed)
    model.train()
    bar = tqdm(range(start, config.epochs), desc=desc, disable=not progress, unit="epoch", leave=False,
               initial=start, total=config.epochs)
    for epoch in bar:
        perm = torch.randperm(len(data), generator=g)
        total = 0.0
        for i in range(0, len(data), config.batch_size):
            idx = perm[i:i + config.batch_size]
            scale = 1.0
            if comm is not None:
                if len(idx) < comm.world:
                    continue
                n = len(idx)
                idx = idx[shard_slice(n, comm.rank, comm.world)]
                scale = len(idx) * comm.world / n  # DDP averages over processes
            xb, yb = data.batch(idx)
            loss = F.cross_entropy(net(xb.to(device)), yb.to(device))
            opt.zero_grad()
            (loss * scale if scale != 1.0 else loss).backward()
            opt.step()
            total += float(loss.detach()) * len(yb)
        if comm is not None:
            total = comm.sum_float(total, device)
        bar.set_postfix(loss=f"{total / len(data):.3f}")
        if ckpt is not None and (comm is None or comm.rank == 0):
            from .io import atomic_write

            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "generator": g.get_state(),
                     "torch_rng": torch.get_rng_state(), "epoch": epoch + 1, "config": config.as_dict()}
            atomic_write(ckpt, lambda tmp: torch.save(state, tmp), force=True)
    model.eval()
    if comm is not None:
        import torch.distributed as dist

        dist.barrier()  # nobody deletes the checkpoint while another process may still read it
    if ckpt is not None and ckpt.exists() and (comm is None or comm.rank == 0):
        ckpt.unlink()
    return model


def train_classifier(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int = 10, batch_size: int = 128,
                     lr: float = 1e-3, seed: int = 0, progress: bool = True, desc: str = "training") -> nn.Module:
    """Shortcut for :func:`train` on in-memory tensors."""
    return train(model, (x, torch.as_tensor(y).long()), TrainConfig(epochs, batch_size, lr, seed),
                 progress=progress, desc=desc)

"""Pieces the baseline defenses share: seeded augmentation, fine-tuning with points,
and the trigger-unlearning step of the trigger-synthesis family (NC, TABOR, DI)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..metrics import model_device
from ..optim import make_optimizer

#: ``point(label, **numbers)``: records a usable state of the model (``Run.point``)
Point = Callable[..., object]

__all__ = ["augment", "fine_tune", "stamp_fraction", "batches_of", "mad_anomaly_index", "private_rng"]


@contextlib.contextmanager
def private_rng(seed: int, device: torch.device):
    """Seed the global generators (dropout draws from them) inside, restore them after:
    training in train mode becomes reproducible and the caller's random state is kept."""
    cuda = device.type == "cuda"
    idx = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
    with torch.random.fork_rng(devices=[idx] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.default_generators[idx].manual_seed(seed)
        yield


def augment(x: Tensor, generator: torch.Generator, *, pad: int = 4, flip: bool = True) -> Tensor:
    """The standard CIFAR augmentation, seeded: random crop after zero-padding by ``pad``
    pixels, then a random horizontal flip (half of the images)."""
    n, c, h, w = x.shape
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        rows = (dy[:, None] + torch.arange(h)[None]).to(x.device)  # (n, h)
        cols = (dx[:, None] + torch.arange(w)[None]).to(x.device)  # (n, w)
        idx_n = torch.arange(n, device=x.device)[:, None, None, None]
        idx_c = torch.arange(c, device=x.device)[None, :, None, None]
        x = padded[idx_n, idx_c, rows[:, None, :, None], cols[:, None, None, :]]
    if flip:
        f = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(f[:, None, None, None], x.flip(-1), x)
    return x


def batches_of(n: int, batch_size: int, generator: torch.Generator | None) -> list[Tensor]:
    """Index batches over ``range(n)``: shuffled with ``generator``, in order without it."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def stamp_fraction(x: Tensor, stamps: Sequence[Callable[[Tensor], Tensor]], fraction: float,
                   generator: torch.Generator) -> Tensor:
    """Apply one of ``stamps`` (drawn per image) to a random ``fraction`` of the batch;
    labels stay the true ones (Neural Cleanse's unlearning recipe)."""
    if not stamps or fraction <= 0:
        return x
    n = len(x)
    k = max(1, int(round(fraction * n)))
    chosen = torch.randperm(n, generator=generator)[:k]
    which = torch.randint(0, len(stamps), (k,), generator=generator)
    x = x.clone()
    for s, stamp in enumerate(stamps):
        idx = chosen[which == s].to(x.device)
        if len(idx):
            x[idx] = stamp(x[idx])
    return x


def fine_tune(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, lr: float, batch_size: int,
              generator: torch.Generator, point: Point | None = None, label: str = "fine-tune epoch",
              optimizer: str = "adam", weight_decay: float = 0.0, momentum: float = 0.9,
              transform: Callable[[Tensor], Tensor] | None = None, use_augment: bool = False,
              loss_fn: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None,
              params: Sequence[Tensor] | None = None, progress: bool = False) -> list[float]:
    """Cross-entropy fine-tuning of ``model`` in train mode; ``point(label, loss=...)`` after
    every epoch (e.g. :meth:`ibau.defenses.base.Run.point`).

    ``transform(xb)`` (e.g. :func:`stamp_fraction`) and seeded :func:`augment` act on each
    batch; ``loss_fn(model, xb, yb)`` replaces the cross-entropy when given.
    Returns the mean loss per epoch.
    """
    device = model_device(model)
    params = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(optimizer, params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    # Dropout draws from torch's global generator: a private copy seeded from ``generator``.
    with private_rng(int(torch.randint(0, 2**62, (1,), generator=generator)), device):
        return _fine_tune(model, x, y, opt, epochs, batch_size, generator, point, label, transform, use_augment,
                          loss_fn, progress, device)


def _fine_tune(model, x, y, opt, epochs, batch_size, generator, point, label, transform, use_augment, loss_fn,
               progress, device) -> list[float]:
    from tqdm.auto import tqdm

    losses = []
    for epoch in tqdm(range(1, epochs + 1), desc=label.rsplit(" ", 1)[0], disable=not progress, leave=False,
                      unit="epoch"):
        model.train()
        total, count = 0.0, 0
        for idx in batches_of(len(x), batch_size, generator):
            xb, yb = x[idx].to(device), y[idx].to(device)
            if transform is not None:
                xb = transform(xb)
            if use_augment:
                xb = augment(xb, generator)
            loss = loss_fn(model, xb, yb) if loss_fn is not None else F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        model.eval()
        losses.append(total / max(count, 1))
        if point is not None:
            point(f"{label} {epoch}", loss=losses[-1])
    model.eval()
    return losses


def mad_anomaly_index(values: Tensor) -> Tensor:
    """Neural Cleanse's anomaly index: ``|v - median| / (1.4826 * MAD)`` per class.

    Classes far *below* the median (unusually small triggers / losses) are the suspects:
    callers flag ``index > 2`` among values below the median.
    """
    v = torch.as_tensor(values, dtype=torch.float64)
    med = v.quantile(0.5)
    mad = (v - med).abs().quantile(0.5) * 1.4826
    if mad == 0:
        mad = torch.tensor(1e-12, dtype=torch.float64)
    return (v - med).abs() / mad

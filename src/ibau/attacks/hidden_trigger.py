"""Hidden trigger backdoor: clean-label poisons whose features imitate patched sources."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.poison import TensorSet
from ._common import FeatureProbe, constructor_config, frozen_eval, model_device, prepared, seeded, shape_of
from ..errors import InputError, check_int, check_number
from .base import Attack, register_attack

__all__ = ["HiddenTrigger", "HiddenTriggerSet", "random_patch", "paste_patch"]

LOCATIONS = ("random", "bottom_right")
_HASH_SEED = 0x5EED  # fixed: the test-time patch location depends on the image only


def random_patch(channels: int, size: int, gen: torch.Generator, cells: int = 4) -> Tensor:
    """A seeded random coloured square, (C, size, size) in [0, 1]: a ``cells x cells``
    grid of uniformly random colours, nearest-upsampled to ``size``."""
    cells = max(1, min(int(cells), int(size)))
    grid = torch.rand(1, channels, cells, cells, generator=gen)
    return F.interpolate(grid, size=(int(size), int(size)), mode="nearest")[0].contiguous()


def paste_patch(x: Tensor, patch: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Copies of ``x`` (N, C, H, W) with ``patch`` (C, p, p) pasted with its top-left
    corner at ``(rows[i], cols[i])`` in image ``i`` (vectorised, differentiable in x)."""
    n, _, h, w = x.shape
    p = patch.shape[-1]
    patch = patch.to(x.device, x.dtype)
    rows, cols = rows.to(x.device).long().view(n, 1), cols.to(x.device).long().view(n, 1)
    di = torch.arange(h, device=x.device).view(1, h) - rows  # (N, H): row inside the patch
    dj = torch.arange(w, device=x.device).view(1, w) - cols  # (N, W)
    inside = ((di >= 0) & (di < p)).view(n, 1, h, 1) & ((dj >= 0) & (dj < p)).view(n, 1, 1, w)
    values = patch[:, di.clamp(0, p - 1).view(n, h, 1), dj.clamp(0, p - 1).view(n, 1, w)]  # (C, N, H, W)
    return torch.where(inside, values.transpose(0, 1), x)


def _greedy_pairs(cost: Tensor) -> Tensor:
    """One-to-one pairing of rows with columns (``rows <= cols``): repeatedly take the
    smallest remaining entry. Returns the column paired with each row."""
    cost = cost.detach().clone()
    b, m = cost.shape
    pair = torch.empty(b, dtype=torch.long, device=cost.device)
    for _ in range(b):
        k = int(torch.argmin(cost))
        r, c = divmod(k, m)
        pair[r] = c
        cost[r, :] = float("inf")
        cost[:, c] = float("inf")
    return pair


class HiddenTriggerSet(TensorSet):
    """The released training set: ``(x, y)`` with the images at ``indices`` replaced by
    ``poisons`` (labels kept: clean-label). ``mask`` marks the poisons. Nothing is
    copied; the poisons are swapped in when a batch is drawn."""

    def __init__(self, x: Tensor, y: Tensor, indices: Tensor, poisons: Tensor):
        super().__init__(x, y)
        self.poisons = poisons
        self.slot = torch.full((len(self.y),), -1, dtype=torch.long)
        self.slot[indices] = torch.arange(len(indices))
        self.mask = self.slot >= 0

    def batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        idx = torch.as_tensor(idx)
        xb, yb = self.x[idx].clone(), self.y[idx].clone()
        slot = self.slot[idx]
        m = slot >= 0
        if m.any():
            xb[m] = self.poisons[slot[m]].to(xb.device, xb.dtype)
        return xb, yb


@register_attack
class HiddenTrigger(Attack):
    """Hidden trigger backdoor (Saha, Subramanya & Pirsiavash, AAAI 2020, "Hidden
    trigger backdoor attacks"), as in the I-BAU paper's case study (Appendix A.5.4:
    CIFAR-10, source 5 -> target 8, 1,500 source images for the PGD, 800 poisons,
    eps 16/255, raised to 50/255 for a stronger attack).

    Clean-label: the poisons are target-class training images with a bounded
    perturbation and their correct label; the trigger never appears in the training
    data. ``prepare(model, x, y)`` (``model``: the clean, pretrained model the victim
    will fine-tune; ``x, y``: its training set) does:

    1. draws (from ``seed``) the patch (:func:`random_patch`, ``patch_size`` pixels),
       ``num_poisons`` images of class ``target`` (the poison starts ``t``; their
       indices in ``x`` are recorded) and ``num_source`` images of class ``source``;
    2. for each batch of ``batch_size`` poisons, runs ``steps`` signed-gradient PGD
       steps on ``sum ||f(z) - f(s~)||^2``, where ``f`` is the model's penultimate
       features (``feature_layer``; default: the input of the last ``nn.Linear``) and
       the ``s~`` are freshly drawn source images with the patch pasted at random
       locations, re-drawn every step; each poison is paired with a patched source
       close to it in feature space (greedy one-to-one matching on the distance
       matrix) as in Saha et al.'s algorithm; after each step ``z`` is projected onto
       ``||z - t||_inf <= eps`` and [0, 1].

    Step sizes: Saha et al. take plain gradient steps (lr 0.01, times 0.95 every 2,000
    iterations, thousands of iterations); plain gradients depend on the feature scale
    of the model, so we take the signed gradient (l_inf PGD) with ``step_size``
    (1/255), multiplied by ``lr_decay`` (0.95, as theirs) every ``decay_every`` (100)
    steps, for ``steps`` (our CPU-friendly default 500) steps. Cost: ``steps`` forward
    and backward passes per batch of poisons (the I-BAU setting: 8 batches; with the
    small VGG on 32x32 images ~0.4 s a step on one CPU thread, ~30 min in all).

    The victim then trains on :meth:`poisoned_set` (the training set with the
    ``num_poisons`` target images replaced by the poisons, labels unchanged).
    Saha et al. fine-tune the pretrained model (its final layers) on it, so pass the
    pretrained model to :func:`ibau.poisoning.poison_and_train`, which trains it with
    the given :class:`ibau.train.TrainConfig` (all layers; to fine-tune only the head,
    set ``requires_grad_(False)`` on the other parameters first). At test time the patch
    is pasted on source images, which should go to ``target``.

    Args:
        target: class of the poisons, where patched sources should go (I-BAU: 8).
        source: class whose patched images are sent to ``target`` (I-BAU: 5); ``None``
            uses every class other than ``target`` as source.
        num_poisons: target images replaced by poisons (I-BAU: 800).
        num_source: source images the patched sources are drawn from (I-BAU: 1,500).
        eps: l_inf bound of the poison perturbation in [0, 1] pixel units (Saha et al.
            and I-BAU: 16/255; the I-BAU paper raised it to 50/255 for a stronger attack).
        patch_size: side of the patch in pixels (our default 8 for 32x32 images, 1/4 of
            the side; Saha et al. paste a 30x30 patch on 224x224 ImageNet images, ~13%
            of the side, which would be ~4 pixels on 32x32 images).
        steps, step_size, lr_decay, decay_every: the PGD schedule (see above).
        batch_size: poisons optimised together, with as many patched sources (100).
        feature_layer: submodule whose output are the features (``None``: the input of
            the last ``nn.Linear``).
        location: where ``apply`` pastes the patch: ``"random"`` (default; Saha et al.
            paste it at a random location at test time) — a pseudo-random location
            derived from each image's own pixels, so the same image always gets the same
            location, whatever the batch or device — or ``"bottom_right"``.
        seed: seed of the patch, the image selection and the PGD draws (0).

    ``state_dict``: ``patch`` (C, p, p), ``poisons`` (K, C, H, W) and ``poison_indices``
    (K,) (float32, the indices into the ``x`` given to ``prepare``).

    Example:
        >>> atk = HiddenTrigger(eps=50 / 255).prepare(pretrained, x_train, y_train)
        >>> record = poison_and_train(pretrained, x_train, y_train, atk, config=TrainConfig(epochs=10))
        >>> xt = atk(x_test)     # patched; source-class images should go to 8
    """

    name = "hidden_trigger"
    needs_model = True
    #: ``prepare`` needs the labels of the training set (it picks target and source images)
    needs_labels = True

    def __init__(self, *, target: int = 8, source: int | None = 5, num_poisons: int = 800, num_source: int = 1500,
                 eps: float = 16 / 255, patch_size: int = 8, steps: int = 500, step_size: float = 1 / 255,
                 lr_decay: float = 0.95, decay_every: int = 100, batch_size: int = 100,
                 feature_layer: str | None = None, location: str = "random", seed: int = 0):
        super().__init__(target=target, seed=seed)
        self.source = None if source is None else int(check_int("source", source, low=0))
        if self.source == self.target:
            raise InputError(f"source and target must differ, both are {target}")
        for pname, value in (("num_poisons", num_poisons), ("num_source", num_source), ("patch_size", patch_size),
                             ("batch_size", batch_size), ("decay_every", decay_every)):
            check_int(pname, value, low=1)
        check_int("steps", steps, low=0)
        check_number("eps", eps, low=0, low_open=True, high=1)
        check_number("step_size", step_size, low=0, low_open=True)
        check_number("lr_decay", lr_decay, low=0, low_open=True, high=1)
        if feature_layer is not None and not isinstance(feature_layer, str):
            raise InputError(f"feature_layer must be a submodule name or None, got {feature_layer!r}")
        if location not in LOCATIONS:
            raise InputError(f"location must be one of {LOCATIONS}, got {location!r}")
        self.num_poisons, self.num_source = int(num_poisons), int(num_source)
        self.eps, self.patch_size = float(eps), int(patch_size)
        self.steps, self.step_size = int(steps), float(step_size)
        self.lr_decay, self.decay_every, self.batch_size = float(lr_decay), int(decay_every), int(batch_size)
        self.feature_layer, self.location = feature_layer, location
        self._patch: Tensor | None = None
        self._poisons: Tensor | None = None
        self._indices: Tensor | None = None
        #: mean squared feature distance of the poisons to their paired patched sources,
        #: before and after the PGD (same patched sources), filled by ``prepare``
        self.distance_before: float | None = None
        self.distance_after: float | None = None

    # -- labels and trigger -------------------------------------------------------
    def _is_source(self, y: Tensor) -> Tensor:
        return y != self.target if self.source is None else y == self.source

    def target_of(self, y: Tensor) -> Tensor:
        """``target`` for source-class labels; other labels unchanged (so the ASR counts
        only source images)."""
        y = torch.as_tensor(y).long()
        return torch.where(self._is_source(y), torch.full_like(y, self.target), y)

    @property
    def patch(self) -> Tensor:
        return prepared(self._patch, self.name)

    @property
    def poisons(self) -> Tensor:
        """The crafted poisons (K, C, H, W)."""
        return prepared(self._poisons, self.name)

    @property
    def poison_indices(self) -> Tensor:
        """Indices (into the ``x`` given to ``prepare``) of the images the poisons replace."""
        return prepared(self._indices, self.name)

    def _locations(self, x: Tensor) -> tuple[Tensor, Tensor]:
        n, _, h, w = x.shape
        span_r, span_c = h - self.patch_size + 1, w - self.patch_size + 1
        if self.location == "bottom_right":
            return torch.full((n,), span_r - 1), torch.full((n,), span_c - 1)
        # two seeded integer hashes of the 8-bit pixel values, computed on the CPU in
        # float64, where every partial sum (< 2**53) is exact: the same on any device
        q = (x.detach().float().cpu() * 255).round().flatten(1).double()  # (N, D)
        weights = torch.randint(1, 2 ** 16, (q.shape[1], 2), generator=seeded(_HASH_SEED)).double()
        keys = (q @ weights).long()  # (N, 2)
        return keys[:, 0] % span_r, keys[:, 1] % span_c

    def apply(self, x: Tensor) -> Tensor:
        """Copies of ``x`` with the patch pasted (location: see ``location``)."""
        patch = self.patch
        shape_of(x)
        batch = x.unsqueeze(0) if x.dim() == 3 else x
        if batch.shape[1] != patch.shape[0]:
            raise ValueError(f"{self.name}: the patch has {patch.shape[0]} channels, the images {batch.shape[1]}")
        if self.patch_size > min(batch.shape[-2:]):
            raise ValueError(f"a {self.patch_size}px patch does not fit {tuple(batch.shape[-2:])} images")
        rows, cols = self._locations(batch)
        out = paste_patch(batch, patch, rows, cols)
        return out[0] if x.dim() == 3 else out

    # -- crafting the poisons -------------------------------------------------------
    def _pick(self, mask: Tensor, n: int, what: str, gen: torch.Generator) -> Tensor:
        cand = torch.nonzero(mask).flatten()
        if len(cand) < n:
            raise ValueError(f"{self.name}: need {n} {what} images, the data has {len(cand)}")
        return cand[torch.randperm(len(cand), generator=gen)[:n]]

    def _patched_sources(self, sources: Tensor, n: int, gen: torch.Generator) -> Tensor:
        m = len(sources)
        pick = torch.randperm(m, generator=gen)[:n] if m >= n else torch.randint(0, m, (n,), generator=gen)
        h, w = sources.shape[-2:]
        rows = torch.randint(0, h - self.patch_size + 1, (n,), generator=gen)
        cols = torch.randint(0, w - self.patch_size + 1, (n,), generator=gen)
        return paste_patch(sources[pick.to(sources.device)], self._patch, rows, cols)

    @staticmethod
    def _matched_distance(fz: Tensor, fs: Tensor) -> tuple[Tensor, Tensor]:
        """Per-poison squared distance to its paired source feature, and the pairing."""
        pair = _greedy_pairs(torch.cdist(fz.detach(), fs.detach()))
        return (fz - fs[pair]).pow(2).sum(1), pair

    def prepare(self, model: nn.Module | None = None, x: Tensor | None = None, y: Tensor | None = None) -> "HiddenTrigger":
        if model is None or x is None or y is None:
            raise ValueError(f"{self.name} crafts its poisons against a model from the training set: "
                             "call prepare(model, x, y)")
        c, h, w = shape_of(x)
        if x.dim() != 4:
            raise ValueError("x must be a batch of images (N, C, H, W)")
        if self.patch_size > min(h, w):
            raise ValueError(f"a {self.patch_size}px patch does not fit {h}x{w} images")
        y = torch.as_tensor(y).long().reshape(-1).cpu()
        if len(y) != len(x):
            raise ValueError(f"{len(x)} images but {len(y)} labels")
        gen = seeded(self.seed)
        self._patch = random_patch(c, self.patch_size, gen)
        t_idx = self._pick(y == self.target, self.num_poisons, f"target-class ({self.target})", gen)
        s_idx = self._pick(self._is_source(y), self.num_source, "source-class", gen)
        device = model_device(model)
        sources = x[s_idx.to(x.device)].detach().float().to(device)
        probe = FeatureProbe(model, self.feature_layer)
        poisons, before, after = [], [], []
        with frozen_eval(model):
            for start in range(0, self.num_poisons, self.batch_size):
                idx = t_idx[start:start + self.batch_size]
                t = x[idx.to(x.device)].detach().float().to(device)
                with torch.no_grad():  # fixed patched sources to measure before/after
                    f_check = probe(self._patched_sources(sources, len(t), gen))
                    before.append(self._matched_distance(probe(t), f_check)[0])
                z = self._pgd(probe, t, sources, gen)
                with torch.no_grad():
                    after.append(self._matched_distance(probe(z), f_check)[0])
                poisons.append(z.cpu())
        self._poisons = torch.cat(poisons).contiguous()
        self._indices = t_idx.clone()
        self.distance_before = float(torch.cat(before).mean())
        self.distance_after = float(torch.cat(after).mean())
        return self

    def _pgd(self, probe: FeatureProbe, t: Tensor, sources: Tensor, gen: torch.Generator) -> Tensor:
        z = t.clone()
        lo, hi = (t - self.eps).clamp(0, 1), (t + self.eps).clamp(0, 1)
        for step in range(self.steps):
            with torch.no_grad():
                fs = probe(self._patched_sources(sources, len(t), gen))
            z.requires_grad_(True)
            dist, _ = self._matched_distance(probe(z), fs)
            grad, = torch.autograd.grad(dist.sum(), z)
            size = self.step_size * self.lr_decay ** (step // self.decay_every)
            z = torch.minimum(torch.maximum(z.detach() - size * grad.sign(), lo), hi)
        return z.detach()

    # -- the released training set ----------------------------------------------------
    def poisoned_set(self, x: Tensor, y: Tensor, ratio: float, *, seed: int = 0) -> HiddenTriggerSet:
        """``(x, y)`` with the ``num_poisons`` target images chosen in ``prepare``
        replaced by the poisons, labels kept; ``mask`` marks them. ``x, y`` must be the
        training set given to ``prepare``. ``ratio`` and ``seed`` are ignored: the
        poison budget is ``num_poisons``."""
        poisons, idx = self.poisons, self.poison_indices
        y = torch.as_tensor(y).long()
        if len(x) != len(y) or int(idx.max()) >= len(x):
            raise ValueError(f"the poisons replace images up to index {int(idx.max())}; got {len(x)} images")
        originals = x[idx.to(x.device)].detach().float().cpu()
        if (not bool((y[idx] == self.target).all()) or originals.shape != poisons.shape
                or float((poisons - originals).abs().max()) > self.eps + 1e-5):
            raise ValueError(f"{self.name}: these poisons were crafted from another training set "
                             "(pass the x, y given to prepare)")
        return HiddenTriggerSet(x, y, idx, poisons)

    # -- state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        return {"patch": self.patch.detach().cpu().float().clone(),
                "poisons": self.poisons.detach().cpu().float().clone(),
                "poison_indices": self.poison_indices.detach().cpu().float().clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> "HiddenTrigger":
        missing = {"patch", "poisons", "poison_indices"} - set(state)
        if missing:
            raise ValueError(f"not a hidden_trigger state: missing {sorted(missing)}")
        patch = torch.as_tensor(state["patch"]).detach().cpu().float().clone()
        if patch.dim() != 3 or patch.shape[1] != patch.shape[2]:
            raise ValueError(f"patch must be (C, p, p), got {tuple(patch.shape)}")
        poisons = torch.as_tensor(state["poisons"]).detach().cpu().float().clone()
        indices = torch.as_tensor(state["poison_indices"]).detach().cpu().round().long()
        if poisons.dim() != 4 or len(poisons) != len(indices):
            raise ValueError("poisons must be (K, C, H, W) with one index each")
        self._patch, self._poisons, self._indices = patch, poisons, indices
        self.patch_size = int(patch.shape[-1])
        return self

    def config(self) -> dict[str, Any]:
        return constructor_config(self)

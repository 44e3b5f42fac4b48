"""Helpers for tests and examples: tiny models and generated data.

Nothing here is part of the defense itself; it gives the unit tests (and quick examples)
genuinely backdoored models that train in seconds on a CPU, from seeds only:

* **The generated task** (``make_data``, ``trigger``, ``TinyNet``, ``poisoned_model``):
  four classes of noisy ``C x S x S`` = 3x8x8 images around fixed random smooth templates;
  a 2x2 white patch sends poisoned images to class ``TARGET`` (0).
* **Planted backdoors on real digits** (``digits_backdoor``, ``digits_metrics``): the
  paper's small VGG (1x8x8, 10 classes) trained on 1,100 of scikit-learn's bundled
  handwritten digits (no download) of which 220 carry the demo's 2x2 white patch,
  relabelled to class 0 (``"one_target"``) or to ``(y + 1) mod 10`` (``"all_to_all"``).
  400 other digits are the defender's clean set, the remaining 297 the test set. Needs
  scikit-learn.

Trained weights are cached per process (each model trains once); every call returns a
fresh model, so callers may change it in place.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["C", "S", "K", "TARGET", "NOISE", "TinyNet", "trigger", "make_data", "poisoned_state", "poisoned_model",
           "digits_target_of", "digits_backdoor", "digits_metrics", "noise_data", "seeded_vgg"]

C, S, K = 3, 8, 4  # channels, side, classes of the generated task
TARGET = 0
NOISE = 0.6


# -- the generated task ----------------------------------------------------------------
class TinyNet(nn.Module):
    def __init__(self, num_classes: int = K):
        """Two conv-BN-ELU-pool blocks and a linear head for 3x8x8 images."""
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(C, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ELU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ELU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(16 * (S // 4) ** 2, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def trigger():
    """The 2x2 white patch near the bottom-right corner of a 3x8x8 image (an :class:`ibau.attacks.Trigger`)."""
    from .attacks import Trigger

    mask = torch.zeros(C, S, S)
    mask[:, -3:-1, -3:-1] = 1
    return Trigger.patch(mask, torch.ones(C, S, S))


def make_data(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` images (float, (n, 3, 8, 8) in [0, 1]) and labels of the generated task."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.rand(K, C, S, S, generator=torch.Generator().manual_seed(1234))
    templates = F.avg_pool2d(templates, 3, stride=1, padding=1, count_include_pad=False)
    y = torch.randint(0, K, (n,), generator=g)
    x = (templates[y] + NOISE * torch.randn(n, C, S, S, generator=g)).clamp(0, 1)
    return x, y


@functools.lru_cache(maxsize=None)
def poisoned_state(seed: int = 0, ratio: float = 0.2, steps: int = 200) -> dict[str, Tensor]:
    """State dict of a TinyNet trained on data with ``ratio`` poisoned (trigger -> TARGET).

    The weights are initialised and trained from ``seed``; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        x, y = make_data(1200, seed)
        idx = torch.nonzero(y != TARGET).flatten()[: int(ratio * len(y))]
        x[idx] = trigger()(x[idx])
        y[idx] = TARGET
        net = TinyNet()
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            b = torch.randint(0, len(x), (64,), generator=g)
            loss = F.cross_entropy(net(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def poisoned_model(seed: int = 0) -> TinyNet:
    """A fresh backdoored TinyNet (eval mode) of the generated task."""
    net = TinyNet()
    net.load_state_dict(poisoned_state(seed))
    return net.eval()


# -- planted backdoors on real digits ------------------------------------------------------
def digits_target_of(kind: str) -> Callable[[Tensor], Tensor]:
    """The label map of a planted backdoor: ``"one_target"`` (everything to class 0), ``"all_to_all"``,
    or ``"clean"`` (the same recipe without poisoning: a clean model)."""
    from .demo import TARGET as DIGITS_TARGET

    if kind == "one_target":
        return lambda y: torch.full_like(y, DIGITS_TARGET)
    if kind == "all_to_all":
        return lambda y: (y + 1) % 10
    if kind == "clean":  # no backdoor: the trigger changes nothing
        return lambda y: y
    raise ValueError(f"kind must be 'one_target', 'all_to_all' or 'clean', got {kind!r}")


@functools.lru_cache(maxsize=None)
def _digits_backdoor(kind: str, seed: int):
    from .demo import TARGET as DIGITS_TARGET, digits_trigger, split_digits
    from .models import SmallVGG
    from .train import train_classifier

    target_of = digits_target_of(kind)
    x, y, tr, clean, te, g = split_digits(seed)
    trig = digits_trigger()
    xt, yt = x[tr].clone(), y[tr].clone()
    cand = torch.nonzero(yt != DIGITS_TARGET).flatten() if kind == "one_target" else torch.arange(len(yt))
    cand = cand[torch.randperm(len(cand), generator=g)[:220]]
    if kind != "clean":
        xt[cand], yt[cand] = trig(xt[cand]), target_of(yt[cand])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = train_classifier(SmallVGG(10, in_channels=1, image_size=8), xt, yt, epochs=15, batch_size=64,
                                 seed=seed, progress=False)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, x[clean], y[clean], x[te], y[te]


def digits_backdoor(kind: str = "one_target", seed: int = 0) -> dict:
    """A fresh copy of a planted digits backdoor and its data: keys ``model`` (eval mode),
    ``x_clean``, ``y_clean`` (the defender's 400 images), ``x_test``, ``y_test`` (297),
    ``trigger``, ``target_of`` and ``target`` (0)."""
    from .demo import TARGET as DIGITS_TARGET, digits_trigger
    from .models import SmallVGG

    state, xc, yc, xt, yt = _digits_backdoor(kind, seed)
    model = SmallVGG(10, in_channels=1, image_size=8)
    model.load_state_dict(state)
    return {"model": model.eval(), "x_clean": xc.clone(), "y_clean": yc.clone(), "x_test": xt, "y_test": yt,
            "trigger": digits_trigger(), "target_of": digits_target_of(kind), "target": DIGITS_TARGET}


def digits_metrics(model: nn.Module, d: dict) -> dict[str, float]:
    """ACC and ASR (non-target convention) of ``model`` on the test split of ``digits_backdoor``'s ``d``."""
    from .metrics import attack_success_rate, clean_accuracy

    return {"acc": clean_accuracy(model, d["x_test"], d["y_test"]),
            "asr": attack_success_rate(model, d["x_test"], d["y_test"], d["trigger"], d["target_of"])}


# -- unstructured inputs for the arithmetic of a method ----------------------------------
def noise_data(n: int = 60, seed: int = 3, num_classes: int = 5) -> tuple[Tensor, Tensor]:
    """``n`` uniform-noise 3x8x8 images and random labels in ``[0, num_classes)``, seeded."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, num_classes, (n,), generator=g)


def seeded_vgg(num_classes: int = 5) -> nn.Module:
    """The paper's small VGG at 3x8x8, built after ``torch.manual_seed(0)``, in eval mode."""
    from .models import SmallVGG

    torch.manual_seed(0)
    return SmallVGG(num_classes=num_classes, image_size=8).eval()


def randomise_batchnorm(net: nn.Module, seed: int = 0) -> nn.Module:
    """``net`` with every BatchNorm2d's running statistics, scale and shift set to seeded random
    values away from the identity (so that folding BatchNorm into the convolutions is tested)."""
    g = torch.Generator().manual_seed(seed)
    for mod in net.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.copy_(0.1 * torch.randn(mod.num_features, generator=g))
            mod.running_var.copy_(0.5 + torch.rand(mod.num_features, generator=g))
            mod.weight.data.copy_(1 + 0.2 * torch.randn(mod.num_features, generator=g))
            mod.bias.data.copy_(0.1 * torch.randn(mod.num_features, generator=g))
    return net

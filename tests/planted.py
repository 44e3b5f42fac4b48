"""Planted backdoors on real data (scikit-learn's bundled digits) for the defense tests.

A SmallVGG (1x8x8, 10 classes) is trained on 1,100 digits of which 20% carry the demo's
2x2 white patch: relabelled to class 0 (``one_target``) or to ``(y + 1) mod 10``
(``all_to_all``). 400 other digits are the defender's clean set, the remaining 297 the
test set. Cached per process: each model trains once (a few seconds).
"""

from __future__ import annotations

import functools

import torch

from ibau.demo import TARGET, digits_trigger, split_digits
from ibau.models import SmallVGG
from ibau.train import train_classifier


def target_of(kind: str):
    if kind == "one_target":
        return lambda y: torch.full_like(y, TARGET)
    return lambda y: (y + 1) % 10


@functools.lru_cache(maxsize=None)
def _backdoor(kind: str, seed: int):
    x, y, tr, clean, te, g = split_digits(seed)
    trig = digits_trigger()
    xt, yt = x[tr].clone(), y[tr].clone()
    cand = torch.nonzero(yt != TARGET).flatten() if kind == "one_target" else torch.arange(len(yt))
    cand = cand[torch.randperm(len(cand), generator=g)[:220]]
    xt[cand], yt[cand] = trig(xt[cand]), target_of(kind)(yt[cand])
    torch.manual_seed(seed)
    model = train_classifier(SmallVGG(10, in_channels=1, image_size=8), xt, yt, epochs=15, batch_size=64,
                             seed=seed, progress=False)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, x[clean], y[clean], x[te], y[te]


def backdoor(kind: str = "one_target", seed: int = 0) -> dict:
    """A fresh copy of the planted model and its data: keys ``model``, ``x_clean``,
    ``y_clean``, ``x_test``, ``y_test``, ``trigger``, ``target_of``."""
    state, xc, yc, xt, yt = _backdoor(kind, seed)
    model = SmallVGG(10, in_channels=1, image_size=8)
    model.load_state_dict(state)
    return {"model": model.eval(), "x_clean": xc.clone(), "y_clean": yc.clone(), "x_test": xt, "y_test": yt,
            "trigger": digits_trigger(), "target_of": target_of(kind), "target": TARGET}


def metrics(model, d: dict) -> dict:
    """ACC and ASR (non-target convention) of ``model`` on the planted test split."""
    from ibau.metrics import attack_success_rate, clean_accuracy

    return {"acc": clean_accuracy(model, d["x_test"], d["y_test"]),
            "asr": attack_success_rate(model, d["x_test"], d["y_test"], d["trigger"], d["target_of"])}

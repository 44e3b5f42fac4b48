"""Readers for the development copy of the data in ../shared/data (benchmarks only).

The product never reads this folder; these helpers turn its arrays into the float
NCHW tensors the library takes, and describe the authors' released models.
"""

from __future__ import annotations

import lzma
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ibau.attacks import Trigger, badnets_square

DEFAULT_DATA = Path(os.environ.get("IBAU_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _to_tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2).float().div_(255)


def load_split(root: Path, dataset: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    folder = {"cifar10": "cifar10", "gtsrb": "gtsrb32"}[dataset]
    x = np.load(lzma.open(root / folder / f"x_{split}.npy.xz"))
    y = np.load(root / folder / f"y_{split}.npy").astype(np.int64)
    return _to_tensor(x), torch.from_numpy(y)


def paper_protocol(root: Path, dataset: str, seed: int, clean_size: int = 5000):
    """(x_clean, y_clean, x_eval, y_eval) as in the issue's protocol.

    CIFAR-10: the clean set is a seeded random ``clean_size`` of the 9,000 lossy test
    images (stored sorted by class, so never a prefix); ACC/ASR use the 1,000 lossless.
    GTSRB: a seeded random ``clean_size`` of the 12,630 test images; the rest evaluate.
    """
    x, y = load_split(root, dataset, "test")
    g = torch.Generator().manual_seed(seed)
    if dataset == "cifar10":
        lossless = torch.from_numpy(np.load(root / "cifar10" / "test_lossless.npy"))
        lossy_idx = torch.nonzero(~lossless).flatten()
        pick = lossy_idx[torch.randperm(len(lossy_idx), generator=g)[:clean_size]]
        return x[pick], y[pick], x[lossless], y[lossless]
    perm = torch.randperm(len(x), generator=g)
    return x[perm[:clean_size]], y[perm[:clean_size]], x[perm[clean_size:]], y[perm[clean_size:]]


@dataclass(frozen=True)
class Released:
    file: str
    dataset: str
    attack: str
    target: int
    num_classes: int

    def trigger(self, root: Path) -> Trigger:
        t = root / "triggers"
        if self.attack == "badnets":
            return badnets_square()
        if self.attack == "l0_inv":
            return Trigger.from_image(t / "ibau_l0_inv.png", mask=t / "ibau_mask.npy")
        return Trigger.from_image(t / f"ibau_{self.attack}.png")


def released_models() -> list[Released]:
    out = []
    for ds, prefix, c in (("cifar10", "", 10), ("gtsrb", "gtsrb", 43)):
        for attack, target in (("badnets", 8), ("l0_inv", 0), ("l2_inv", 0), ("trojan_sq", 2), ("trojan_wm", 2)):
            out.append(Released(f"{prefix}{attack}_{target}_02_ckpt.pth", ds, attack, target, c))
    return out


# The paper's Table 1/2 numbers where it reports them (ACC/ASR before -> after I-BAU, %).
PAPER = {
    ("cifar10", "badnets"): (84.94, 98.28, 83.35, 12.30),
    ("cifar10", "l0_inv"): (85.36, 100.0, 84.08, 9.54),
    ("cifar10", "l2_inv"): (85.26, 100.0, 83.48, 7.48),
    ("cifar10", "trojan_sq"): (84.76, 99.66, 83.18, 9.82),
    ("cifar10", "trojan_wm"): (84.92, 99.96, 83.58, 3.42),
    ("gtsrb", "badnets"): (97.69, 99.18, 99.38, 3.32),
    ("gtsrb", "trojan_wm"): (97.84, 100.0, 99.44, 2.55),
}


def results_file(stem: str, profile: str, out: Path | None = None) -> tuple[Path, dict]:
    """``results/STEM[_PROFILE].json`` (the ``cpu`` profile has no suffix) and its data so far."""
    import json

    path = out or Path(__file__).resolve().parent / "results" / f"{stem}{'' if profile == 'cpu' else '_' + profile}.json"
    return path, (json.loads(path.read_text()) if path.exists() else {})

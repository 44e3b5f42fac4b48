"""Human-readable reports generated from the JSON report and saved tensors.

``write_report_dir`` stores ``report.json`` and ``artifacts.npz`` (perturbations and
sample images) in a folder, then ``render`` turns exactly those files into
``report.md`` and PNG figures, so a report can be regenerated from the data alone.
Plots need matplotlib (``pip install 'ibau[report]'``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["summary", "write_report_dir", "write_report_files", "render", "require_matplotlib"]


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'ibau[report]' (or pip install matplotlib)") from None


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _bound(report: dict[str, Any]) -> str:
    b = report["config"].get("robustness_bound", report["config"].get("norm_bound"))
    return "none (best effort)" if b is None else f"{b:.3g}"


def summary(report: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    rb, ra = report["robustness_before"], report["robustness_after"]
    lines = [
        f"clean accuracy (held-out {report['holdout_size']} images): "
        f"{_pct(report['clean_accuracy_before'])} -> {_pct(report['clean_accuracy_after'])}",
        f"strongest universal perturbation (||delta|| <= {_bound(report)}): fools "
        f"{_pct(rb['success_rate'])} -> {_pct(ra['success_rate'])} of correct predictions "
        f"(top class {rb['top_class']}: {_pct(rb['top_class_share'])} -> {ra['top_class']}: {_pct(ra['top_class_share'])})",
        f"{report['rounds']} I-BAU round(s) on {report['clean_set_size']} clean images in {report['seconds']:.1f} s; "
        f"{report['stop_reason']}",
    ]
    lines += [f"warning: {w}" for w in report.get("warnings", [])]
    return "\n".join(lines)


def write_report_files(folder: Path, report: dict[str, Any], artifacts: dict[str, Any]) -> None:
    """Write ``report.json`` and ``artifacts.npz`` into an existing ``folder`` and render them."""
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    np.savez(folder / "artifacts.npz", **{k: np.asarray(v) for k, v in artifacts.items()})
    render(folder)


def write_report_dir(folder: str | os.PathLike, report: dict[str, Any], artifacts: dict[str, Any], *,
                     force: bool = False) -> Path:
    """Write ``report.json``, ``artifacts.npz`` and the rendered report into ``folder``,
    atomically (built in a temporary folder and moved into place at the end)."""
    from .io import atomic_directory

    require_matplotlib()
    with atomic_directory(folder, force=force) as tmp:
        write_report_files(tmp, report, artifacts)
    return Path(folder)


def _show(img: np.ndarray) -> np.ndarray:
    img = np.transpose(img, (1, 2, 0))
    return img[..., 0] if img.shape[-1] == 1 else img


def _scaled(delta: np.ndarray) -> np.ndarray:
    d = delta[0] if delta.ndim == 4 else delta
    lo, hi = float(d.min()), float(d.max())
    return _show((d - lo) / (hi - lo) if hi > lo else np.zeros_like(d))


def render(folder: str | os.PathLike) -> Path:
    """Render ``report.md`` and figures from ``report.json`` + ``artifacts.npz`` in ``folder``."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    report = json.loads((folder / "report.json").read_text())
    art = np.load(folder / "artifacts.npz", allow_pickle=False)
    hist = report["history"]

    # per-round curves
    fig, ax = plt.subplots(figsize=(5, 3.2))
    rounds = [0] + [h["round"] for h in hist]
    acc = [report["clean_accuracy_before"]] + [h.get("holdout_accuracy", np.nan) for h in hist]
    ax.plot(rounds, [100 * a for a in acc], "o-", label="held-out clean accuracy")
    if any("universal_success_rate" in h for h in hist):
        us = [report["robustness_before"]["success_rate"]] + [h.get("universal_success_rate", np.nan) for h in hist]
        ax.plot(rounds, [100 * u for u in us], "s-", label="universal perturbation success")
    else:
        ax.plot([0, rounds[-1]], [100 * report["robustness_before"]["success_rate"],
                                  100 * report["robustness_after"]["success_rate"]], "s--",
                label="universal perturbation success")
    ax.set_xlabel("I-BAU round")
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "rounds.png", dpi=120)
    plt.close(fig)

    # perturbations
    names = [("universal_delta_before", "strongest universal\nperturbation, before"),
             ("ibau_delta", "I-BAU's last\nperturbation"),
             ("universal_delta_after", "strongest universal\nperturbation, after")]
    fig, axes = plt.subplots(1, 3, figsize=(7.5, 3.4))
    for ax, (key, title) in zip(axes, names):
        d = art[key]
        ax.imshow(_scaled(d), cmap="gray" if d.shape[-3] == 1 else None, interpolation="nearest")
        ax.set_title(f"{title}\n||delta|| = {np.linalg.norm(d):.2f}", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(folder / "perturbations.png", dpi=120)
    plt.close(fig)

    # samples
    xs = art["samples"]
    n = len(xs)
    if n:
        s = report["samples"]
        pert = np.clip(xs + art["universal_delta_before"], 0, 1)
        fig, axes = plt.subplots(2, n, figsize=(1.3 * n, 3.8), squeeze=False)
        for i in range(n):
            for row, (imgs, key) in enumerate(((xs, "clean"), (pert, "perturbed"))):
                ax = axes[row][i]
                ax.imshow(_show(imgs[i]), cmap="gray" if imgs.shape[1] == 1 else None, vmin=0, vmax=1)
                after_key = "clean" if key == "clean" else "perturbed_before_delta"
                ax.set_title(f"y={s['labels'][i]}\n{s['before'][key][i]} -> {s['after'][after_key][i]}", fontsize=7)
                ax.axis("off")
        axes[0][0].text(-0.3, 0.5, "clean", transform=axes[0][0].transAxes, rotation=90, va="center", fontsize=8)
        axes[1][0].text(-0.3, 0.5, "+ delta", transform=axes[1][0].transAxes, rotation=90, va="center", fontsize=8)
        fig.suptitle("label, prediction before -> after (bottom row: the 'before' universal perturbation added)",
                     fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "samples.png", dpi=120)
        plt.close(fig)

    rb, ra = report["robustness_before"], report["robustness_after"]
    md = [
        "# I-BAU unlearning report", "",
        f"Generated from `report.json` (schema {report['schema_version']}, created {report['created']}).", "",
        "| | before | after |", "|---|---|---|",
        f"| clean accuracy on {report['holdout_size']} held-out images | {_pct(report['clean_accuracy_before'])} | "
        f"{_pct(report['clean_accuracy_after'])} |",
        f"| universal perturbation success (‖δ‖ ≤ {_bound(report)}) | {_pct(rb['success_rate'])} | "
        f"{_pct(ra['success_rate'])} |",
        f"| most frequent class under it (share) | {rb['top_class']} ({_pct(rb['top_class_share'])}) | "
        f"{ra['top_class']} ({_pct(ra['top_class_share'])}) |", "",
        f"{report['rounds']} round(s) on {report['clean_set_size']} clean images, {report['seconds']:.1f} s in all. "
        f"Stopped: {report['stop_reason']}.", "",
    ]
    md += [f"> **Warning:** {w}" for w in report.get("warnings", [])]
    md += ["", "A backdoored model has a small universal perturbation (its trigger) that sends most images to one "
           "class; a high success rate concentrated on one class is the signature. The rate is measured on held-out "
           "images with a perturbation searched on the clean set.", "",
           "![per-round curves](rounds.png)", "", "![perturbations](perturbations.png)", ""]
    if n:
        md += ["![samples](samples.png)", ""]
    md += ["## Rounds", "", "| round | held-out accuracy | universal success | ‖δ‖ | outer loss | seconds |",
           "|---|---|---|---|---|---|"]
    for h in hist:
        us = h.get("universal_success_rate")
        md.append(f"| {h['round']} | {_pct(h.get('holdout_accuracy', float('nan')))} | "
                  f"{_pct(us) if us is not None else '-'} | {h['delta_norm']:.2f} | {h['outer_loss']:.3f} | "
                  f"{h['seconds']:.1f} |")
    (folder / "report.md").write_text("\n".join(md) + "\n")
    return folder / "report.md"

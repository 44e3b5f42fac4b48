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


def scan_verdict(scan: dict[str, Any]) -> str:
    """``backdoor found -> class k`` or ``no backdoor found``, with the score."""
    from .scanning import verdict

    return f"{verdict(scan['backdoored'], scan['target_classes'])} (score {scan['score']:.2f})"


def scan_line(report: dict[str, Any], label: str = "scan") -> str | None:
    """The scan's verdict before and after unlearning, after ``label``, or ``None`` when the
    run had no scan."""
    if "scan_before" not in report:
        return None
    from .scanning import class_list

    before, after = report["scan_before"], report["scan_after"]
    if before["backdoored"]:
        after_text = ("still found -> class " + class_list(after["target_classes"])
                      if after["backdoored"] else "no longer found")
        after_text += f" (score {after['score']:.2f})"
        if not after["backdoored"] and report.get("reversed_classes"):
            after_text += "; weak evidence: the recovery unlearned this scan's own reversed trigger"
    else:
        after_text = scan_verdict(after)
    return f"{label} (threshold {before['threshold']:g}): before: {scan_verdict(before)}; after: {after_text}"


def _times(report: dict[str, Any]) -> str:
    """``total 42.0 s (I-BAU rounds 30.1 s, scans 9.0 s, ...)``: the job's time and its phases."""
    names = {"unlearning": "I-BAU rounds", "scan": "scans", "universal_perturbation_search": "universal-perturbation "
             "searches"}
    parts = [f"{names.get(k, k)} {v:.1f} s" for k, v in report.get("seconds_phases", {}).items() if v > 0]
    return f"total {report['seconds']:.1f} s" + (f" ({', '.join(parts)})" if parts else "")


def summary(report: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    from .scanning import class_list

    rb, ra = report["robustness_before"], report["robustness_after"]
    verdict = scan_line(report)
    lines = ([verdict] if verdict else []) + [
        f"clean accuracy (held-out {report['holdout_size']} images): "
        f"{_pct(report['clean_accuracy_before'])} -> {_pct(report['clean_accuracy_after'])}",
        f"secondary measure, strongest universal perturbation (||delta|| <= {_bound(report)}): fools "
        f"{_pct(rb['success_rate'])} -> {_pct(ra['success_rate'])} of correct predictions "
        f"(top class {rb['top_class']}: {_pct(rb['top_class_share'])} -> {ra['top_class']}: {_pct(ra['top_class_share'])})",
        f"{report['rounds']} I-BAU round(s) on {report['clean_set_size']} clean images"
        + (f" ({report['config']['arithmetic']})" if report.get("config", {}).get("arithmetic") else "")
        + (f", recovery also unlearning the scan's reversed trigger (class {class_list(report['reversed_classes'])}"
           + (f"; amplified, {report['config']['amplify_steps']} steps a round"
              if report.get("config", {}).get("amplify_steps") else "")
           + (f"; its over-predicted probability moved to the labels: class {class_list(report['debiased_classes'])}"
              if report.get("debiased_classes") else "") + ")"
           if report.get("reversed_classes") else "")
        + f"; {_times(report)}; {report['stop_reason']}",
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
    verdict = scan_line(report, label="**Backdoor scan**")
    if verdict:
        md[4:4] = [verdict, "",
                   "The scan reverse-engineers the smallest stamp that sends clean images to each class; a class "
                   "whose stamp is far smaller than the others' is the suspected target (`ibau scan`).", ""]
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
    limit = report.get("config", {}).get("guard_drop")
    for h in hist:  # IBAU's accuracy guard re-ran a round that cost too much clean-set accuracy
        if h.get("guard_retries"):
            runs = ", ".join(_pct(a) for a in h.get("guard_accuracies", []))
            md += ["", f"Round {h['round']} was run again {h['guard_retries']} time(s) with a smaller outer step "
                   f"(outer_lr {h['outer_lr']:.2g}): it cost more than "
                   f"{f'{100 * limit:g} points of' if limit is not None else 'the allowed'} clean-set accuracy "
                   f"(the accuracy guard, `guard_drop`; {_pct(h['clean_accuracy_before'])} before round 1, "
                   f"{runs} after each run)."]
    (folder / "report.md").write_text("\n".join(md) + "\n")
    return folder / "report.md"


def _png(path: Path, img: np.ndarray) -> None:
    """``img`` (C, H, W) or (H, W) in [0, 1] as an 8-bit PNG."""
    from PIL import Image

    a = np.asarray(img, dtype=np.float64)
    if a.ndim == 3:
        a = a[0] if a.shape[0] == 1 else np.transpose(a, (1, 2, 0))
    Image.fromarray(np.round(np.clip(a, 0, 1) * 255).astype(np.uint8)).save(path)


def write_scan_dir(folder: str | os.PathLike, report: dict[str, Any], triggers: dict[int, dict[str, Any]], *,
                   force: bool = False) -> Path:
    """The folder of ``ibau scan --report-dir``, written atomically: ``report.json``, for each
    reversed trigger ``trigger_K.safetensors`` (``mask`` 1 x H x W and ``pattern`` C x H x W),
    ``trigger_K_mask.png``, ``trigger_K_pattern.png`` and ``trigger_K_stamp.png`` (mask x
    pattern: what the stamp paints), and a short ``report.md``."""
    from safetensors.torch import save_file

    from .io import atomic_directory

    verdict = (f"**Backdoor found** -> class {', '.join(map(str, report['target_classes']))}"
               if report["backdoored"] else "**No backdoor found**")
    lines = ["# ibau scan", "", f"{verdict}: score {report['score']:.2f} (threshold {report['threshold']:g}), "
             f"{report['seconds']:.1f} s, method `{report['method']}`.", "",
             *[f"> **Warning:** {w}" for w in report.get("warnings", [])],
             "Score: the classes with the smallest masks after the first phase were searched longer; the score is "
             "the largest of their mask norms over the smallest, and a class whose mask is at least the threshold "
             "times smaller than that largest one is flagged; a class the model answers far more often than it is "
             "labelled (over-predicted) is its bias, left out of both. The anomaly index (robust standard deviations "
             "below the median, Neural Cleanse's statistic) is computed on the first phase's norms.", "",
             "| class | mask l1 | stamp success | anomaly index | flagged |", "|---|---|---|---|---|"]
    for row in sorted(report["per_class"], key=lambda r: r["mask_l1"]):
        flagged = "yes" if row["class"] in report["target_classes"] else ""
        success = "-" if row.get("success") is None else f"{100 * row['success']:.0f}%"
        lines.append(f"| {row['class']} | {row['mask_l1']:.1f} | {success} | "
                     f"{row['anomaly_index']:.2f} | {flagged} |")
    lines += ["", "Reversed trigger(s) (mask, pattern, mask x pattern):", ""]
    with atomic_directory(folder, force=force) as tmp:
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        for k, t in sorted(triggers.items()):
            mask, pattern = t["mask"].float().contiguous(), t["pattern"].float().contiguous()
            save_file({"mask": mask, "pattern": pattern}, str(tmp / f"trigger_{k}.safetensors"))
            _png(tmp / f"trigger_{k}_mask.png", mask.numpy())
            _png(tmp / f"trigger_{k}_pattern.png", pattern.numpy())
            _png(tmp / f"trigger_{k}_stamp.png", (mask * pattern).numpy())
            lines.append(f"class {k}: ![mask](trigger_{k}_mask.png) ![pattern](trigger_{k}_pattern.png) "
                         f"![stamp](trigger_{k}_stamp.png)")
        (tmp / "report.md").write_text("\n".join(lines) + "\n")
    return Path(folder)

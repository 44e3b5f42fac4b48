"""The reproduction report, generated from the per-cell JSON results only.

``write_report(experiments, results, out, profile=...)`` writes a markdown file with,
for every experiment file, its table (our mean ± spread over seeds next to the paper's
number and the difference) or figure (PNG beside the markdown), the profile's protocol
and deviations, and a verdict per claim of the paper: reproduced / partly / not
reproduced / not run. Every number comes from a cell file whose key is the hash of the
cell's settings, so a stale result (from an older setting) is never shown.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..defenses import DEFENSES
from .spec import Experiment, expand

__all__ = ["write_report", "LAYOUTS", "collect"]

EFFECTIVE_ASR = 0.2  # the paper's line
MAX_ACC_DROP = 0.10
#: column headings: "none" (no defense) and every registered defense's ``short_name``
NAMES = {"none": "No defense", **{name: cls.short_name for name, cls in DEFENSES.items()}}
#: the published defenses the paper compares I-BAU with (``role == "baseline"``), in Table 1's order
BASELINES = [name for name, cls in DEFENSES.items() if cls.role == "baseline"]


# ----------------------------------------------------------------------------- data
def collect(exp: Experiment, results: Path, profile: str) -> list[dict[str, Any]]:
    """The finished cell records of the experiment's current ``profile`` cells."""
    from . import load_results

    keys = {c.key for c in expand(exp, profile)}
    if not (Path(results) / exp.name).exists():
        return []
    return [r for r in load_results(results, exp.name) if r["key"] in keys]


def _errors(exp: Experiment, results: Path, profile: str) -> list[str]:
    import json

    keys = {c.key for c in expand(exp, profile)}
    out = []
    for f in sorted((Path(results) / exp.name).glob("*.error.json")) if (Path(results) / exp.name).exists() else []:
        rec = json.loads(f.read_text())
        if rec.get("key") in keys:
            out.append(f"{rec['label']}: {rec.get('error')}")
    return out


def _row(exp: Experiment, rec: dict[str, Any]) -> str:
    axis = exp.meta.get("row_axis")
    if axis:
        v: Any = rec["params"]
        for k in axis.split("."):
            v = v.get(k, {}) if isinstance(v, dict) else None
        return str(v)
    name = rec["params"]["model"]["name"]
    return exp.meta.get("rows", {}).get(name, name)


def _rows_in_order(exp: Experiment, profile: str) -> list[str]:
    seen: list[str] = []
    for c in expand(exp, profile):
        r = _row(exp, {"params": c.params})
        if r not in seen:
            seen.append(r)
    return seen


def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return float("nan"), None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _fmt(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    m, sd = _mean_sd(values)
    if math.isnan(m):
        return "-"
    return f"{scale * m:.{digits}f}" + (f" ± {scale * sd:.{digits}f}" if sd is not None else "")


def _paper_pair(p: Any) -> str:
    if p is None:
        return ""
    if isinstance(p, str):
        return f"[paper {p}]"
    return "[paper " + " / ".join(x if isinstance(x, str) else f"{x:g}" for x in p[:2]) + "]"


def _failed(rec: dict[str, Any]) -> bool:
    r = rec["result"]
    return r["after"]["asr"] >= EFFECTIVE_ASR or (r["before"]["acc"] - r["after"]["acc"]) > MAX_ACC_DROP


# ----------------------------------------------------------------------------- layouts
def _defense_table(exp: Experiment, recs: list[dict[str, Any]], profile: str, fig_dir: Path) -> list[str]:
    cols = [c for c in exp.meta.get("columns", []) if c in exp.profile(profile).get("defenses", [])]
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in recs:
        groups[(_row(exp, r), r["params"]["defense"])].append(r)
    lines = ["Each cell: ACC / ASR in % (mean ± s.d. over seeds where there are several), then the paper's "
             "cell and our difference (ours − paper). ✗: not effective (ASR ≥ 20%, or ACC down by more than "
             "10 points from the same model without defense).", "",
             "| | " + " | ".join(NAMES.get(c, c) for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for row in _rows_in_order(exp, profile):
        cells = []
        for c in cols:
            g = groups.get((row, c), [])
            paper = exp.paper.get(f"{row}/{c}")
            if not g:
                cells.append("not run" + (f" {_paper_pair(paper)}" if paper is not None else ""))
                continue
            acc = [x["result"]["after"]["acc"] for x in g]
            asr = [x["result"]["after"]["asr"] for x in g]
            mark = " ✗" if c != "none" and any(_failed(x) for x in g) else ""
            txt = f"{_fmt(acc)} / {_fmt(asr)}{mark}"
            if isinstance(paper, list) and all(isinstance(v, (int, float)) for v in paper[:2]):
                da, ds = 100 * _mean_sd(acc)[0] - paper[0], 100 * _mean_sd(asr)[0] - paper[1]
                txt += f" {_paper_pair(paper)} Δ {da:+.1f} / {ds:+.1f}"
            elif paper is not None:
                txt += f" {_paper_pair(paper)}"
            cells.append(txt)
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    flagged = [(r["label"], r["result"].get("flagged")) for r in recs if r["result"].get("flagged") is not None]
    if flagged:
        lines += ["", "Classes flagged by the trigger-synthesis detectors: " +
                  "; ".join(f"{lab}: {f or 'none'}" for lab, f in flagged) + "."]
    return lines


def _multi_table(exp: Experiment, recs: list[dict[str, Any]], profile: str, fig_dir: Path) -> list[str]:
    cols = [c for c in exp.meta.get("columns", []) if c in exp.profile(profile).get("defenses", [])]
    trig = exp.meta.get("triggers", [])
    lines = []
    for row in _rows_in_order(exp, profile):
        by = {c: [r for r in recs if _row(exp, r) == row and r["params"]["defense"] == c] for c in cols}
        lines += [f"**{row}** (ours [paper]; %):", "", "| | " + " | ".join(NAMES.get(c, c) for c in cols) + " |",
                  "|---|" + "---|" * len(cols)]
        names = ["ACC", "average ASR"] + trig
        for i, name in enumerate(names):
            cells = []
            for c in cols:
                g = by[c]
                paper = exp.paper.get(f"{row}/{c}")
                p = paper if isinstance(paper, str) else (paper[i] if isinstance(paper, list) and i < len(paper) else None)
                ptxt = "" if p is None else f" [{p if isinstance(p, str) else f'{p:g}'}]"
                if not g:
                    cells.append("not run" + ptxt)
                    continue
                if i == 0:
                    vals = [x["result"]["after"]["acc"] for x in g]
                elif i == 1:
                    vals = [x["result"]["after"]["asr"] for x in g]
                else:
                    vals = [x["result"]["after"].get("asr_per_trigger", [math.nan] * len(trig))[i - 2] for x in g]
                cells.append(_fmt(vals) + ptxt)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _time_table(exp: Experiment, recs_by_exp: dict[str, list[dict]], profile: str, fig_dir: Path) -> list[str]:
    lines = ["Seconds of defense work (evaluation excluded) until the defense took effect, mean over the "
             "one-target models where it did (n/N: how many); ratio: to I-BAU's mean in the same run. A defense "
             "that never takes effect on a model is slower than any time; it counts as a failure in the ratio "
             "column (∞ when it never took effect). Where the cells say `stop_max_drop`, taking effect means ASR "
             "< 20% with clean accuracy down by at most that much; elsewhere ASR < 20% alone.", "",
             "| source | defense | ours: mean s (n/N) | ratio to I-BAU | paper s | paper ratio |", "|---|---|---|---|---|---|"]
    summaries = []
    for src in exp.profile(profile).get("derive_from", []):
        recs = [r for r in recs_by_exp.get(src, []) if not _multi_target(r)]
        times = _effect_times(recs)
        ib = times.get("ibau", ([], 0))
        ib_mean = _mean_sd(ib[0])[0] if ib[0] else float("nan")
        pib = exp.paper.get(f"{src}/ibau")
        for d, (ts, n) in times.items():
            if d == "none":
                continue
            m = _mean_sd(ts)[0] if ts else float("nan")
            ratio = "∞" if not ts else (f"{m / ib_mean:.2g}x" if ib_mean == ib_mean and ib_mean > 0 else "-")
            if ts and len(ts) < n:
                ratio += f" (never on {n - len(ts)})"
            p = exp.paper.get(f"{src}/{d}")
            pr = f"{p / pib:.0f}x" if p and pib else "-"
            lines.append(f"| {src} | {NAMES.get(d, d)} | {'-' if not ts else f'{m:.1f}'} ({len(ts)}/{n}) | {ratio} | "
                         f"{p if p is not None else '-'} | {pr} |")
        fastest = _fastest_baseline(times)
        if fastest and ib[0]:
            d, m = fastest
            summaries.append(f"{src}: the fastest baseline that took effect is {NAMES.get(d, d)} ({m:.1f} s); "
                             f"I-BAU ({ib_mean:.1f} s) is {m / ib_mean:.2g}x faster.")
    return lines + ([""] + summaries if summaries else [])


def _fastest_baseline(times: dict[str, tuple[list[float], int]]) -> tuple[str, float] | None:
    """(defense, mean seconds) of the baseline with the smallest mean time to effect among those that
    took effect on some model, or None."""
    means = {d: _mean_sd(ts)[0] for d, (ts, _) in times.items() if d in BASELINES and ts}
    return min(means.items(), key=lambda kv: kv[1]) if means else None


def _multi_target(rec: dict[str, Any]) -> bool:
    name = rec["params"]["model"]["name"]
    return "all_to_all" in name or "multi" in name


def _effect_times(recs: list[dict[str, Any]]) -> dict[str, tuple[list[float], int]]:
    out: dict[str, tuple[list[float], int]] = {}
    for r in recs:
        d = r["params"]["defense"]
        ts, n = out.get(d, ([], 0))
        t = r["result"].get("time_to_effect")
        out[d] = (ts + ([t] if t is not None else []), n + 1)
    return out


def _curves(recs: list[dict[str, Any]], key: str) -> list[list[float]]:
    return [[h[key] for h in r["result"]["history"] if key in h] for r in recs]


def _stability_figure(exp: Experiment, recs: list[dict[str, Any]], profile: str, fig_dir: Path) -> list[str]:
    methods = [d for d in exp.profile(profile).get("defenses", []) if any(r["params"]["defense"] == d for r in recs)]
    lines = ["Per round (0 = before), mean ± s.d. over seeds (%):", "",
             "| method | seeds | " + " | ".join(f"round {i}" for i in range(_max_len(recs))) + " |",
             "|---|---|" + "---|" * _max_len(recs)]
    for d in methods:
        g = [r for r in recs if r["params"]["defense"] == d]
        for key in ("asr", "acc"):
            cs = _curves(g, key)
            cells = [_fmt([c[i] for c in cs if i < len(c)]) for i in range(_max_len(recs))]
            lines.append(f"| {NAMES.get(d, d)} {key.upper()} | {len(g)} | " + " | ".join(cells) + " |")
    png = _plot(fig_dir, exp.name, lambda plt: _plot_stability(plt, recs, methods))
    if png:
        lines += ["", f"![{exp.title}]({png})"]
    return lines


def _max_len(recs: list[dict[str, Any]]) -> int:
    return max((len(r["result"]["history"]) for r in recs), default=0)


def _plot_stability(plt, recs, methods):
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    colors = {"ibau": "tab:blue", "naive_uap": "tab:red"}
    for d in methods:
        for r in (r for r in recs if r["params"]["defense"] == d):
            for ax, key in zip(axes, ("asr", "acc")):
                c = _curves([r], key)[0]
                ax.plot(range(len(c)), [100 * v for v in c], color=colors.get(d, "gray"), alpha=0.5, lw=1)
        for ax in axes:
            ax.plot([], [], color=colors.get(d, "gray"), label=NAMES.get(d, d))
    for ax, key in zip(axes, ("ASR (%)", "ACC (%)")):
        ax.set_xlabel("round")
        ax.set_ylabel(key)
        ax.legend()
    return fig


def _normbound_figure(exp: Experiment, recs: list[dict[str, Any]], profile: str, fig_dir: Path) -> list[str]:
    axis = exp.meta.get("axis", "settings.ibau.norm_bound")
    values = exp.profile(profile).get("axes", {}).get(axis, [])
    lines = ["| norm bound | seeds | ACC after (%) | ASR after (%) | ACC before | ASR before |", "|---|---|---|---|---|---|"]
    stats = []
    for v in values:
        g = [r for r in recs if r["params"]["axes"].get(axis) == v]
        acc = [r["result"]["after"]["acc"] for r in g]
        asr = [r["result"]["after"]["asr"] for r in g]
        label = "best effort" if v == "none" else f"{v:g}"
        stats.append((label, acc, asr))
        lines.append(f"| {label} | {len(g)} | {_fmt(acc)} | {_fmt(asr)} | "
                     f"{_fmt([r['result']['before']['acc'] for r in g])} | {_fmt([r['result']['before']['asr'] for r in g])} |")

    def draw(plt):
        fig, ax = plt.subplots(figsize=(6, 3.6))
        xs = range(len(stats))
        for off, idx, name in ((-0.2, 1, "ACC"), (0.2, 2, "ASR")):
            ms = [100 * _mean_sd(s[idx])[0] if s[idx] else 0 for s in stats]
            sds = [100 * (_mean_sd(s[idx])[1] or 0) if s[idx] else 0 for s in stats]
            ax.bar([x + off for x in xs], ms, width=0.4, yerr=sds, label=name)
        ax.set_xticks(list(xs), [s[0] for s in stats])
        ax.set_xlabel("l2 norm bound")
        ax.set_ylabel("%")
        ax.legend()
        return fig

    png = _plot(fig_dir, exp.name, draw) if stats else None
    if png:
        lines += ["", f"![{exp.title}]({png})"]
    return lines


def tsne_separation(emb: dict[str, Any], labels: list[int], labels_trig: list[int]) -> float:
    """Share of triggered points whose nearest clean-class centroid (in the 2-D embedding)
    is their true class."""
    sums: dict[int, list[float]] = {}
    for (a, b), y in zip(emb["clean"], labels):
        s = sums.setdefault(y, [0.0, 0.0, 0])
        s[0] += a
        s[1] += b
        s[2] += 1
    cents = {y: (s[0] / s[2], s[1] / s[2]) for y, s in sums.items()}
    hits = 0
    for (a, b), y in zip(emb["triggered"], labels_trig):
        near = min(cents, key=lambda k: (cents[k][0] - a) ** 2 + (cents[k][1] - b) ** 2)
        hits += near == y
    return hits / max(1, len(labels_trig))


def _tsne_figure(exp: Experiment, recs: list[dict[str, Any]], profile: str, fig_dir: Path) -> list[str]:
    lines = ["Triggered test images (non-target classes) whose 10 nearest clean test images in the model's "
             "penultimate feature space mostly carry the triggered image's TRUE class (the clean images' own "
             "leave-one-out share is the ceiling), and the same with class centroids in the 2-D t-SNE map.", "",
             "| cell | ACC / ASR before (%) | after | kNN true class: before | after | ceiling (clean, after) "
             "| t-SNE centroid: before | after |", "|---|---|---|---|---|---|---|---|"]
    for r in recs:
        t = r["result"].get("tsne")
        if not t:
            continue
        sb = tsne_separation(t["before"], t["labels"], t["labels_triggered"])
        sa = tsne_separation(t["after"], t["labels"], t["labels_triggered"])
        b, a = r["result"]["before"], r["result"]["after"]
        knn = t.get("knn", {})
        kb, ka = (knn.get(w, {}).get("triggered_true_class") for w in ("before", "after"))
        ceil = knn.get("after", {}).get("clean_leave_one_out")
        pct = (lambda v: "-" if v is None else f"{100 * v:.1f}%")
        lines.append(f"| {r['label']} | {100 * b['acc']:.1f} / {100 * b['asr']:.1f} | {100 * a['acc']:.1f} / "
                     f"{100 * a['asr']:.1f} | {pct(kb)} | {pct(ka)} | {pct(ceil)} | {100 * sb:.1f}% | {100 * sa:.1f}% |")

        def draw(plt, t=t):
            fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
            for ax, when in zip(axes, ("before", "after")):
                cl, tr = t[when]["clean"], t[when]["triggered"]
                ax.scatter([p[0] for p in cl], [p[1] for p in cl], c=t["labels"], cmap="tab10", s=6, vmin=0, vmax=9)
                ax.scatter([p[0] for p in tr], [p[1] for p in tr], c=t["labels_triggered"], cmap="tab10", s=18,
                           marker="x", vmin=0, vmax=9)
                ax.set_title(f"{when} I-BAU (dots: clean, x: triggered; colour: true class)")
                ax.set_xticks([])
                ax.set_yticks([])
            return fig

        png = _plot(fig_dir, exp.name, draw)
        if png:
            lines += ["", f"![{exp.title}]({png})"]
        break
    return lines


def _rounds_figure(exp: Experiment, recs: list[dict[str, Any]], profile: str, fig_dir: Path) -> list[str]:
    lines = []
    for r in recs:
        hist = r["result"]["history"]
        multi = "asr_per_trigger" in hist[0]
        lines += [f"**{_row(exp, r)}** (`{r['label']}`), per round (%):", "",
                  "| round | ACC | ASR" + (" (mean) | per trigger" if multi else "") + " | seconds |",
                  "|---|---|---|" + ("---|" if multi else "") + "---|"]
        for i, h in enumerate(hist):
            per = (" | " + ", ".join(f"{100 * v:.0f}" for v in h["asr_per_trigger"])) if multi else ""
            lines.append(f"| {i} | {100 * h['acc']:.1f} | {100 * h['asr']:.1f}{per} | {h.get('elapsed', 0):.0f} |")
        lines.append("")

    def draw(plt):
        fig, axes = plt.subplots(1, len(recs), figsize=(5 * len(recs), 3.6), squeeze=False)
        for ax, r in zip(axes[0], recs):
            hist = r["result"]["history"]
            ax.plot([100 * h["acc"] for h in hist], label="ACC", color="black")
            if "asr_per_trigger" in hist[0]:
                names = exp.meta.get("triggers", [])
                for j in range(len(hist[0]["asr_per_trigger"])):
                    name = names[j] if j < len(names) else f"trigger {j + 1}"
                    ax.plot([100 * h["asr_per_trigger"][j] for h in hist], lw=1, alpha=0.7, label=f"ASR {name}")
            else:
                ax.plot([100 * h["asr"] for h in hist], label="ASR", color="tab:red")
            ax.set_title(_row(exp, r))
            ax.set_xlabel("round")
            ax.set_ylabel("%")
            ax.legend(fontsize=7)
        return fig

    png = _plot(fig_dir, exp.name, draw) if recs else None
    if png:
        lines += [f"![{exp.title}]({png})"]
    return lines


def _error_gap_table(exp: Experiment, recs: list[dict[str, Any]], profile: str, fig_dir: Path) -> list[str]:
    lines = ["Error = share of triggered images not classified as their true label. Gap = |error on unseen test "
             "images − error on the clean set I-BAU used| (%), mean ± s.d. over seeds.", "",
             "| | seeds | ACC / ASR before | ACC / ASR after | error: clean set | error: test | gap (ours) | gap (paper) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in _rows_in_order(exp, profile):
        g = [r for r in recs if _row(exp, r) == row and "error_gap" in r["result"]]
        p = exp.paper.get(row)
        if not g:
            lines.append(f"| {row} | 0 | not run | | | | | {p if p is not None else '-'} |")
            continue
        res = [r["result"] for r in g]
        lines.append(
            f"| {row} | {len(g)} | {_fmt([x['before']['acc'] for x in res])} / {_fmt([x['before']['asr'] for x in res])} | "
            f"{_fmt([x['after']['acc'] for x in res])} / {_fmt([x['after']['asr'] for x in res])} | "
            f"{_fmt([x['error_gap']['clean_set_error'] for x in res])} | {_fmt([x['error_gap']['eval_error'] for x in res])} | "
            f"{_fmt([x['error_gap']['gap'] for x in res], digits=2)} | {p if p is not None else '-'} |")
    return lines


def _rounds_of(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """The history points after ``before`` (I-BAU: one per round, in order)."""
    return [h for h in rec["result"]["history"] if h.get("point") != "before"]


def _ablation_point(rec: dict[str, Any], r: int) -> tuple[float, float] | None:
    """(ACC drop in points from the same cell's ``before``, ASR in %) after round ``r`` (1-based)."""
    rounds = _rounds_of(rec)
    if len(rounds) < r:
        return None
    return 100 * (rec["result"]["before"]["acc"] - rounds[r - 1]["acc"]), 100 * rounds[r - 1]["asr"]


def _meets(point: tuple[float, float] | None, target: list[float] | None) -> bool:
    """The issue's target ``[max ASR, max ACC drop]`` (fractions) met by ``point`` (points, %)."""
    return point is not None and target is not None and point[1] <= 100 * target[0] and point[0] <= 100 * target[1]


def _ablation_lines(meta: dict[str, Any], recs: list[dict[str, Any]], per_model: bool,
                    rows: dict[str, str] | None = None) -> list[str]:
    """Per variant and clean-set size: mean ± s.d. over the models of the ACC drop and ASR after
    each round, and how many models meet the issue's targets; optionally a row per model."""
    recs = [r for r in recs if r["params"]["defense"] != "none"]
    variants = dict(meta.get("variants", {}))
    targets = {int(k): v for k, v in meta.get("targets", {}).items()}
    by: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in recs:
        by[(r["params"].get("variant", "-"), int(r["params"]["protocol"]["clean_size"]))].append(r)
    order = list(variants) + sorted({v for v, _ in by} - set(variants))
    sizes = sorted({n for _, n in by}, reverse=True)
    n_rounds = max((len(_rounds_of(r)) for r in recs), default=0)

    def stat(values: list[float]) -> str:
        m, sd = _mean_sd(values)
        return "-" if math.isnan(m) else f"{m:.1f}" + (f" ± {sd:.1f}" if sd is not None else "")

    tgt = "; ".join(f"{n:,} images: ASR ≤ {100 * t[0]:g}%, ACC drop ≤ {100 * t[1]:g} points"
                    for n, t in sorted(targets.items(), reverse=True) if n in sizes)
    lines = ["Variants: " + "; ".join(f"**{v}** {variants.get(v, '')}".rstrip() for v in order) + ".", "",
             "ACC drop: points lost against the same model before I-BAU on the same evaluation images (negative: "
             "gained); ASR: non-target triggered images classified as the target (%). Mean ± s.d. over the cells "
             f"(models, and seeds where there are several); targets (issue 13): {tgt or '-'}; \"meet\": cells meeting "
             "both after that round. Seconds: I-BAU's own time per cell (evaluation excluded), mean.", "",
             "| variant | clean images | cells | " +
             " | ".join(f"ACC drop r{i} | ASR r{i} | meet r{i}" for i in range(1, n_rounds + 1)) + " | seconds |",
             "|---|---|---|" + "---|---|---|" * n_rounds + "---|"]
    for v in order:
        for n in sizes:
            g = by.get((v, n), [])
            if not g:
                continue
            cells = []
            for i in range(1, n_rounds + 1):
                pts = [p for p in (_ablation_point(r, i) for r in g) if p is not None]
                met = sum(_meets(p, targets.get(n)) for p in pts)
                cells += [stat([p[0] for p in pts]), stat([p[1] for p in pts]),
                          f"{met}/{len(pts)}" if n in targets else "-"]
            secs = stat([r["result"].get("seconds", math.nan) for r in g])
            lines.append(f"| {v} | {n:,} | {len(g)} | " + " | ".join(cells) + f" | {secs} |")
    if not per_model:
        return lines
    lines += ["", "Per model: ACC before / ASR before (%), then per variant the ACC drop (points) / ASR (%) after "
              "round 1 → after the last round; ✓: the last round meets the target of its clean-set size.", "",
              "| model | clean images | before | " + " | ".join(order) + " |", "|---|---|---|" + "---|" * len(order)]
    models = list(dict.fromkeys(r["params"]["model"]["name"] for r in recs))
    for m in models:
        for n in sizes:
            g: dict[str, list[dict]] = defaultdict(list)
            for r in recs:
                if r["params"]["model"]["name"] == m and int(r["params"]["protocol"]["clean_size"]) == n:
                    g[r["params"].get("variant", "-")].append(r)
            if not g:
                continue
            b = next(iter(g.values()))[0]["result"]["before"]
            cells = []
            for v in order:
                rs = g.get(v)
                if not rs:
                    cells.append("not run")
                elif len(rs) == 1:
                    pts = [_ablation_point(rs[0], i) for i in range(1, len(_rounds_of(rs[0])) + 1)]
                    txt = " → ".join(f"{p[0]:.1f} / {p[1]:.1f}" for p in pts)
                    cells.append(txt + (" ✓" if pts and _meets(pts[-1], targets.get(n)) else ""))
                else:  # several seeds (clean set and I-BAU): the last round, mean ± s.d., seeds meeting the target
                    last = [_ablation_point(r, len(_rounds_of(r))) for r in rs if _rounds_of(r)]
                    met = sum(_meets(p, targets.get(n)) for p in last)
                    cells.append(f"{stat([p[0] for p in last])} / {stat([p[1] for p in last])} "
                                 f"({met}/{len(last)} seeds ✓)")
            lines.append(f"| {(rows or {}).get(m, m)} | {n:,} | {100 * b['acc']:.1f} / {100 * b['asr']:.1f} | "
                         + " | ".join(cells) + " |")
    return lines


def _ablation_table(exp: Experiment, recs: list[dict[str, Any]], profile: str, fig_dir: Path) -> list[str]:
    """An I-BAU ablation (issue 13) over the models of one file: summary and a row per model."""
    return _ablation_lines(exp.meta, recs, per_model=True, rows=exp.meta.get("rows"))


def _ablation_summary(exp: Experiment, recs_by_exp: dict[str, list[dict]], profile: str, fig_dir: Path) -> list[str]:
    """The same summary over the cells of the files named by the profile's ``derive_from``."""
    recs = [r for src in exp.profile(profile).get("derive_from", []) for r in recs_by_exp.get(src, [])]
    srcs = ", ".join(f"`{s}`" for s in exp.profile(profile).get("derive_from", []))
    n_ib = sum(r["params"]["defense"] != "none" for r in recs)
    return [f"Read from {n_ib} finished defense cells of {srcs} (their sections below count the cells still to run "
            "and give a row per model).", ""] + _ablation_lines(exp.meta, recs, per_model=False)


#: layouts that read other experiments' cells (the profile's ``derive_from``):
#: renderer(experiment, records by experiment name, profile, figure folder) -> markdown lines
DERIVED_LAYOUTS: dict[str, Callable[..., list[str]]] = {"time_table": _time_table, "ablation_summary": _ablation_summary}

#: layout name -> renderer(experiment, records, profile, figure folder) -> markdown lines
LAYOUTS: dict[str, Callable[..., list[str]]] = {
    "defense_table": _defense_table, "multi_table": _multi_table, "stability_figure": _stability_figure,
    "normbound_figure": _normbound_figure, "tsne_figure": _tsne_figure, "rounds_figure": _rounds_figure,
    "error_gap_table": _error_gap_table, "ablation_table": _ablation_table,
}


def _plot(fig_dir: Path, name: str, draw) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig_dir.mkdir(parents=True, exist_ok=True)
    fig = draw(plt)
    fig.tight_layout()
    path = fig_dir / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"{fig_dir.name}/{path.name}"


# ----------------------------------------------------------------------------- verdicts
def verdicts(recs_by_exp: dict[str, list[dict]], exps: dict[str, Experiment], profile: str) -> list[tuple[str, str, str]]:
    """(claim, verdict, evidence) for the paper's headline claims."""
    out = []

    def cells(claim, defense=None):
        """The cells of the experiments that declare ``evidence_for = [claim, ...]``."""
        names = [n for n, e in exps.items() if claim in e.meta.get("evidence_for", [])]
        return [r for n in names for r in recs_by_exp.get(n, [])
                if defense is None or r["params"]["defense"] == defense]

    # 1. I-BAU effective everywhere
    ib = cells("effective", "ibau")
    fails = [r["label"] for r in ib if _failed(r)]
    out.append(("I-BAU is effective (ASR < 20%, ACC drop ≤ 10 points) on every attack (Tables 1-3)",
                _verdict(len(ib), len(ib) - len(fails)),
                f"{len(ib) - len(fails)}/{len(ib)} I-BAU cells effective" + (f"; not: {', '.join(fails)}" if fails else "")))
    # 2. every baseline fails somewhere
    base = cells("baselines_fail")
    ran = sorted({r["params"]["defense"] for r in base if r["params"]["defense"] in BASELINES})
    failing = {d for d in ran if any(_failed(r) for r in base if r["params"]["defense"] == d)}
    out.append(("Every baseline fails somewhere (ASR ≥ 20% or ACC drop > 10 points on some attack)",
                "not run" if not ran else ("reproduced" if failing == set(ran) else "partly reproduced" if failing else "not reproduced"),
                "; ".join(f"{NAMES[d]}: {'fails on ' + str(sum(_failed(r) for r in base if r['params']['defense'] == d)) if d in failing else 'never fails'}"
                          f" of {sum(1 for r in base if r['params']['defense'] == d)}" for d in ran) or "no baseline cell"))
    # 3. sensitivity
    sens = cells("sensitivity")
    ib_s = [r for r in sens if r["params"]["defense"] == "ibau"]
    ib_ok = [r for r in ib_s if not _failed(r)]
    at100 = [r for r in cells("sensitivity", "ibau") if r["params"]["protocol"]["clean_size"] == 100]
    base_fail = {d: sum(_failed(r) for r in sens if r["params"]["defense"] == d) for d in BASELINES
                 if any(r["params"]["defense"] == d for r in sens)}
    ok = bool(ib_s) and len(ib_ok) == len(ib_s) and all(v > 0 for v in base_fail.values())
    out.append(("I-BAU is the least sensitive to the poison ratio and the clean-set size, and works with 100 clean "
                "images (Tables 4-5)",
                "not run" if not ib_s else ("reproduced" if ok else ("partly reproduced" if ib_ok else "not reproduced")),
                f"I-BAU effective in {len(ib_ok)}/{len(ib_s)} settings"
                + (f" (100 images: {'effective' if at100 and not _failed(at100[0]) else 'not effective'})" if at100 else "")
                + ("; baseline failures: " + ", ".join(f"{NAMES[d]} {n}" for d, n in base_fail.items()) if base_fail else "")))
    # 4. time to take effect
    claim = ("I-BAU takes effect fastest, by a large factor (≥ 5x the fastest baseline that takes effect; the paper: "
             "6.6x to 450x) (Table 6)")
    times = _effect_times([r for r in cells("speed") if not _multi_target(r)])
    ibt, ib_n = times.get("ibau", ([], 0))
    fastest = _fastest_baseline(times)
    if not ib_n:
        out.append((claim, "not run", "no I-BAU cells"))
    elif not ibt:
        out.append((claim, "not reproduced", "I-BAU never took effect"))
    elif not any(d in BASELINES for d in times):
        out.append((claim, "not run", f"I-BAU {_mean_sd(ibt)[0]:.1f} s; no baseline cell yet"))
    else:
        m = _mean_sd(ibt)[0]
        ratio = fastest[1] / m if fastest else math.inf
        verdict = "reproduced" if ratio >= 5 else "partly reproduced" if ratio > 1 else "not reproduced"
        never = [NAMES[d] for d, (ts, _) in times.items() if d in BASELINES and not ts]
        out.append((claim, verdict, f"I-BAU {m:.1f} s (effective on {len(ibt)}/{ib_n}); "
                    + (f"fastest effective baseline {NAMES[fastest[0]]} {fastest[1]:.1f} s: {ratio:.2g}x"
                       if fastest else "no baseline took effect")
                    + (f"; never took effect: {', '.join(never)}" if never else "")))
    # 5. stability
    st = cells("stability")
    if not st:
        out.append(("I-BAU is stabler across seeds than the naive heuristic (Figure 1)", "not run", "no cells"))
    else:
        sd = {}
        final = {}
        for d in ("ibau", "naive_uap"):
            cs = _curves([r for r in st if r["params"]["defense"] == d], "asr")
            if len(cs) > 1:
                n = min(len(c) for c in cs)
                sd[d] = statistics.fmean(statistics.stdev([c[i] for c in cs]) for i in range(1, n))
                final[d] = statistics.fmean(c[n - 1] for c in cs)
        if len(sd) < 2:
            out.append(("I-BAU is stabler across seeds than the naive heuristic (Figure 1)", "not run", "too few seeds"))
        else:
            better = sd["ibau"] < sd["naive_uap"]
            lower = final["ibau"] <= final["naive_uap"]
            out.append(("I-BAU is stabler across seeds than the naive heuristic (Figure 1)",
                        "reproduced" if better and lower else ("partly reproduced" if better else "not reproduced"),
                        f"mean over rounds of the ASR s.d. across seeds: I-BAU {100 * sd['ibau']:.1f}, naive "
                        f"{100 * sd['naive_uap']:.1f} points; final mean ASR: I-BAU {100 * final['ibau']:.1f}%, naive "
                        f"{100 * final['naive_uap']:.1f}%"))
    out += _figure_verdicts(recs_by_exp, exps)
    return out


def _figure_verdicts(recs_by_exp: dict[str, list[dict]], exps: dict[str, Experiment]) -> list[tuple[str, str, str]]:
    """Verdicts for the experiments whose file declares ``verdict = "..."`` (one rule per layout)."""
    out = []
    for name, e in exps.items():
        rule = VERDICT_RULES.get(e.meta.get("verdict", ""))
        if rule is None:
            continue
        recs = recs_by_exp.get(name, [])
        claim = f"{e.meta.get('claim', e.title)} ({e.title.split(':')[0]})"
        out.append((claim, *rule(e, recs)) if recs else (claim, "not run", "no cells"))
    return out


def _bound_rule(e: Experiment, recs: list[dict]) -> tuple[str, str]:
    axis = e.meta.get("axis", "settings.ibau.norm_bound")
    by: dict[Any, list[dict]] = defaultdict(list)
    for r in recs:
        by[r["params"]["axes"].get(axis)].append(r)
    asr = {k: _mean_sd([x["result"]["after"]["asr"] for x in v])[0] for k, v in by.items()}
    big = [k for k in asr if k == "none" or (isinstance(k, (int, float)) and k >= 10)]
    small = [k for k in asr if isinstance(k, (int, float)) and k < 1]
    ok_big = all(asr[k] < EFFECTIVE_ASR for k in big)
    ok_small = all(asr[k] >= EFFECTIVE_ASR for k in small)
    text = ", ".join(f"bound {k}: ASR {100 * v:.1f}%" for k, v in asr.items())
    # the claim is about large bounds; the small bound's failure is the secondary half
    return ("reproduced" if ok_big and ok_small and big else "partly reproduced" if ok_big and big else
            "not reproduced"), text


def _tsne_rule(e: Experiment, recs: list[dict]) -> tuple[str, str]:
    t = recs[0]["result"].get("tsne")
    if not t or "knn" not in t:
        return "not run", "no embedding"
    kb, ka = t["knn"]["before"]["triggered_true_class"], t["knn"]["after"]["triggered_true_class"]
    ceil = t["knn"]["after"]["clean_leave_one_out"]
    verdict = ("reproduced" if ka > kb + 0.2 and ka > 0.5 * ceil else
               "partly reproduced" if ka > kb + 0.05 else "not reproduced")
    return verdict, (f"triggered images whose nearest clean neighbours (features) carry their true class: "
                     f"{100 * kb:.0f}% before, {100 * ka:.0f}% after one round (clean images: {100 * ceil:.0f}%)")


def _rounds_rule(e: Experiment, recs: list[dict]) -> tuple[str, str]:
    parts, good = [], 0
    for r in recs:
        h = r["result"]["history"]
        first = next((i for i, x in enumerate(h) if i and x["asr"] < EFFECTIVE_ASR), None)
        worst = max(h[-1].get("asr_per_trigger", [h[-1]["asr"]]))
        ok = first is not None and h[0]["acc"] - h[first]["acc"] <= MAX_ACC_DROP
        good += ok
        parts.append(f"{_row(e, r)}: ASR {100 * h[0]['asr']:.0f}% → {100 * h[-1]['asr']:.0f}% in {len(h) - 1} rounds"
                     + (f" (< 20% at round {first}, ACC {100 * h[first]['acc']:.1f}%)" if first is not None else
                        " (never < 20%)") + (f", worst trigger {100 * worst:.0f}%" if "asr_per_trigger" in h[-1] else ""))
    return _verdict(len(recs), good), "; ".join(parts)


def _gap_rule(e: Experiment, recs: list[dict]) -> tuple[str, str]:
    by: dict[str, list[float]] = defaultdict(list)
    for r in recs:
        if "error_gap" in r["result"]:
            by[_row(e, r)].append(r["result"]["error_gap"]["gap"])
    order = [row for row in e.meta.get("gap_order", []) if row in by] or list(by)
    means = [_mean_sd(by[row])[0] for row in order]
    small = all(m < 0.01 for m in means)
    falling = all(a >= b for a, b in zip(means, means[1:]))
    text = ", ".join(f"{row}: {100 * m:.2f} pts" for row, m in zip(order, means))
    return ("reproduced" if small and falling else "partly reproduced" if small or falling else "not reproduced"), text


VERDICT_RULES: dict[str, Callable[[Experiment, list[dict]], tuple[str, str]]] = {
    "norm_bound": _bound_rule, "tsne": _tsne_rule, "rounds": _rounds_rule, "error_gap": _gap_rule,
}


def _verdict(n: int, ok: int) -> str:
    if n == 0:
        return "not run"
    return "reproduced" if ok == n else ("partly reproduced" if ok else "not reproduced")


# ----------------------------------------------------------------------------- document
def _report_order(e: Experiment) -> tuple[int, int, str]:
    import re

    m = re.match(r"(table|fig)(\d+)", e.name)
    return (0 if e.name.startswith("table") else 1, int(m.group(2)) if m else 99, e.name)


DEVIATIONS = [
    "Data: the `paper` profiles use the paper's sizes; the `cpu` profiles shrink the clean set, the evaluation set, "
    "the budgets and the number of seeds, and use weaker CPU-trained models where the authors released none — "
    "each file's `about` below says how. A `cpu` number is evidence about the method at that scale, not a "
    "re-measurement of the paper's cell.",
    "CIFAR-10 test images: 1,000 are lossless (they measure ACC/ASR); the other 9,000 are a JPEG-75 copy, used "
    "only as the defender's clean set.",
    "Stopping: every defense stops at its first point with ASR < 20% (Tables 1-5, 7-8). The paper instead shows "
    "I-BAU \"when the ACC falls to the same level as the most effective baseline\" (Table 1) and after 100 rounds "
    "on GTSRB (Table 2), so our I-BAU cells are at an earlier, usually higher-ACC, point.",
    "I-BAU: the l2 projection is on (the authors' command-line script leaves it off), at least one image per "
    "outer batch is perturbed, and the perturbed images are drawn from a seeded generator (see `ibau.IBAU`).",
    "Triggers of the released models are the authors' trigger images, read only to measure ASR; models the "
    "runner trains use the package's own triggers (or those images where the config names them).",
    "Naive heuristic (Figure 1): the paper gives no settings; ours shares I-BAU's and replaces the implicit "
    "hypergradient by the plain gradient at a projected-gradient universal perturbation (`ibau.defenses.NaiveUAP`).",
    "Error gap (Tables 7-8): error = triggered image not classified as its true label, on the clean set I-BAU "
    "used versus on unseen test images; the paper does not define the error further.",
]


def write_report(experiments: list[Experiment], results: str | Path, out: str | Path, *, profile: str = "cpu",
                 command: str | None = None) -> Path:
    """Write the markdown report (and its figures in ``OUT_STEM_figures/``)."""
    from ..io import atomic_write

    results, out = Path(results), Path(out)
    experiments = sorted(experiments, key=_report_order)
    fig_dir = out.parent / f"{out.stem}_figures"
    exps = {e.name: e for e in experiments}
    recs_by_exp = {e.name: collect(e, results, profile) for e in experiments}
    all_recs = [r for rs in recs_by_exp.values() for r in rs]
    # the code version: git's, else the digest of the package's files (grids run from a copy of src)
    envs = sorted({(r["environment"].get("torch"), r.get("device"),
                    r.get("git") or (f"source {r['source_sha256']}" if r.get("source_sha256") else None))
                   for r in all_recs}, key=str)
    total_s = sum(r.get("wall_seconds", 0) for r in all_recs)
    # a report of experiments that test none of the paper's claims (e.g. the ablation) has no verdicts
    claims = any(e.meta.get("evidence_for") or e.meta.get("verdict") for e in experiments)
    configs = "benchmarks/configs/*.toml" if claims else " ".join(str(e.path or e.name) for e in experiments)
    heading = "Reproduction of Zeng et al. (ICLR 2022)" if claims else "I-BAU experiments (not the paper's tables)"
    lines = [f"# {heading}, profile `{profile}`", "",
             "Generated by `" + (command or f"ibau bench report {configs} --profile {profile} "
                                 f"--results {results} --out {out}") + "` from the per-cell JSON files in "
             f"`{results}/` (one file per cell: settings, code version, seed, per-point metrics, seconds, peak "
             "memory). Do not edit by hand.", "",
             f"{len(all_recs)} finished cells, {total_s / 3600:.1f} h of cell time in all; "
             f"environments (torch, device, code version): {', '.join(map(str, envs)) or 'none'}.", "",
             "## Protocol and conventions", "",
             "- ACC: clean accuracy on held-out images; ASR: share of triggered images of NON-target classes "
             "classified as the attack's target (the authors' code also counts target-class images, which puts a "
             "floor near 1/C under their numbers); all-to-all: y → y+1; several triggers: the mean over triggers.",
             "- Effective: ASR < 20% (the paper's line) with an ACC drop of at most 10 points; a defense stops at its "
             "first point (I-BAU round, epoch...) with ASR < 20% where the experiment says `stop_asr`, else it runs "
             "its budget. Times exclude evaluation.",
             "- Each experiment below states its profile's sizes and deviations from the paper (`about`), verbatim "
             "from its config file."]
    if claims:
        lines += ["", "Deviations from the paper that hold throughout:", ""]
        lines += [f"- {d}" for d in DEVIATIONS]
        lines += ["",
                 "## Verdicts on the paper's claims", "", "| claim | verdict | evidence |", "|---|---|---|"]
        for claim, verdict, evidence in verdicts(recs_by_exp, exps, profile):
            lines.append(f"| {claim} | **{verdict}** | {evidence} |")
    for e in experiments:
        prof = e.profile(profile)
        lines += ["", f"## {e.title}", "", f"Config: `{e.path.name if e.path else e.name}`, profile `{profile}`. "
                  f"Claim: {e.meta.get('claim', '-')}", "", "> " + " ".join(prof.get("about", "").split()), ""]
        if e.layout in DERIVED_LAYOUTS:
            lines += DERIVED_LAYOUTS[e.layout](e, recs_by_exp, profile, fig_dir)
        else:
            recs = recs_by_exp[e.name]
            n = len(expand(e, profile))
            lines.append(f"{len(recs)}/{n} cells finished.")
            lines.append("")
            if recs:
                lines += LAYOUTS[e.layout](e, recs, profile, fig_dir)
            errors = _errors(e, results, profile)
            if errors:
                lines += ["", "Failed cells (retried on the next run): " + "; ".join(errors)]
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: Path(tmp).write_text(text), force=True)
    return out

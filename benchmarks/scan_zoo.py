"""The detection benchmark of ``ibau scan`` (issue 14): scan a zoo of backdoored and clean
models and report AUROC, the true-positive rate at 5% false positives, the share of
one-target models whose target is named, and seconds per model.

Usage (from the project root)::

    python benchmarks/scan_zoo.py train  [--data-dir ../shared/data] [--cache /tmp/cache] [--workers 2]
    python benchmarks/scan_zoo.py scan   [--data-dir ../shared/data] [--cache /tmp/cache] [--only NAME ...]
    python benchmarks/scan_zoo.py scan --precision bf16   # the same scans under bfloat16 autocast
    python benchmarks/scan_zoo.py unlearn --only NAME ...   # the scan before and after ibau.unlearn
    python benchmarks/scan_zoo.py report

``train`` builds the trained models of the zoo through the grid's model cache (the same recipe
gives the same weights on one machine); ``scan`` writes one JSON per model under
``benchmarks/results/scan_zoo/`` (the scan's report, the attack's ASR on held-out images,
config, versions, timings); ``report`` generates ``benchmarks/results/scan_zoo.md`` from those
files only. Scan timings are meant to be taken alone (``--threads 2``, nothing else running).
``--precision bf16`` (issue 15) scans under bfloat16 autocast into ``benchmarks/results/scan_zoo_bf16/``;
the report compares the two.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CONFIG = ROOT / "configs" / "scan_zoo.toml"
RESULTS = ROOT / "results" / "scan_zoo"
REPORT = ROOT / "results" / "scan_zoo.md"


def _results(precision: str, mask_tv: float = 0.0, explore_images: int | None = None, steps: int | None = None,
             prior_correction: bool = False, max_over_prediction: float | None = None) -> Path:
    """Where the scans of one precision (and mask_tv, explore_images, steps, prior_correction) are kept
    (float32: ``scan_zoo/``)."""
    name = "scan_zoo" + ("" if precision == "fp32" else f"_{precision}") + (f"_tv{mask_tv:g}" if mask_tv else "") \
        + ("_pc" if prior_correction else "") \
        + (f"_op{max_over_prediction:g}" if max_over_prediction is not None else "") \
        + (f"_e{explore_images}" if explore_images is not None else "") + (f"_s{steps}" if steps is not None else "")
    return RESULTS.with_name(name)


def _zoo(data_dir: str, cache: str) -> tuple[dict, dict]:
    from ibau.bench.spec import read_toml, substitute

    raw = read_toml(CONFIG, "zoo file")
    models = substitute(raw["models"], {"data": data_dir, "cache": cache})
    return raw["scan"], models


def _load(name: str, entry: dict, data_dir: str, cache: str, x_like):
    import torch

    from ibau.bench import data as bdata
    from ibau.bench.sources import load_model

    return load_model({"name": name, **entry}, entry["dataset"], data_dir, Path(cache), torch.device("cpu"),
                      bdata.NUM_CLASSES[entry["dataset"]], x_like)


def _train_one(args: tuple[str, dict, str, str, int]) -> str:
    import torch

    name, entry, data_dir, cache, threads = args
    torch.set_num_threads(threads)
    from ibau.bench import data as bdata

    x = bdata.load(entry["dataset"], data_dir, "test")["x"][:2]
    t0 = time.perf_counter()
    _load(name, entry, data_dir, cache, x)
    return f"{name}: ready ({time.perf_counter() - t0:.0f} s)"


def train(args) -> None:
    import multiprocessing as mp

    _, models = _zoo(args.data_dir, args.cache)
    todo = [(n, e, args.data_dir, args.cache, 1) for n, e in models.items() if "train" in e
            and (not args.only or n in args.only)]
    if args.workers <= 1:
        for t in todo:
            print(_train_one(t), flush=True)
        return
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for line in pool.imap_unordered(_train_one, todo):
            print(line, flush=True)


def _targets(attack) -> list[int] | str | None:
    """The attack's target class(es): a list, ``"all"`` for all-to-all, ``None`` for a clean model."""
    if attack is None:
        return None
    if getattr(attack, "name", "") == "all_to_all" or type(attack).__name__ == "AllToAll":
        return "all"
    targets = getattr(attack, "targets", None)
    if targets is not None:
        return sorted({int(t) for t in targets})
    return [int(attack.target)]


def scan(args) -> None:
    import torch

    import ibau
    from ibau.bench import data as bdata
    from ibau.bench.tasks import _metrics
    from ibau.io import write_json
    from ibau.utils import environment

    torch.set_num_threads(args.threads)
    settings, models = _zoo(args.data_dir, args.cache)
    results = _results(args.precision, args.mask_tv, args.explore_images, args.steps, args.prior_correction,
                       args.max_over_prediction)
    results.mkdir(parents=True, exist_ok=True)
    for name, entry in models.items():
        if args.only and name not in args.only:
            continue
        out = results / f"{name}.json"
        if out.exists() and not args.force:
            print(f"{name}: done already", flush=True)
            continue
        protocol = {"clean_size": settings["clean_size"], "split_seed": settings["split_seed"],
                    "eval_size": settings["eval_size"]}
        (xc, yc), (xe, ye) = bdata.protocol_split(entry["dataset"], args.data_dir, protocol)
        model, attack, source = _load(name, entry, args.data_dir, args.cache, xe)
        if attack is not None:
            measured = _metrics(model, attack, xe, ye, 500)
        else:
            from ibau.metrics import clean_accuracy

            measured = {"acc": clean_accuracy(model, xe, ye), "asr": None}
        t0 = time.perf_counter()
        result = ibau.scan(model, xc, yc, seed=args.seed, progress=not args.quiet, precision=args.precision,
                           mask_tv=args.mask_tv, **({"prior_correction": True} if args.prior_correction else {}),
                           max_over_prediction=args.max_over_prediction,
                           **({} if args.explore_images is None else {"explore_images": args.explore_images}),
                           **({} if args.steps is None else {"steps": args.steps}))
        seconds = time.perf_counter() - t0
        record = {"model": name, "entry": {k: v for k, v in entry.items()}, "source": source,
                  "truth": {"backdoored": attack is not None, "targets": _targets(attack)},
                  "before": measured, "scan": result.as_dict(), "seconds": seconds,
                  "threads": torch.get_num_threads(), "clean_size": len(xc), "versions": environment()}
        write_json(record, out, force=True)
        verdict = "BACKDOOR" if result.backdoored else "clean"
        print(f"{name}: {verdict} targets={result.target_classes} score={result.score:.2f} "
              f"truth={record['truth']} {seconds:.0f} s", flush=True)


def unlearn_scan(args) -> None:
    """The scan before and after ``ibau.unlearn`` (default recipe, its rounds) on zoo models:
    does the verdict follow the real ASR? One JSON per model under ``results/scan_unlearn/``."""
    import torch

    from ibau.bench import data as bdata
    from ibau.bench.tasks import _metrics
    from ibau.io import write_json
    from ibau.unlearn import unlearn
    from ibau.utils import environment

    torch.set_num_threads(args.threads)
    settings, models = _zoo(args.data_dir, args.cache)
    folder = ROOT / "results" / "scan_unlearn"
    folder.mkdir(parents=True, exist_ok=True)
    for name in args.only or []:
        entry = models[name]
        out = folder / f"{name}.json"
        if out.exists() and not args.force:
            continue
        protocol = {"clean_size": args.clean_size, "split_seed": settings["split_seed"],
                    "eval_size": settings["eval_size"]}
        (xc, yc), (xe, ye) = bdata.protocol_split(entry["dataset"], args.data_dir, protocol)
        model, attack, source = _load(name, entry, args.data_dir, args.cache, xe)
        before = _metrics(model, attack, xe, ye, 500)
        t0 = time.perf_counter()
        res = unlearn(model, xc, yc, seed=args.seed, progress=not args.quiet)
        seconds = time.perf_counter() - t0
        after = _metrics(model, attack, xe, ye, 500)
        rep = res.report
        record = {"model": name, "truth": {"backdoored": attack is not None, "targets": _targets(attack)},
                  "clean_size": len(xc), "before": before, "after": after, "scan_before": rep["scan_before"],
                  "scan_after": rep["scan_after"], "stop_reason": rep["stop_reason"], "rounds": rep["rounds"],
                  "reversed_classes": rep.get("reversed_classes", []),
                  "seconds": seconds, "config": rep["config"], "versions": environment()}
        write_json(record, out, force=True)
        print(f"{name}: ASR {before.get('asr')} -> {after.get('asr')}; scan {rep['scan_before']['score']:.2f} "
              f"{rep['scan_before']['target_classes']} -> {rep['scan_after']['score']:.2f} "
              f"{rep['scan_after']['target_classes']}", flush=True)


def time_alone(args) -> None:
    """The scan's wall time measured alone (nothing else running, ``--threads``), for the models
    given: ``results/scan_zoo_timing.json``. The zoo's own seconds were taken with other jobs
    sharing the cores."""
    import torch

    import ibau
    from ibau.bench import data as bdata
    from ibau.io import write_json
    from ibau.utils import PeakRSS, environment

    torch.set_num_threads(args.threads)
    settings, models = _zoo(args.data_dir, args.cache)
    rows = []
    for name in args.only or []:
        entry = models[name]
        protocol = {"clean_size": settings["clean_size"], "split_seed": settings["split_seed"],
                    "eval_size": settings["eval_size"]}
        (xc, yc), (xe, _) = bdata.protocol_split(entry["dataset"], args.data_dir, protocol)
        model, _, _ = _load(name, entry, args.data_dir, args.cache, xe)
        with PeakRSS() as peak:
            t0 = time.perf_counter()
            res = ibau.scan(model, xc, yc, seed=args.seed, progress=False, precision=args.precision)
            seconds = time.perf_counter() - t0
        rows.append({"model": name, "dataset": entry["dataset"], "precision": args.precision, "seconds": seconds,
                     "threads": args.threads, "peak_rss_mb": peak.peak / 2**20, "backdoored": res.backdoored,
                     "score": res.score})
        print(f"{name}: {seconds:.1f} s alone on {args.threads} threads ({args.precision})", flush=True)
    path = ROOT / "results" / "scan_zoo_timing.json"
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    new = {(r["model"], r["precision"]) for r in rows}
    kept = [r for r in old if (r["model"], r.get("precision", "fp32")) not in new]
    write_json({"rows": kept + rows, "versions": environment()}, path, force=True)


def _auroc(pos: list[float], neg: list[float]) -> float:
    """Probability that a backdoored model scores above a clean one (ties count half)."""
    if not pos or not neg:
        return math.nan
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def _tpr_at(pos: list[float], neg: list[float], fpr: float) -> float:
    """True-positive rate at the lowest score threshold whose false-positive rate is <= ``fpr``."""
    if not pos or not neg:
        return math.nan
    allowed = math.floor(fpr * len(neg))
    ranked = sorted(neg, reverse=True)
    threshold = ranked[allowed] if allowed < len(ranked) else -math.inf  # scores must exceed this
    return sum(p > threshold for p in pos) / len(pos)


def _tally(records: list[dict]) -> dict[str, list]:
    """What the zoo's headline numbers count: scores of backdoored (pos) and clean (neg) models, the clean
    models flagged, the backdoored ones found, the one-target ones and those whose target is named, seconds."""
    one = [r for r in records if isinstance(r["truth"]["targets"], list) and len(r["truth"]["targets"]) == 1]
    return {"pos": [r["scan"]["score"] for r in records if r["truth"]["backdoored"]],
            "neg": [r["scan"]["score"] for r in records if not r["truth"]["backdoored"]],
            "flagged_clean": [r["model"] for r in records if not r["truth"]["backdoored"] and r["scan"]["backdoored"]],
            "found": [r for r in records if r["truth"]["backdoored"] and r["scan"]["backdoored"]],
            "one_target": one,
            "named": [r for r in one if r["scan"]["backdoored"] and r["truth"]["targets"][0] in r["scan"]["target_classes"]],
            "secs": [r["seconds"] for r in records]}


def _measures(records: list[dict]) -> dict[str, str]:
    """The zoo's headline numbers over ``records``, formatted."""
    t = _tally(records)
    pos, neg, secs = t["pos"], t["neg"], t["secs"]
    return {"AUROC": f"{_auroc(pos, neg):.3f}", "true-positive rate at 5% false positives": f"{_tpr_at(pos, neg, 0.05):.2f}",
            "backdoored models flagged": f"{len(t['found'])}/{len(pos)}",
            "clean models flagged": f"{len(t['flagged_clean'])}/{len(neg)}",
            "one-target models whose target is named": f"{len(t['named'])}/{len(t['one_target'])}",
            "seconds per model (mean, cores shared)": f"{sum(secs) / len(secs):.0f}"}


def _load_dir(folder: Path) -> dict[str, dict]:
    """model -> scan record of one results folder (empty when it does not exist)."""
    return {r["model"]: r for r in (json.loads(q.read_text()) for q in sorted(folder.glob("*.json")))}


def _compare(records: list[dict], other: dict[str, dict], left: str, right: str, title: str, what: str) -> list[str]:
    """A report section: the headline measures and each model's verdict, ``records`` against the same
    models' scans in ``other`` (nothing when ``other`` is empty)."""
    same = [r for r in records if r["model"] in other]
    if not same:
        return []
    a, b = _measures(same), _measures([other[r["model"]] for r in same])
    lines = ["", title, "", f"The same {len(same)} scans with {what}.", "",
             f"| measure | {left} | {right} |", "|---|---|---|"]
    lines += [f"| {k} | {a[k]} | {b[k]} |" for k in a]
    lines += ["", f"| model | truth | {left}: verdict, classes, score | {right}: verdict, classes, score |",
              "|---|---|---|---|"]

    def cell(sc):
        return f"{'backdoor' if sc['backdoored'] else 'clean'} {sc['target_classes']} {sc['score']:.2f}"
    for r in same:
        t = r["truth"]
        truth = "clean" if not t["backdoored"] else f"backdoor → {t['targets']}"
        lines.append(f"| {r['model']} | {truth} | {cell(r['scan'])} | {cell(other[r['model']]['scan'])} |")
    return lines


def _rule_free(record: dict) -> dict:
    """``record`` with the verdict its own search gives without ``max_over_prediction``: the same kept
    norms, no class left out (what every folder but the ``_op`` ones was measured with)."""
    from ibau.scanning import judge

    sc = record["scan"]
    norms = {c["class"]: c["mask_l1"] for c in sc["per_class"]}
    score, targets, _ = judge(norms, [c["class"] for c in sc["per_class"] if c["kept"]], sc["threshold"])
    return {**record, "scan": {**sc, "score": score, "target_classes": targets, "backdoored": bool(targets)}}


def report(args) -> None:
    records = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    if not records:
        sys.exit("no results: run `python benchmarks/scan_zoo.py scan` first")
    t = _tally(records)
    pos, neg, flagged_clean, found = t["pos"], t["neg"], t["flagged_clean"], t["found"]
    one_target, named, secs = t["one_target"], t["named"], t["secs"]

    def nc_index(r):  # Neural Cleanse's statistic: the anomaly index of the smallest explored mask
        return max(c["anomaly_index"] for c in r["scan"]["per_class"]
                   if c["explore_l1"] <= min(x["explore_l1"] for x in r["scan"]["per_class"]))

    pos_nc = [nc_index(r) for r in records if r["truth"]["backdoored"]]
    neg_nc = [nc_index(r) for r in records if not r["truth"]["backdoored"]]
    lines = [
        "# `ibau scan`: detection benchmark (issue 14)", "",
        f"Generated by `python benchmarks/scan_zoo.py report` from {len(records)} JSON files in "
        "`benchmarks/results/scan_zoo/` (models: `benchmarks/configs/scan_zoo.toml`).", "",
        "Each model is scanned with 1,000 clean test images it was not trained on (CIFAR-10: seeded lossy "
        "test images); the attack's ASR is measured on 500 other images for the record. Score: the scan's "
        "score (higher = more suspicious); verdict at the scan's default threshold.", "",
        "The tables down to the prior-correction section were measured before the verdict rule of the seventeenth "
        "session (`max_over_prediction=2`, the default since: an over-predicted class is never flagged); its own "
        "section gives both verdicts on 23 new searches: 0/8 clean models flagged instead of 1/8, AUROC 0.975.", "",
        "| measure | value |", "|---|---|",
        f"| backdoored / clean models | {len(pos)} / {len(neg)} |",
        f"| AUROC (score) | {_auroc(pos, neg):.3f} |",
        f"| AUROC of Neural Cleanse's statistic on the same searches (anomaly index of the smallest mask "
        f"after the equal-budget phase) | {_auroc(pos_nc, neg_nc):.3f} |",
        f"| clean models over Neural Cleanse's threshold 2 on that statistic | "
        f"{sum(v > 2 for v in neg_nc)}/{len(neg_nc)} |",
        f"| true-positive rate at 5% false positives | {_tpr_at(pos, neg, 0.05):.2f} |",
        f"| backdoored models flagged (default threshold) | {len(found)}/{len(pos)} |",
        f"| clean models flagged (default threshold) | {len(flagged_clean)}/{len(neg)}"
        + (f" ({', '.join(flagged_clean)})" if flagged_clean else "") + " |",
        f"| one-target models whose target is named | {len(named)}/{len(one_target)} |",
        f"| seconds per model (mean / max) | {sum(secs) / len(secs):.0f} / {max(secs):.0f} |",
        "", "| model | dataset | truth | ACC / ASR (%) | verdict | named classes | score | NC index | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        t = r["truth"]
        truth = "clean" if not t["backdoored"] else f"backdoor → {t['targets']}"
        b = r["before"]
        asr = f"{100 * b['asr']:.1f}" if b.get("asr") is not None else "-"
        verdict = "backdoor" if r["scan"]["backdoored"] else "clean"
        lines.append(f"| {r['model']} | {r['entry']['dataset']} | {truth} | {100 * b['acc']:.1f} / {asr} | {verdict} | "
                     f"{r['scan']['target_classes']} | {r['scan']['score']:.2f} | {nc_index(r):.2f} | "
                     f"{r['seconds']:.0f} |")
    env = sorted({(r["versions"].get("torch"), r["versions"].get("ibau"), r["threads"]) for r in records})
    lines += ["", f"Environments (torch, ibau, threads): {env}. The seconds above were measured with two to four "
              "jobs sharing the 2 cores (one thread each); the scan alone:", ""]
    timing = ROOT / "results" / "scan_zoo_timing.json"
    if timing.exists():
        t = json.loads(timing.read_text())
        lines += ["| model | dataset | precision | seconds alone | threads | peak RSS (MB) |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['dataset']} | {r.get('precision', 'fp32')} | {r['seconds']:.1f} | "
                  f"{r['threads']} | {r['peak_rss_mb']:.0f} |" for r in t["rows"]]
    after = [json.loads(p.read_text()) for p in sorted((ROOT / "results" / "scan_unlearn").glob("*.json"))]
    if after:
        lines += ["", "## The scan before and after `ibau.unlearn`", "",
                  "Default recipe and rounds, seed 0, 2,500 clean images (the scan uses the 2,250 left after the "
                  "10% hold-out); ACC / ASR on the zoo's 500 held-out images. Where the recovery stamped the "
                  "scan's reversed trigger, \"clean\" after is weak evidence: the recovery unlearned exactly what "
                  "the scan finds (`python benchmarks/scan_zoo.py unlearn --only MODEL ...`). The files committed now "
                  "were measured with BF25R3AFDXGE on the second machine (an AMD EPYC), the scans above on the first.", "",
                  "| model | ACC / ASR before (%) | scan before | classes stamped in recovery | rounds | "
                  "ACC / ASR after (%) | scan after |",
                  "|---|---|---|---|---|---|---|"]
        for r in after:
            def cell(sc):
                v = f"backdoor -> {sc['target_classes']}" if sc["backdoored"] else "clean"
                return f"{v} ({sc['score']:.2f})"
            b, a = r["before"], r["after"]
            stamped = r.get("reversed_classes", "not recorded")
            lines.append(f"| {r['model']} | {100 * b['acc']:.1f} / {100 * b['asr']:.1f} | {cell(r['scan_before'])} | "
                         f"{stamped} | {r['rounds']} | {100 * a['acc']:.1f} / {100 * a['asr']:.1f} | "
                         f"{cell(r['scan_after'])} |")
    bf16 = _load_dir(_results("bf16"))
    lines += _compare(records, bf16, "float32", "bfloat16", "## bfloat16 autocast against float32 (issue 15)",
                      "`precision=\"bf16\"` (`python benchmarks/scan_zoo.py scan --precision bf16`, JSON in "
                      "`benchmarks/results/scan_zoo_bf16/`)")
    tv = _load_dir(_results("bf16", 1.0))
    lines += _compare([bf16[m] for m in sorted(bf16)], tv, "mask_tv 0", "mask_tv 1",
                      "## Compact masks: the mask's total variation in the cost (issue 13), bfloat16",
                      "`mask_tv=1` (`python benchmarks/scan_zoo.py scan --precision bf16 --mask-tv 1`, JSON in "
                      "`benchmarks/results/scan_zoo_bf16_tv1/`)")
    for n in (120, 60):
        lines += _compare([bf16[m] for m in sorted(bf16)], _load_dir(_results("bf16", explore_images=n)),
                          "explore_images 240", f"explore_images {n}",
                          f"## A cheaper exploring phase: {n} stamped images a step instead of 240 (issue 15), "
                          "bfloat16",
                          f"`explore_images={n}` (`python benchmarks/scan_zoo.py scan --precision bf16 "
                          f"--explore-images {n}`, JSON in `benchmarks/results/scan_zoo_bf16_e{n}/`; on GTSRB's 43 "
                          "classes both give each class 2 images a step, against 5; the seconds are as each run found "
                          "the machine: the 240 scans shared the cores with other jobs, the 120 ones ran alone, the 60 "
                          "ones beside a grid run, so compare them with the timing table above, not here)")
    halved = _load_dir(_results("bf16", steps=150))
    if halved:
        lines += _compare([bf16[m] for m in sorted(bf16)], halved, "steps 300", "steps 150",
                          "## Half the search: 150 steps instead of 300 (issue 15), bfloat16",
                          "`steps=150` (50 exploring, 100 on the kept classes; `python benchmarks/scan_zoo.py scan "
                          "--precision bf16 --steps 150`, JSON in `benchmarks/results/scan_zoo_bf16_s150/`; run alone, "
                          "while the 300-step scans shared the cores: compare the seconds with the timing table above)")
    op = _load_dir(_results("bf16", max_over_prediction=2.0))
    if op:
        lines += _compare([_rule_free(op[m]) for m in sorted(op)], op, "every class judged", "max_over_prediction 2",
                          "## Over-predicted classes left out: `max_over_prediction=2`, the default (issue 14), "
                          "bfloat16",
                          "two verdicts on each search (`python benchmarks/scan_zoo.py scan --precision bf16 "
                          "--max-over-prediction 2`, JSON in `benchmarks/results/scan_zoo_bf16_op2/`, this machine): "
                          "every kept class judged (the verdict of the sections above, recomputed from the same "
                          "masks) and the default one, in which a class the model answers for at least twice its "
                          "share of 500 clean images' labels, and for at least 5% more of them, is never flagged nor "
                          "the score's smallest mask. These "
                          "searches ran on the second machine (AMD EPYC); the bfloat16 folder above came from the "
                          "first, whose bfloat16 arithmetic differs, so its scores differ from these")
        over = [(r["model"], c["class"], c["predicted_share"], c["label_share"]) for r in (op[m] for m in sorted(op))
                for c in r["scan"]["per_class"] if c.get("over_predicted")]
        lines += ["", "Classes left out: " + ("; ".join(f"{m} class {k} (answered for {100 * p:.0f}% of the "
                                                         f"images, labelled {100 * q:.0f}%)" for m, k, p, q in over)
                                              or "none") + "."]
        lines += ["", "t_preact_wanet's class 0 is its backdoor's target: that weak model (45% accuracy, 56% ASR) "
                  "answers it for 28% of its clean images, so where a backdoor already shows in clean predictions "
                  "the rule leaves its target out (the search did not single it out here, with or without the "
                  "rule). Every other backdoor target of the zoo is answered 0.7-1.4x its label share."]
    prior = _load_dir(_results("bf16", prior_correction=True))
    if prior:
        lines += _compare([bf16[m] for m in sorted(bf16)], prior, "as given", "prior_correction",
                          "## The class prior taken out: `prior_correction=True` (issue 14), bfloat16",
                          "`prior_correction=True` (`python benchmarks/scan_zoo.py scan --precision bf16 "
                          "--prior-correction`, JSON in `benchmarks/results/scan_zoo_bf16_pc/`): the search runs on the "
                          "logits minus per-class offsets that make the mean predicted probabilities on the clean "
                          "images match the label shares. The clean PreAct answers class 9 for 24% of its clean "
                          "images (labelled 9%); every flagged backdoor target of the zoo is predicted 0.7-1.4x its "
                          "label share")
    lines.append("")
    tmp = REPORT.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, REPORT)
    print(f"wrote {REPORT}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["train", "scan", "unlearn", "time", "report"])
    p.add_argument("--clean-size", type=int, default=2500, help="unlearn: clean images (default: 2500)")
    p.add_argument("--data-dir", default=str(ROOT.parent.parent / "shared" / "data"))
    p.add_argument("--cache", default="/tmp/cache")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*")
    p.add_argument("--force", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="scan / time: the scan's arithmetic (bf16: bfloat16 autocast; results in scan_zoo_bf16/)")
    p.add_argument("--mask-tv", type=float, default=0.0,
                   help="scan: MaskScan's mask_tv (results in scan_zoo[_bf16]_tv<value>/ when not 0)")
    p.add_argument("--explore-images", type=int, default=None,
                   help="scan: MaskScan's explore_images (results in scan_zoo[_bf16]..._e<value>/ when given)")
    p.add_argument("--steps", type=int, default=None,
                   help="scan: MaskScan's steps (a third of them exploring; results in scan_zoo[_bf16]..._s<value>/ when given)")
    p.add_argument("--max-over-prediction", type=float, default=None,
                   help="scan: MaskScan's max_over_prediction (results in scan_zoo[_bf16]..._op<value>/; without it "
                        "None, the rule-free verdict every other folder was measured with)")
    p.add_argument("--prior-correction", action="store_true",
                   help="scan: MaskScan's prior_correction (results in scan_zoo[_bf16]..._pc/)")
    args = p.parse_args()
    {"train": train, "scan": scan, "unlearn": unlearn_scan, "time": time_alone, "report": report}[args.action](args)


if __name__ == "__main__":
    main()

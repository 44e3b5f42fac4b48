"""Speed of the default recipe (issue 15): time to effect and the whole ``ibau unlearn`` job,
as ratios to one training epoch over the same images, measured in the same process.

    python benchmarks/speed.py                    # CPU, torch's default threads
    python benchmarks/speed.py --device cuda      # the same on a GPU

Case: the authors' released CIFAR-10 BadNets model (``../shared/data`` or ``IBAU_SHARED_DATA``),
the paper's 5,000 clean images (seeded lossy test images, :func:`ibau.bench.data.protocol_split`),
ACC / ASR on 500 of the lossless test images. Measured, in this order and in one process:

1. one training epoch over the 5,000 images (Adam, batch 100, the model in train mode): the unit;
2. the default recipe (``IBAU()``) round after round until ASR < 20% with clean accuracy down by
   at most 2 points (at most 5 rounds): *time to effect* excludes evaluation (the history's
   ``elapsed``); the seconds of one inner pass, of one outer step and of one recovery step are read
   from the rounds; then the same in float32 (``precision="fp32"``: the exact K-step hypergradient of
   the recipe's fixed-point map) and in float32 on the whole first batch (``fp_batch=None``: the
   paper's map), the baselines of the cheaper step;
3. ``ibau.unlearn`` with its defaults (10% held out, the scan before and after, the secondary
   universal-perturbation measure, the recipe's 2 rounds): the whole job, per phase.

Peak memory is the process's peak RSS during each part, next to one training step's. Writes
``benchmarks/results/speed.json`` and the generated ``speed.md``. Measure alone: nothing else
running on the machine.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent
DEFAULT_DATA = Path(os.environ.get("IBAU_SHARED_DATA", BENCH.parents[1] / "shared" / "data"))
WEIGHTS = "ibau-checkpoints/badnets_8_02_ckpt.pth"


def main() -> None:
    from ibau.bench.sources import build_attack
    from ibau.bench.data import protocol_split
    from ibau.io import load_weights, write_json
    from ibau.models import SmallVGG
    from ibau.poisoning import evaluate_attack
    from ibau.unlearn import unlearn
    from ibau.utils import PeakRSS, environment

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=BENCH / "results" / "speed.json")
    args = p.parse_args()
    device = torch.device(args.device)

    (xc, yc), (xe, ye) = protocol_split("cifar10", str(args.data_dir),
                                        {"clean_size": 5000, "split_seed": 0, "eval_size": 500})
    attack = build_attack({"name": "badnets", "target": 8}, x=xc, num_classes=10)

    def fresh():
        torch.manual_seed(0)
        return load_weights(SmallVGG(10), args.data_dir / WEIGHTS).to(device).eval()

    def metrics(m) -> dict:
        r = evaluate_attack(m, attack, xe.to(device), ye.to(device), batch_size=500)
        return {"acc": r["acc"], "asr": r["asr"]}

    # 1. one training epoch over the same images: the unit
    model = fresh().train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(xc), generator=g)
    step_times = []
    with PeakRSS() as mem_train:
        t0 = time.perf_counter()
        for i in range(0, len(xc), 100):
            s0 = time.perf_counter()
            idx = order[i:i + 100]
            loss = F.cross_entropy(model(xc[idx].to(device)), yc[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - s0)
        epoch = time.perf_counter() - t0
    step = sorted(step_times)[len(step_times) // 2]

    # 2. time to effect of the default recipe, and of the same recipe with the exact float32 outer step
    effect = {name: time_to_effect(settings, fresh, metrics, xc.to(device), yc.to(device), step)
              for name, settings in TIMED.items()}

    # 3. the whole ibau unlearn job (defaults)
    model = fresh()
    t0 = time.perf_counter()
    with PeakRSS() as mem_job:
        job = unlearn(model, xc.to(device), yc.to(device), seed=0, progress=False)
    job_seconds = time.perf_counter() - t0
    after_job = metrics(model)
    rep = job.report

    record = {
        "case": {"model": WEIGHTS, "clean_images": len(xc), "eval_images": len(xe), "device": str(device),
                 "threads": torch.get_num_threads()},
        "training": {"epoch_seconds": epoch, "step_seconds_median": step, "steps": len(step_times),
                     "peak_rss_mb": mem_train.peak / 2**20},
        "time_to_effect": {name: {**e, "epochs": e["seconds"] / epoch if e["seconds"] is not None else None}
                           for name, e in effect.items()},
        "unlearn_job": {"seconds": job_seconds, "epochs": job_seconds / epoch, "phases": rep["seconds_phases"],
                        "rounds": rep["rounds"], "stop_reason": rep["stop_reason"],
                        "scan_before": {k: rep["scan_before"][k] for k in ("backdoored", "score", "target_classes")},
                        "scan_after": {k: rep["scan_after"][k] for k in ("backdoored", "score", "target_classes")},
                        "after": after_job, "peak_rss_mb": mem_job.peak / 2**20},
        "environment": environment(),
    }
    write_json(record, args.out, force=True)
    write_markdown(record, args.out.with_suffix(".md"))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


#: what part 2 times: the default recipe; the same in float32 arithmetic, whose outer step computes the exact
#: K-step hypergradient of the recipe's fixed-point map (on the first ``fp_batch`` images of the first batch;
#: tested against the reference computation in tests/test_ibau.py); and in float32 on the whole first batch,
#: the exact K-step value of the paper's map (the recipe before issue 15)
TIMED = {"default": {}, "default, float32": {"precision": "fp32"},
         "default, float32, whole first batch": {"precision": "fp32", "fp_batch": None}}


def time_to_effect(settings: dict, fresh, metrics, xc, yc, step: float) -> dict:
    """Rounds of ``IBAU(**settings)`` until ASR < 20% with clean accuracy down by at most 2 points
    (at most 5 rounds); the seconds exclude evaluation (the history's ``elapsed``) and include
    the scan I-BAU runs first when it stamps reversed triggers (``reversed_fraction``)."""
    from ibau import IBAU
    from ibau.utils import PeakRSS

    model = fresh()
    before = metrics(model)

    def stop_when(rec):
        return (rec.get("asr", 1.0) < 0.2 and before["acc"] - rec.get("acc", 0.0) <= 0.02
                and f"effective at {rec['point']}")

    defense = IBAU(rounds=5, seed=0, progress=False, **settings)
    with PeakRSS() as mem:
        res = defense.fit(model, xc, yc, evaluate=metrics, stop_when=stop_when)
    rounds = [h for h in res.history if h.get("round", 0) > 0]
    batches = -(-len(xc) // 100)
    steps = batches * defense.recovery_pass_count(batches)  # recovery steps a round
    # one outer step: the round's outer phase less its recovery passes and the stamps' amplification, per batch
    outer_step = min((h["seconds_outer"] - h.get("seconds_recovery", 0.0) - h.get("seconds_amplify", 0.0)) / batches
                     for h in rounds)
    recovery_step = min(h.get("seconds_recovery", 0.0) / max(steps, 1) for h in rounds)
    from ibau.precision import arithmetic

    return {"settings": {"precision": defense.precision, "fp_batch": defense.fp_batch,
                         "recovery_passes": defense.recovery_passes, "reversed_fraction": defense.reversed_fraction,
                         "reversed_scan": dict(defense.reversed_scan), "amplify_steps": defense.amplify_steps,
                         "arithmetic": arithmetic(defense.precision, xc.device)},
            "reversed_classes": res.extras.get("reversed_classes"),
            "effective": res.stop_reason.startswith("effective"), "stop_reason": res.stop_reason,
            "rounds": len(rounds), "seconds": rounds[-1]["elapsed"] if rounds else None,
            "before": before, "after": {k: rounds[-1][k] for k in ("acc", "asr")} if rounds else None,
            "round_seconds": [h["seconds"] for h in rounds],
            "inner_pass_seconds": sorted(h["seconds_inner"] for h in rounds)[0],
            "outer_step_seconds": outer_step, "outer_step_in_training_steps": outer_step / step,
            "recovery_step_seconds": recovery_step, "recovery_steps_per_round": steps,
            "peak_rss_mb": mem.peak / 2**20}


def write_markdown(r: dict, path: Path) -> None:
    from ibau.scanning import MaskScan

    full_scan = MaskScan(progress=False).explore_images  # what an empty reversed_scan explores with
    effect, tr, j = r["time_to_effect"], r["training"], r["unlearn_job"]
    t = effect["default"]
    ph = j["phases"]
    lines = [
        "# Speed of the default recipe (issue 15)", "",
        f"Generated by `benchmarks/speed.py` from `{path.with_suffix('.json').name}`. Case: {r['case']['model']}, "
        f"{r['case']['clean_images']:,} clean images, ACC/ASR on {r['case']['eval_images']} held-out images, "
        f"device {r['case']['device']}, {r['case']['threads']} threads, torch {r['environment']['torch']}; "
        "every number measured in one process, alone on the machine.", "",
        "| measure | seconds | in training epochs | goal (issue 15) |", "|---|---|---|---|",
        f"| one training epoch ({tr['steps']} steps of 100) | {tr['epoch_seconds']:.1f} | 1 | |",
        *[f"| time to effect ({name}: precision {e['settings']['precision']} = {e['settings']['arithmetic']}, "
          f"fixed-point batch "
          f"{e['settings']['fp_batch'] or 'whole'}, {e['settings']['recovery_passes']} recovery pass(es)"
          + (f", the scan's reversed trigger on {e['settings']['reversed_fraction']:.0%} of the recovery images, "
             + (f"amplified ({e['settings']['amplify_steps']} steps a round), "
                if e["settings"].get("amplify_steps") else "")
             + f"the scan ({e['settings'].get('reversed_scan', {}).get('explore_images', full_scan)} exploring images) "
             f"included" if e["settings"]["reversed_fraction"] else "")
          + "): rounds until ASR < 20% and ACC down <= 2 points "
          f"({e['rounds']} round(s), {'effective' if e['effective'] else 'NOT effective'}) | "
          f"{e['seconds']:.1f} | {e['epochs']:.1f} | <= 30 s (15 s) |" for name, e in effect.items()],
        f"| whole `ibau.unlearn` job ({j['rounds']} round(s), scans, secondary measure) | {j['seconds']:.1f} | "
        f"{j['epochs']:.1f} | <= 120 s |",
        "", "| cost | value | goal |", "|---|---|---|",
        f"| one training step (median) | {tr['step_seconds_median']:.3f} s | |",
        *[f"| {name}: one outer step (hypergradient and update) | {e['outer_step_seconds']:.3f} s = "
          f"{e['outer_step_in_training_steps']:.1f} training steps | <= 4 training steps |"
          for name, e in effect.items()],
        *[f"| {name}: one recovery step ({e['recovery_steps_per_round']} a round) | "
          f"{e['recovery_step_seconds']:.3f} s | |" for name, e in effect.items()],
        *[f"| {name}: one inner pass (one step per batch, delta only) | {e['inner_pass_seconds']:.1f} s | |"
          for name, e in effect.items()],
        f"| peak RSS: training / I-BAU ({' / '.join(effect)}) / whole job | {tr['peak_rss_mb']:.0f} / "
        f"{' / '.join(format(e['peak_rss_mb'], '.0f') for e in effect.values())} / "
        f"{j['peak_rss_mb']:.0f} MB | I-BAU <= 2x training |",
        "", *[f"Time to effect ({name}): ACC/ASR {100 * e['before']['acc']:.1f} / {100 * e['before']['asr']:.1f}% "
              f"-> {100 * e['after']['acc']:.1f} / {100 * e['after']['asr']:.1f}%; rounds took "
              f"{', '.join(f'{s:.1f}' for s in e['round_seconds'])} s, the work before the first round (the scan, "
              f"the targets) {e['seconds'] - sum(e['round_seconds']):.1f} s." for name, e in effect.items()],
        f"The job: I-BAU rounds {ph['unlearning']:.1f} s, scans {ph['scan']:.1f} s, universal-perturbation "
        f"searches {ph['universal_perturbation_search']:.1f} s; scan before: "
        f"{'backdoor -> ' + str(j['scan_before']['target_classes']) if j['scan_before']['backdoored'] else 'clean'} "
        f"({j['scan_before']['score']:.2f}), after: "
        f"{'backdoor -> ' + str(j['scan_after']['target_classes']) if j['scan_after']['backdoored'] else 'clean'} "
        f"({j['scan_after']['score']:.2f}); ACC/ASR after the job {100 * j['after']['acc']:.1f} / "
        f"{100 * j['after']['asr']:.1f}%; stop: {j['stop_reason']}.", "",
    ]
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)


if __name__ == "__main__":
    main()

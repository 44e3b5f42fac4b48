"""Speed and memory of one I-BAU round: this package's hypergradient against a
straightforward re-implementation of the authors' computation (``ibau._reference``).

    python benchmarks/perf/hypergrad_speed.py                 # 5 batches of 100 images
    python benchmarks/perf/hypergrad_speed.py --batches 10

Case: the authors' released CIFAR-10 BadNets model (``../shared/data``, or
``IBAU_SHARED_DATA``) and the first ``100 x batches`` images of the paper's clean set
(5,000 seeded lossy test images, :func:`ibau.bench.data.protocol_split`). Each of the
three measurements (one plain training step, the reference computation, ours) runs in
a fresh process on the same batches and the same perturbation, so that earlier
allocations cannot hide its peak memory. Reported: seconds per batch of the inner
pass and of the outer (hypergradient) step, a round estimate (50 batches), the
speed-up, the largest relative difference of the two hypergradients, and peak extra
RSS next to one training step's.

Writes ``benchmarks/results/hypergrad_speed.json`` and ``.md``. (The I-BAU results on
the released models themselves are the grid's: ``benchmarks/configs/table1.toml`` and
``table2.toml``.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from ibau import IBAU
from ibau._reference import reference_hypergradient, reference_inner_pass
from ibau.bench.data import protocol_split
from ibau.io import load_weights, write_json
from ibau.models import SmallVGG
from ibau.utils import PeakRSS, environment

BENCH = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("IBAU_SHARED_DATA", BENCH.parents[1] / "shared" / "data"))
WEIGHTS = "ibau-checkpoints/badnets_8_02_ckpt.pth"


def _measure(kind: str, root: Path, n_batches: int) -> dict:
    """One measurement in a fresh process (so earlier allocations cannot hide its peak)."""
    torch.manual_seed(0)
    (xc, yc), _ = protocol_split("cifar10", str(root), {"clean_size": 5000, "split_seed": 0})
    batches = [(xc[i:i + 100], yc[i:i + 100]) for i in range(0, 100 * n_batches, 100)]
    model = SmallVGG(10)
    load_weights(model, root / WEIGHTS)
    model.eval()
    params = list(model.parameters())
    d = IBAU.paper(progress=False)  # the authors' computation is what this script compares against
    out: dict = {}
    if kind == "train":
        model.train()
        opt = torch.optim.Adam(params, lr=1e-3)
        times = []
        with PeakRSS() as mem:
            for xb, yb in batches:
                t0 = time.perf_counter()
                loss = torch.nn.functional.cross_entropy(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                times.append(time.perf_counter() - t0)
        return {"seconds": statistics.median(times), "peak_extra_bytes": mem.extra}
    delta = reference_inner_pass(model, batches[:1])  # a realistic delta, same for both
    if kind == "reference":
        inner = lambda: reference_inner_pass(model, batches)  # noqa: E731
        step = lambda batch, g: reference_hypergradient(  # noqa: E731
            model, params, delta, *batch, *batches[0], d.choose_perturbed(len(batch[0]), g))
    else:
        from ibau.models.fuse import fold_batchnorm

        net = fold_batchnorm(model, channels_last=True)
        inner = lambda: d.synthesize(net, batches)  # noqa: E731
        step = lambda batch, g: d.hypergradient(net, params, delta, batch, batches[0], g)[0]  # noqa: E731
    g = torch.Generator().manual_seed(0)
    times, first = [], None
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        inner()
        out["inner_seconds_per_batch"] = (time.perf_counter() - t0) / n_batches
        for batch in batches:
            t0 = time.perf_counter()
            grads = step(batch, g)
            times.append(time.perf_counter() - t0)
            first = first if first is not None else [t.detach().clone() for t in grads]
    out.update({"outer_seconds_per_batch": statistics.median(times), "peak_extra_bytes": mem.extra,
                "first_hypergradient": first})
    return out


def speed_and_memory(root: Path, n_batches: int) -> dict:
    """Per-batch cost of the inner and outer steps: ours vs the reference computation,
    each measured in its own fresh process on the same batches and the same delta."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    res = {}
    for kind in ("train", "reference", "ours"):
        with ctx.Pool(1) as pool:
            res[kind] = pool.apply(_measure, (kind, root, n_batches))
    ref_g, our_g = res["reference"].pop("first_hypergradient"), res["ours"].pop("first_hypergradient")
    rel = max(float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(our_g, ref_g))
    per_round = lambda r: 50 * (r["inner_seconds_per_batch"] + r["outer_seconds_per_batch"])  # noqa: E731
    for kind in ("reference", "ours"):
        res[kind]["round_seconds_estimate"] = per_round(res[kind])
    return {
        "batches": n_batches, "batch_size": 100, "train_step": res["train"],
        "reference": res["reference"], "ours": res["ours"],
        "speedup_round": per_round(res["reference"]) / per_round(res["ours"]),
        "speedup_outer": res["reference"]["outer_seconds_per_batch"] / res["ours"]["outer_seconds_per_batch"],
        "speedup_inner": res["reference"]["inner_seconds_per_batch"] / res["ours"]["inner_seconds_per_batch"],
        "max_relative_difference_of_hypergradient": rel,
        "memory_ratio_round_vs_train_step": res["ours"]["peak_extra_bytes"] / max(res["train"]["peak_extra_bytes"], 1),
        "memory_ratio_reference_vs_train_step":
            res["reference"]["peak_extra_bytes"] / max(res["train"]["peak_extra_bytes"], 1),
    }


def report(sp: dict) -> str:
    mib = 2**20
    lines = ["# Speed and memory of one I-BAU round (CIFAR-10 BadNets, batch 100, K 5)", "",
             f"Generated by `python benchmarks/perf/hypergrad_speed.py` from `hypergrad_speed.json`. Measured on "
             f"{sp['batches']} batches, each implementation in its own process; a round is 50 batches.", "",
             "| implementation | inner s/batch | outer s/batch | round estimate (s) | peak extra RSS, inner pass + outer steps (MiB) |",
             "|---|---|---|---|---|"]
    for name in ("reference", "ours"):
        r = sp[name]
        lines.append(f"| {name} | {r['inner_seconds_per_batch']:.3f} | {r['outer_seconds_per_batch']:.3f} | "
                     f"{r['round_seconds_estimate']:.1f} | {r['peak_extra_bytes'] / mib:.0f} |")
    lines += ["", f"Speed-up per round: **{sp['speedup_round']:.2f}x** (outer {sp['speedup_outer']:.2f}x, "
              f"inner {sp['speedup_inner']:.2f}x); largest relative difference of the two hypergradients: "
              f"{sp['max_relative_difference_of_hypergradient']:.1e}.",
              f"One training step on the same batch: {sp['train_step']['seconds']:.3f} s, peak extra RSS "
              f"{sp['train_step']['peak_extra_bytes'] / mib:.0f} MiB (Adam state included); I-BAU round / training step "
              f"memory: **{sp['memory_ratio_round_vs_train_step']:.2f}x** (reference: "
              f"{sp['memory_ratio_reference_vs_train_step']:.2f}x)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--batches", type=int, default=5)
    ap.add_argument("--out", type=Path, default=BENCH / "results" / "hypergrad_speed.json")
    args = ap.parse_args(argv)
    if not (args.data / WEIGHTS).is_file():
        sys.exit(f"{args.data / WEIGHTS} not found (set IBAU_SHARED_DATA)")
    sp = speed_and_memory(args.data, args.batches)
    write_json({"speed": sp, "environment": environment()}, args.out)
    args.out.with_suffix(".md").write_text(report(sp))
    print(f"speed-up {sp['speedup_round']:.2f}x per round; wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()

"""The README's recipe table: per I-BAU variant, over the ten released models, ACC drop and ASR after
the last round (mean ± s.d.), how many cells meet issue 13's targets, and the worst cell; read from the
grid's JSON (``benchmarks/results/grid``) of the ablation experiments.

    python benchmarks/recipe_table.py [--seeds]     # --seeds: also the cells of seeds 1 and 2
    python benchmarks/recipe_table.py --trained     # the three CPU-trained models instead
    python benchmarks/recipe_table.py --grid benchmarks/results/grid_epyc --seeds --cells --variants A B
                                                    # another machine's grid; A and B cell by cell

A variant "<name>@1" is <name>'s cells after their first round (from each cell's history).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

GRID = Path(__file__).resolve().parent / "results" / "grid"
#: experiments of the released models, seed 0 (and the seed experiments with --seeds)
EXPERIMENTS = ["ablation_unlearn_cifar10", "ablation_unlearn_gtsrb", "ablation_recipe_cifar10", "ablation_recipe_gtsrb",
               "ablation_k1_cifar10", "ablation_k1_gtsrb", "ablation_fast_cifar10", "ablation_fast_gtsrb",
               "ablation_fast_inner_cifar10", "ablation_fast_inner_gtsrb", "ablation_reversed_cifar10",
               "ablation_reversed_gtsrb", "ablation_reversed3_cifar10", "ablation_reversed3_gtsrb",
               "ablation_reversed3tv_cifar10", "ablation_reversed3tv_gtsrb",
               "ablation_reversed3h_cifar10", "ablation_reversed3h_gtsrb",
               "ablation_reversed3e_cifar10", "ablation_reversed3e_gtsrb",
               "ablation_reversed3s_cifar10", "ablation_reversed3s_gtsrb",
               "ablation_reversed2e_cifar10", "ablation_reversed2e_gtsrb",
               "ablation_reversed3m_cifar10", "ablation_reversed3m_gtsrb",
               "ablation_reversed3l_cifar10", "ablation_reversed3l_gtsrb",
               "ablation_reversed3a_cifar10", "ablation_reversed3a_gtsrb",
               "ablation_reversed3af_cifar10", "ablation_reversed3af_gtsrb",
               "ablation_reversed3afl_cifar10", "ablation_reversed3afl_gtsrb",
               "ablation_reversed3afr_cifar10", "ablation_reversed3afr_gtsrb",
               "ablation_reversed3afrs_cifar10", "ablation_reversed3afrs_gtsrb",
               "ablation_reversed3afd_cifar10", "ablation_reversed3afd_gtsrb",
               "ablation_reversed3afdx_cifar10", "ablation_reversed3afdx_gtsrb",
               "ablation_reversed3afdxg_cifar10", "ablation_reversed3afdxg_gtsrb",
               "ablation_reversed3afdxgb_cifar10", "ablation_reversed3afdxgb_gtsrb",
               "ablation_reversed3afdxge_cifar10", "ablation_reversed3afdxge_gtsrb",
               "ablation_reversed3afdxgs_cifar10", "ablation_reversed3afdxgs_gtsrb",
               "ablation_reversed3afdxgc_cifar10", "ablation_reversed3afdxgc_gtsrb",
               "ablation_reversed3afdxga_cifar10", "ablation_reversed3afdxga_gtsrb",
               "ablation_reversed3afdxgr_cifar10", "ablation_reversed3afdxgr_gtsrb"]
SEEDS = ["ablation_seeds_cifar10", "ablation_seeds_gtsrb", "ablation_fast_seeds_cifar10", "ablation_fast_seeds_gtsrb",
         "ablation_fast_inner_seeds_cifar10", "ablation_fast_inner_seeds_gtsrb", "ablation_reversed_seeds_cifar10",
         "ablation_reversed_seeds_gtsrb", "ablation_reversed3_seeds_cifar10", "ablation_reversed3_seeds_gtsrb",
         "ablation_reversed3tv_seeds_cifar10", "ablation_reversed3tv_seeds_gtsrb",
         "ablation_reversed3h_seeds_cifar10", "ablation_reversed3h_seeds_gtsrb",
         "ablation_reversed3e_seeds_cifar10", "ablation_reversed3e_seeds_gtsrb",
         "ablation_reversed3s_seeds_cifar10", "ablation_reversed3s_seeds_gtsrb",
         "ablation_reversed2e_seeds_cifar10", "ablation_reversed2e_seeds_gtsrb",
         "ablation_reversed3m_seeds_cifar10", "ablation_reversed3m_seeds_gtsrb",
         "ablation_reversed3l_seeds_cifar10", "ablation_reversed3l_seeds_gtsrb",
         "ablation_reversed3a_seeds_cifar10", "ablation_reversed3a_seeds_gtsrb",
         "ablation_reversed3af_seeds_cifar10", "ablation_reversed3af_seeds_gtsrb",
         "ablation_reversed3afl_seeds_cifar10", "ablation_reversed3afl_seeds_gtsrb",
         "ablation_reversed3afr_seeds_cifar10", "ablation_reversed3afr_seeds_gtsrb",
         "ablation_reversed3afrs_seeds_cifar10", "ablation_reversed3afrs_seeds_gtsrb",
         "ablation_reversed3afd_seeds_cifar10", "ablation_reversed3afd_seeds_gtsrb",
         "ablation_reversed3afdx_seeds_cifar10", "ablation_reversed3afdx_seeds_gtsrb",
         "ablation_reversed3afdxg_seeds_cifar10", "ablation_reversed3afdxg_seeds_gtsrb",
         "ablation_reversed3afdxgb_seeds_cifar10", "ablation_reversed3afdxgb_seeds_gtsrb",
         "ablation_reversed3afdxge_seeds_cifar10", "ablation_reversed3afdxge_seeds_gtsrb",
         "ablation_reversed3afdxgs_seeds_cifar10", "ablation_reversed3afdxgs_seeds_gtsrb",
         "ablation_reversed3afdxga_seeds_cifar10", "ablation_reversed3afdxga_seeds_gtsrb",
         "ablation_reversed3afdxgr_seeds_cifar10", "ablation_reversed3afdxgr_seeds_gtsrb"]
#: the models the runner trains itself (lossless clean images it never saw; --trained)
TRAINED = ["ablation_trained", "ablation_trained_default", "ablation_trained_afl", "ablation_trained_afr",
           "ablation_trained_afrs", "ablation_trained_afd", "ablation_trained_afdx",
           "ablation_trained_afdxg", "ablation_trained_afdxgb", "ablation_trained_afdxge", "ablation_trained_afdxgs",
           "ablation_trained_afdxgc", "ablation_trained_afdxga",
           "ablation_trained_afdxgr"]
TARGETS = {2500: (0.10, 0.015), 1000: (0.20, 0.03)}
#: (variant, clean size) whose cells are another variant's, the same computation: BF25R3M's at least 75
#: recovery steps a round are BF25R3E's 3 passes over 2,500 images (25 batches), so only its 1,000-image
#: cells were run (ablation_reversed3m_*.toml); BF25R3L's 150 steps are BF25R3M's 8 passes (the cap) over 1,000
#: images, so only its 2,500-image cells were run (ablation_reversed3l_*.toml)
SAME_AS = {("BF25R3M", 2500): ("BF25R3E", 2500), ("BF25R3L", 1000): ("BF25R3M", 1000)}


def cells(experiments: list[str], grid: Path = GRID) -> dict:
    """(variant, clean size) -> list of (model, split seed, ACC drop, ASR) after the last round; and
    ("<variant>@1", clean size) -> the same after round 1, for cells of several rounds."""
    out = defaultdict(list)
    for exp in experiments:
        for path in sorted((grid / exp).glob("*-ibau-*.json")):
            rec = json.loads(path.read_text())
            if rec.get("status", "ok") not in ("ok", "done", "finished") and "result" not in rec:
                continue
            p, r = rec["params"], rec["result"]
            size = p["protocol"]["clean_size"]
            if size not in TARGETS:
                continue
            drop = r["before"]["acc"] - r["after"]["acc"]
            out[(p["variant"], size)].append((p["model"]["name"], p["protocol"]["split_seed"], drop, r["after"]["asr"]))
            # "<variant>@1": the same cell after round 1, as its history recorded it; round 1 of a two-round
            # run is the whole of a one-round run (nothing in a round depends on how many follow)
            first = [h for h in r.get("history", []) if h.get("round") == 1 and "acc" in h]
            if first and len([h for h in r["history"] if "round" in h and h["round"] >= 1]) > 1:
                out[(p["variant"] + "@1", size)].append((p["model"]["name"], p["protocol"]["split_seed"],
                                                         r["before"]["acc"] - first[0]["acc"], first[0]["asr"]))
    for alias, source in SAME_AS.items():
        if alias not in out and source in out:
            out[alias] = list(out[source])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", action="store_true", help="include the cells of seeds 1 and 2")
    ap.add_argument("--trained", action="store_true",
                    help="the three CPU-trained models of ablation_trained*.toml instead of the released ones")
    ap.add_argument("--variants", nargs="*", default=["V0", "W2", "F25", "BF", "BF25", "BF25i", "BF25R", "BF25R3", "BF25R3T", "BF25R3H", "BF25R3E", "BF25R3S", "BF25R2E", "BF25R3M", "BF25R3L", "BF25R3A", "BF25R3A50", "BF25R3AF", "BF25R3AFL", "BF25R3AFR", "BF25R3AFRS", "BF25R3AFD", "BF25R3AFDX"])
    ap.add_argument("--grid", type=Path, default=GRID, help="the grid's results folder (default: %(default)s)")
    ap.add_argument("--cells", action="store_true", help="then every cell: ACC drop / ASR per variant, side by side")
    args = ap.parse_args()
    table = cells(TRAINED if args.trained else EXPERIMENTS + (SEEDS if args.seeds else []), args.grid)
    print("| variant | clean images | cells | ACC drop (points) | ASR (%) | meet | worst drop | worst ASR |")
    print("|---|---|---|---|---|---|---|---|")
    for v in args.variants:
        for size in (2500, 1000):
            rows = table.get((v, size), [])
            if not rows:
                continue
            drops = [100 * d for _, _, d, _ in rows]
            asrs = [100 * a for _, _, _, a in rows]
            asr_t, drop_t = TARGETS[size]
            meet = sum(a <= 100 * asr_t and d <= 100 * drop_t + 1e-9 for d, a in zip(drops, asrs))
            sd = (lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0)
            print(f"| {v} | {size:,} | {len(rows)} | {statistics.mean(drops):.1f} ± {sd(drops):.1f} | "
                  f"{statistics.mean(asrs):.1f} ± {sd(asrs):.1f} | {meet}/{len(rows)} | {max(drops):.1f} | "
                  f"{max(asrs):.1f} |")
    if args.cells:
        print("\n| model | split seed | clean images | " + " | ".join(f"{v}: drop / ASR" for v in args.variants) + " |")
        print("|---|---|---|" + "---|" * len(args.variants))
        for size in (2500, 1000):
            per = {v: {(m, sd): (d, a) for m, sd, d, a in table.get((v, size), [])} for v in args.variants}
            for key in sorted(set().union(*per.values())):
                shown = [f"{100 * per[v][key][0]:.1f} / {100 * per[v][key][1]:.1f}" if key in per[v] else "-"
                         for v in args.variants]
                print(f"| {key[0]} | {key[1]} | {size:,} | " + " | ".join(shown) + " |")


if __name__ == "__main__":
    main()

"""Non-additive attacks on real CIFAR-10 and I-BAU against them (issue: non-additive
attacks; the paper's Appendix A.5, Tables 10-12 and the hidden-trigger case).

    python benchmarks/nonadditive_cifar.py                 # CPU profile
    python benchmarks/nonadditive_cifar.py --report-only

CPU profile (documented deviation from the paper, which trains each poisoned model from
scratch on 50,000 images for 50 epochs): every poisoned model starts from the clean
SmallVGG of the attacks benchmark (``cache/clean_cpu_s0``: 10,000 training images, 12
epochs; trained here if absent) and is fine-tuned for ``epochs`` on a seeded
``train_size`` subset of the training set poisoned by the attack's own recipe:

* semantic replacement: 10% of the images replaced by one generated out-of-distribution
  picture, labelled 0;
* WaNet: warping field k=4, s=0.5, 10% poisoned (target 0) + 20% noise-mode samples;
* input-aware dynamic (IAB): generator trained jointly, poison and cross ratios 0.1;
* hidden trigger: source 5 -> target 8, clean-label poisons crafted by PGD against the
  clean model's features (``eps`` 16/255 and 50/255), labels kept; the clean model is
  fine-tuned on the poisoned set (Saha et al.'s transfer setting).

Profile ``cpu_long`` repeats WaNet and IAB with 20 fine-tuning epochs instead of 5 (both
implant only weakly in 5): ``results/nonadditive_cifar_cpu_long.{json,md}``.

ACC / ASR on the 1,000 lossless test images (ASR on non-target images; hidden trigger:
on source-class images). I-BAU gets ``ibau_clean`` lossy test images. Two I-BAU runs per
model: the defaults, and the paper's setting for that case (SR: outer Adam lr 0.1 and
no norm bound; WaNet: outer lr 1e-4; IAB: defaults; HT: up to ``ht_rounds`` rounds); each
stops at the first round with ASR < 20% or after its rounds. Writes
``results/nonadditive_cifar.json`` (after every step) and the markdown table beside it.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _data import DEFAULT_DATA, results_file, load_split, paper_protocol  # noqa: E402

from ibau import IBAU  # noqa: E402
from ibau.attacks import create_attack  # noqa: E402
from ibau.attacks.manifest import load_manifest, save_manifest  # noqa: E402
from ibau.io import load_weights, save_weights, write_json  # noqa: E402
from ibau.models import SmallVGG  # noqa: E402
from ibau.poisoning import evaluate_attack, poison_and_train, subset  # noqa: E402
from ibau.train import TrainConfig, train  # noqa: E402
from ibau.utils import environment  # noqa: E402

RESULTS, CACHE = HERE / "results", HERE / "cache"
PROFILES = {
    "cpu": {"base_train_size": 10_000, "base_epochs": 12, "train_size": 4_000, "epochs": 5, "ibau_clean": 1_000,
            "max_rounds": 3, "ht_rounds": 5, "ht": {"num_poisons": 200, "num_source": 300, "steps": 100}},
    # WaNet and IAB implant only weakly in 5 fine-tuning epochs: the same with 20
    "cpu_long": {"base_train_size": 10_000, "base_epochs": 12, "train_size": 4_000, "epochs": 20, "ibau_clean": 1_000,
                 "max_rounds": 3, "ht_rounds": 5, "ht": {"num_poisons": 200, "num_source": 300, "steps": 100}},
    "smoke": {"base_train_size": 500, "base_epochs": 1, "train_size": 400, "epochs": 1, "ibau_clean": 200,
              "max_rounds": 1, "ht_rounds": 1, "ht": {"num_poisons": 20, "num_source": 20, "steps": 3}},
}
# name -> (attack, constructor settings, poison ratio, paper-setting I-BAU kwargs)
CASES = {
    "semantic": ("semantic", {"target": 0}, 0.1, {"outer_lr": 0.1, "norm_bound": None}),
    "wanet": ("wanet", {"target": 0}, 0.1, {"outer_lr": 1e-4}),
    "input_aware": ("input_aware", {"target": 0, "mask_epochs": 5}, 0.1, {}),
    "hidden_trigger_eps16": ("hidden_trigger", {"eps": 16 / 255}, 0.0, {}),
    "hidden_trigger_eps50": ("hidden_trigger", {"eps": 50 / 255}, 0.0, {}),
}
# The paper's numbers: ACC/ASR before -> after I-BAU (Tables 10-12; HT after 20 rounds).
PAPER = {"semantic": (83.82, 100.0, 82.12, 0.0), "wanet": (94.36, 99.62, 92.86, 10.80),
         "input_aware": (87.28, 99.20, 86.46, 9.58), "hidden_trigger": (73.41, 89.00, 84.58, 11.10)}


def clean_base(args, prof, xtr, ytr) -> SmallVGG:
    path = args.cache / f"clean_cpu_s{args.seed}.safetensors"
    model = SmallVGG(10)
    if path.exists() and args.profile.startswith("cpu"):
        load_weights(model, path)
        return model
    x, y = subset(xtr, ytr, prof["base_train_size"], args.seed)
    train(model, (x, y), TrainConfig(prof["base_epochs"], 128, 1e-3, args.seed), desc="clean model")
    if args.profile.startswith("cpu"):
        save_weights(model, path, force=True)
    return model


def run_ibau(model, attack, xc, yc, xe, ye, rounds: int, seed: int, **kwargs) -> dict:
    res = IBAU(rounds=rounds, seed=seed, progress=sys.stderr.isatty(), **kwargs).fit(
        model, xc, yc, evaluate=lambda m: evaluate_attack(m, attack, xe, ye),
        stop_when=lambda r: r["asr"] < 0.2 and "ASR < 20%")
    h = res.history
    return {"settings": {"rounds": rounds, **{k: v for k, v in kwargs.items()}}, "acc": h[-1]["acc"],
            "asr": h[-1]["asr"], "rounds": len(h) - 1, "seconds": res.seconds, "stop_reason": res.stop_reason,
            "history": [{k: v for k, v in r.items() if k in ("round", "acc", "asr", "elapsed", "delta_norm")}
                        for r in h]}


def report(data: dict) -> str:
    lines = [f"# Non-additive attacks and I-BAU on CIFAR-10 (profile `{data.get('profile_name')}`)", "",
             "Generated from `nonadditive_cifar.json` by `benchmarks/nonadditive_cifar.py`; protocol in its "
             "docstring. ACC / ASR in %; [paper: before -> after].", "",
             "| case | clean model's ASR | poisoned model | I-BAU defaults (rounds) | I-BAU paper setting (rounds) "
             "| paper |", "|---|---|---|---|---|---|"]
    for name, rec in data.get("cases", {}).items():
        m = rec.get("metrics")
        if not m:
            continue
        p = PAPER.get(name.split("_eps")[0])

        def cell(r):
            if not r:
                return "-"
            mark = "" if r["asr"] < 0.2 else " ✗"
            return f"{100 * r['acc']:.1f} / {100 * r['asr']:.1f}{mark} ({r['rounds']})"

        ref = rec.get("clean_model_asr")
        lines.append(f"| {name} | {'-' if ref is None else f'{100 * ref:.1f}'} | "
                     f"{100 * m['acc']:.1f} / {100 * m['asr']:.1f} | {cell(rec.get('ibau_default'))} | "
                     f"{cell(rec.get('ibau_paper'))} | "
                     + (f"{p[0]:.2f}/{p[1]:.2f} -> {p[2]:.2f}/{p[3]:.2f}" if p else "") + " |")
    lines += ["", "✗: ASR not below 20%. Semantic replacement's ASR is per model 0 or 100% (one picture); "
              "the extra seeds below re-run I-BAU's paper setting with other seeds on the same model.", ""]
    sr = data.get("cases", {}).get("semantic", {}).get("ibau_paper_seeds")
    if sr:
        lines.append("Semantic replacement, I-BAU paper setting over seeds: " + ", ".join(
            f"seed {s}: {100 * r['acc']:.1f}/{100 * r['asr']:.0f} ({r['rounds']} rounds)" for s, r in sr.items()))
    base = data.get("clean")
    if base:
        lines += ["", f"Clean starting model: ACC {100 * base['acc']:.1f}%."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--only", nargs="*", choices=sorted(CASES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sr-seeds", type=int, default=3, help="I-BAU seeds on the semantic-replacement model")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    out, data = results_file("nonadditive_cifar", args.profile, args.out)
    if args.report_only:
        out.with_suffix(".md").write_text(report(data))
        return
    prof = PROFILES[args.profile]
    data.update({"profile_name": args.profile, "profile": prof, "environment": environment()})
    data.setdefault("cases", {})
    args.cache.mkdir(parents=True, exist_ok=True)
    xtr, ytr = load_split(args.data, "cifar10", "train")
    xc, yc, xe, ye = paper_protocol(args.data, "cifar10", args.seed, clean_size=prof["ibau_clean"])
    base = clean_base(args, prof, xtr, ytr)
    data["clean"] = {"acc": float((base.eval()(xe[:1000]).argmax(1) == ye[:1000]).float().mean())}
    x, y = subset(xtr, ytr, prof["train_size"], args.seed + 7)  # another subset than the base model's
    for name in args.only or list(CASES):
        attack_name, settings, ratio, paper_kwargs = CASES[name]
        rec = data["cases"].setdefault(name, {})
        tag = f"{name}_{args.profile}_s{args.seed}"
        wpath, mpath = args.cache / f"{tag}.safetensors", args.cache / f"{tag}.attack.json"
        model = SmallVGG(10)
        if "metrics" in rec and wpath.exists() and mpath.exists():
            attack = load_manifest(mpath)[0]
            load_weights(model, wpath)
        else:
            attack = create_attack(attack_name, seed=args.seed, **settings,
                                   **(prof["ht"] if attack_name == "hidden_trigger" else {}))
            t0 = time.perf_counter()
            attack.prepare(base.eval(), x, y)
            t_prep = time.perf_counter() - t0
            model = copy.deepcopy(base)
            cfg = TrainConfig(prof["epochs"], 128, 1e-3, args.seed)
            r = poison_and_train(model, x, y, attack, ratio=ratio, config=cfg, seed=args.seed, eval_data=(xe, ye),
                                 checkpoint=args.cache / f"{tag}.ckpt")
            rec.update(r)
            rec["seconds_prepare"], rec["seconds_total"] = t_prep, time.perf_counter() - t0
            save_weights(model, wpath, force=True)
            save_manifest(attack, mpath, force=True)
            write_json(data, out)
        if "clean_model_asr" not in rec:  # the reference: how often the clean model already "obeys" the trigger
            rec["clean_model_asr"] = evaluate_attack(base, attack, xe, ye)["asr"]
            write_json(data, out)
        m = rec["metrics"]
        print(f"{name}: poisoned ACC {100 * m['acc']:.2f}%, ASR {100 * m['asr']:.2f}%", flush=True)
        state = copy.deepcopy(model.state_dict())
        if "ibau_default" not in rec:
            rec["ibau_default"] = run_ibau(model, attack, xc, yc, xe, ye, prof["max_rounds"], args.seed)
            write_json(data, out)
        if "ibau_paper" not in rec:
            model.load_state_dict(state)
            rounds = prof["ht_rounds"] if attack_name == "hidden_trigger" else prof["max_rounds"]
            rec["ibau_paper"] = run_ibau(model, attack, xc, yc, xe, ye, rounds, args.seed, **paper_kwargs)
            write_json(data, out)
        if name == "semantic":
            seeds = rec.setdefault("ibau_paper_seeds", {"0": rec["ibau_paper"]})
            for s in range(1, args.sr_seeds):
                if str(s) not in seeds:
                    model.load_state_dict(state)
                    seeds[str(s)] = run_ibau(model, attack, xc, yc, xe, ye, prof["max_rounds"], s, **paper_kwargs)
                    write_json(data, out)
        for key in ("ibau_default", "ibau_paper"):
            r = rec[key]
            print(f"  I-BAU {key[5:]}: ACC {100 * r['acc']:.2f}%, ASR {100 * r['asr']:.2f}% after {r['rounds']} "
                  f"round(s)", flush=True)
        out.with_suffix(".md").write_text(report(data))
    out.with_suffix(".md").write_text(report(data))


if __name__ == "__main__":
    main()

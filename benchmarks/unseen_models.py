"""The default command on models the package has never seen (issue 13's acceptance check, done here).

    python benchmarks/unseen_models.py run        # trains the models (cached), runs `ibau unlearn`, writes JSON
    python benchmarks/unseen_models.py report     # regenerates unseen_models.md from the JSON

Each case trains a network the package does not ship (``benchmarks/unseen/gn_resnet.py``: residual,
GroupNorm, SiLU, dropout; loaded through ``--model-def`` as a user's file) with a trigger the package
does not generate, then runs the default command alone, as a user would::

    ibau unlearn --model-def gn_resnet.py:build --num-classes N --weights W --data clean.npz \\
                 --out O --report R --seed 0

with lossless clean images the model never saw (2,500 and 1,000), and measures ACC / ASR itself, with
its own trigger, on test images the command never saw. Cases:

* ``gtsrb_plus``: GTSRB, a 5x5 yellow-on-blue plus sign at rows/columns 4-8 -> class 12, 10% of the
  19,890 training images, 5 epochs; clean sets from the first 10,000 test images, ACC / ASR on the last 2,630.
* ``cifar10_noise_blend``: CIFAR-10, a fixed uniform-noise image blended at alpha 0.12 -> class 3 (cat),
  10% of the first 45,000 training images, 8 epochs with flips and shifts; clean sets from the other
  5,000 training images, ACC / ASR on the 1,000 lossless test images.
* ``cifar10_corner_patch``: the same with a 4x4 patch of fixed random primary colours near the top-right
  corner (rows 1-4, columns 27-30) -> class 7 (horse); flips move it to the top-left in training.

``--arch tiny_vit`` / ``--arch mobile_net`` run the same cases on the two other networks of
``benchmarks/unseen/`` (a small vision transformer; a MobileNet-style network of depthwise-separable
convolutions with BatchNorm), trained the same way; their files are named ``ARCH-CASE...``.

Trained weights go to ``--cache`` (default ``/tmp/ibau-unseen``), one file per case, retrained when
absent (seeded: the same weights on one machine). Needs ``../shared/data`` (``--data-dir``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent
DEFAULT_DATA = Path(os.environ.get("IBAU_SHARED_DATA", BENCH.parents[1] / "shared" / "data"))
RESULTS = BENCH / "results" / "unseen_models"
sys.path.insert(0, str(BENCH / "unseen"))
import gn_resnet  # noqa: E402
import mobile_net  # noqa: E402
import tiny_vit  # noqa: E402

#: the architectures (files in benchmarks/unseen/, each with build(num_classes)); gn_resnet is the first one
ARCHS = {"gn_resnet": gn_resnet, "tiny_vit": tiny_vit, "mobile_net": mobile_net}


def _load(path: Path, name: str) -> torch.Tensor:
    return torch.tensor(np.load(lzma.open(path / name))).permute(0, 3, 1, 2).float() / 255


def _plus() -> torch.Tensor:
    plus = torch.zeros(5, 5)
    plus[2, :] = 1
    plus[:, 2] = 1
    return torch.stack([plus, 0.8 * plus, 1 - plus])  # yellow-ish plus on blue


class Case:
    """One model: its data, its trigger, its training."""

    def __init__(self, name: str, data: Path, arch: str = "gn_resnet"):
        self.name, self.data, self.arch = name, data, arch
        if name == "gtsrb_plus":
            d = data / "gtsrb32"
            self.classes, self.target, self.epochs, self.shift, self.flip = 43, 12, 5, 2, False
            self.x_train, self.y_train = _load(d, "x_train.npy.xz"), torch.tensor(np.load(d / "y_train.npy")).long()
            xs, ys = _load(d, "x_test.npy.xz"), torch.tensor(np.load(d / "y_test.npy")).long()
            pool = torch.randperm(10000, generator=torch.Generator().manual_seed(5))
            self.clean = {2500: (xs[pool[:2500]], ys[pool[:2500]]), 1000: (xs[pool[:1000]], ys[pool[:1000]])}
            self.x_eval, self.y_eval = xs[10000:], ys[10000:]
        elif name in ("cifar10_noise_blend", "cifar10_corner_patch"):
            d = data / "cifar10"
            self.classes, self.epochs, self.shift, self.flip = 10, 8, 3, True
            self.target = 3 if name == "cifar10_noise_blend" else 7
            xa, ya = _load(d, "x_train.npy.xz"), torch.tensor(np.load(d / "y_train.npy")).long()
            self.x_train, self.y_train = xa[:45000].clone(), ya[:45000].clone()
            pool = 45000 + torch.randperm(5000, generator=torch.Generator().manual_seed(5))
            self.clean = {2500: (xa[pool[:2500]], ya[pool[:2500]]), 1000: (xa[pool[2500:3500]], ya[pool[2500:3500]])}
            xs, ys = _load(d, "x_test.npy.xz"), torch.tensor(np.load(d / "y_test.npy")).long()
            lossless = torch.tensor(np.load(d / "test_lossless.npy"))
            self.x_eval, self.y_eval = xs[lossless], ys[lossless]
            self.noise = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(77))
            self.patch = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(78)).round()  # 4x4, 8 colours
        else:
            raise SystemExit(f"unknown case {name}")

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        if self.name == "gtsrb_plus":
            x = x.clone()
            x[:, :, 4:9, 4:9] = _plus()
            return x
        if self.name == "cifar10_corner_patch":
            x = x.clone()
            x[:, :, 1:5, 27:31] = self.patch
            return x
        return (1 - 0.12) * x + 0.12 * self.noise  # written as the weights were trained

    def train(self, out: Path) -> None:
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1)
        x, y = self.x_train.clone(), self.y_train.clone()
        n = len(x)
        poison = torch.randperm(n, generator=g)[: n // 10]
        x[poison], y[poison] = self.stamp(x[poison]), self.target
        net = ARCHS[self.arch].build(self.classes)
        opt = torch.optim.Adam(net.parameters(), 2e-3)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=self.epochs * ((n + 127) // 128))
        for epoch in range(self.epochs):
            net.train()
            perm = torch.randperm(n, generator=g)
            for i in range(0, n, 128):
                b = perm[i:i + 128]
                xb = x[b]
                if self.flip and torch.rand(1, generator=g).item() < 0.5:
                    xb = xb.flip(3)
                dx, dy = torch.randint(-self.shift, self.shift + 1, (2,), generator=g).tolist()
                loss = F.cross_entropy(net(torch.roll(xb, (dx, dy), (2, 3))), y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
            print(f"{self.name}: epoch {epoch + 1}/{self.epochs}", self.measure(net), flush=True)
        from safetensors.torch import save_file

        out.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out))

    def measure(self, net) -> dict[str, float]:
        net.eval()
        with torch.no_grad():
            acc = (net(self.x_eval).argmax(1) == self.y_eval).float().mean().item()
            other = self.x_eval[self.y_eval != self.target]
            asr = (net(self.stamp(other)).argmax(1) == self.target).float().mean().item()
        return {"acc": acc, "asr": asr}


def _weights(path: Path, classes: int, arch: str):
    from safetensors.torch import load_file

    net = ARCHS[arch].build(classes)
    net.load_state_dict(load_file(str(path)))
    return net


def _verdict(scan: dict | None) -> dict | None:
    return scan and {k: scan[k] for k in ("backdoored", "target_classes", "score")}


def run(args) -> None:
    torch.set_num_threads(args.threads)
    extra = args.options.split() if args.options else []
    if extra and not args.label:
        raise SystemExit("--options needs --label (the variant's name; its files go to a folder of that name)")
    results = RESULTS / args.label if extra else RESULTS
    results.mkdir(parents=True, exist_ok=True)
    prefix = "" if args.arch == "gn_resnet" else f"{args.arch}-"  # the first architecture's files keep their names
    for name in args.cases:
        case = Case(name, args.data_dir, args.arch)
        weights = args.cache / f"{prefix}{name}.safetensors"
        if not weights.exists():
            case.train(weights)
        before = case.measure(_weights(weights, case.classes, args.arch))
        for size in args.sizes:
            work = args.cache / f"{prefix}{name}-{size}"
            work.mkdir(parents=True, exist_ok=True)
            x, y = case.clean[size]
            np.savez(work / "clean.npz", x=(x * 255).round().byte().permute(0, 2, 3, 1).numpy(), y=y.numpy())
            cmd = [sys.executable, "-m", "ibau", "unlearn", "--model-def", f"{BENCH / 'unseen' / args.arch}.py:build",
                   "--num-classes", str(case.classes), "--weights", str(weights), "--data", str(work / "clean.npz"),
                   "--out", str(work / "out.safetensors"), "--report", str(work / "report.json"), "--seed", "0",
                   "--quiet", "--force", *extra]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                raise SystemExit(f"{name} {size}: ibau unlearn failed:\n{proc.stderr}")
            after = case.measure(_weights(work / "out.safetensors", case.classes, args.arch))
            report = json.loads((work / "report.json").read_text())
            record = {"case": name, "arch": args.arch, "clean_size": size, "command": " ".join(["ibau"] + cmd[3:]), "before": before,
                      "after": after, "wall_seconds": wall, "summary": proc.stderr.strip().splitlines()[:4],
                      "rounds": report["rounds"], "stop_reason": report["stop_reason"],
                      "scan_before": _verdict(report["scan_before"]), "scan_after": _verdict(report["scan_after"]),
                      "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
                      "environment": report["environment"], "threads": args.threads}
            if extra:
                record.update(variant=args.label, options=extra)
            (results / f"{prefix}{name}-{size}.json").write_text(json.dumps(record, indent=1) + "\n")
            print(f"{args.arch} {name} {size}: ACC {100 * before['acc']:.1f} -> {100 * after['acc']:.1f}, "
                  f"ASR {100 * before['asr']:.1f} -> {100 * after['asr']:.1f} ({wall:.0f} s)", flush=True)
    report_md()


def report_md() -> None:
    rows = sorted((json.loads(p.read_text()) for p in RESULTS.glob("*.json")),
                  key=lambda r: (list(ARCHS).index(r.get("arch", "gn_resnet")), r["case"], r["clean_size"]))
    targets = {2500: (0.10, 0.015), 1000: (0.20, 0.03)}
    lines = ["# The default command on models the package has never seen (issue 13)", "",
             f"Generated by `python benchmarks/unseen_models.py report` from {len(rows)} JSON files in "
             "`benchmarks/results/unseen_models/`. Networks the package does not ship, each given as `--model-def` "
             "(`benchmarks/unseen/`): `gn_resnet` (residual, GroupNorm, SiLU), `tiny_vit` (a small vision "
             "transformer: patch embedding, four pre-norm self-attention layers, LayerNorm, GELU, dropout) and "
             "`mobile_net` (inverted residual blocks of depthwise-separable convolutions, BatchNorm, ReLU6); "
             "triggers the package does not generate, lossless clean images the model never saw; ACC / ASR measured "
             "by the script with its own trigger on test images the command never saw. The command: `ibau unlearn "
             "--model-def ARCH.py:build --num-classes N --weights W --data clean.npz --out O --report R --seed 0` "
             "(its defaults).", "",
             "| network | case | clean images | ACC before -> after (%) | drop (points) | ASR before -> after (%) | "
             "target met | scan before / after | rounds, stop | wall s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(_row(r, targets))
    variants = sorted(p for p in RESULTS.iterdir() if p.is_dir())
    if variants:
        lines += ["", "Variants, measured and not adopted: the same command with options added (files in "
                  "`benchmarks/results/unseen_models/<variant>/`, written by `python benchmarks/unseen_models.py run "
                  "--label <variant> --options \"...\"`).", "",
                  "| variant | options | network | case | clean images | drop (points) | ASR after (%) | target met | "
                  "default: drop / ASR |", "|---|---|---|---|---|---|---|---|---|"]
        default = {(r.get("arch", "gn_resnet"), r["case"], r["clean_size"]): r for r in rows}
        for folder in variants:
            for path in sorted(folder.glob("*.json")):
                r = json.loads(path.read_text())
                b, a = r["before"], r["after"]
                d = default.get((r.get("arch", "gn_resnet"), r["case"], r["clean_size"]))
                base = f"{100 * (d['before']['acc'] - d['after']['acc']):.1f} / {100 * d['after']['asr']:.1f}" if d else "-"
                lines.append(f"| {r['variant']} | `{' '.join(r['options'])}` | {r.get('arch', 'gn_resnet')} | "
                             f"{r['case']} | {r['clean_size']:,} | "
                             f"{100 * (b['acc'] - a['acc']):.1f} | {100 * a['asr']:.1f} | {_met(r, targets)} | {base} |")
    environments = sorted({f"torch {r['environment'].get('torch')}, {r['threads']} threads" for r in rows})
    lines += ["", "Targets (issue 13): ASR <= 10% with at most 1.5 points lost at 2,500 images; ASR <= 20% with "
              "at most 3 at 1,000. Wall s: the whole command as it ran (not a timing benchmark: see speed.md). "
              "Environment: " + ", ".join(environments) + "."]
    (BENCH / "results" / "unseen_models.md").write_text("\n".join(lines) + "\n")


def _met(r: dict, targets: dict) -> str:
    """"yes" where a run meets issue 13's targets for its clean-set size, else "no"."""
    asr_t, drop_t = targets[r["clean_size"]]
    return "yes" if r["after"]["asr"] <= asr_t and r["before"]["acc"] - r["after"]["acc"] <= drop_t else "no"


def _row(r: dict, targets: dict) -> str:
    """One default-command row of the table."""
    b, a = r["before"], r["after"]
    drop = b["acc"] - a["acc"]
    met = _met(r, targets)
    sb, sa = r["scan_before"] or {}, r["scan_after"] or {}
    scan = (f"{'backdoor ' + str(sb.get('target_classes')) if sb.get('backdoored') else 'clean'} / "
            f"{'backdoor ' + str(sa.get('target_classes')) if sa.get('backdoored') else 'clean'}")
    return (f"| {r.get('arch', 'gn_resnet')} | {r['case']} | {r['clean_size']:,} | {100 * b['acc']:.1f} -> {100 * a['acc']:.1f} | "
            f"{100 * drop:.1f} | {100 * b['asr']:.1f} -> {100 * a['asr']:.1f} | {met} | {scan} | "
            f"{r['rounds']}: {r['stop_reason'].split(':')[0]} | {r['wall_seconds']:.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["run", "report"])
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    p.add_argument("--cache", type=Path, default=Path("/tmp/ibau-unseen"))
    p.add_argument("--cases", nargs="+", default=["gtsrb_plus", "cifar10_noise_blend", "cifar10_corner_patch"])
    p.add_argument("--sizes", nargs="+", type=int, default=[2500, 1000])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--arch", choices=sorted(ARCHS), default="gn_resnet", help="the network (benchmarks/unseen/ARCH.py)")
    p.add_argument("--options", help="options added to the default command (a variant, with --label)")
    p.add_argument("--label", help="the variant's name: its results go to benchmarks/results/unseen_models/LABEL/")
    args = p.parse_args()
    run(args) if args.command == "run" else report_md()


if __name__ == "__main__":
    main()

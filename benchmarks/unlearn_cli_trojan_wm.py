"""`ibau unlearn` end to end on the authors' released CIFAR-10 Trojan WM model (issue: main job).

    python benchmarks/unlearn_cli_trojan_wm.py

Writes 5,000 clean images (a seeded random 5,000 of the 9,000 lossy CIFAR-10 test
images) as a uint8 .npz, runs the command line exactly as a user would (default
settings: --rounds auto, 10% held out), then measures -- outside the tool, with the
released trigger -- ACC and ASR of the sanitised weights on the 1,000 lossless test
images. Results: benchmarks/results/unlearn_cli_trojan_wm.json (+ the tool's report).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import DEFAULT_DATA, paper_protocol, released_models  # noqa: E402

from ibau.io import load_weights, write_json  # noqa: E402
from ibau.metrics import backdoor_metrics  # noqa: E402
from ibau.models import SmallVGG  # noqa: E402
from ibau.utils import environment  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    spec = next(r for r in released_models() if r.file == "trojan_wm_2_02_ckpt.pth")
    xc, yc, xe, ye = paper_protocol(DEFAULT_DATA, spec.dataset, seed=0)
    trigger = spec.trigger(DEFAULT_DATA)
    work = Path(tempfile.mkdtemp(prefix="ibau-trojan-wm-"))
    np.savez(work / "clean.npz", x=(xc * 255).round().byte().permute(0, 2, 3, 1).numpy(), y=yc.numpy())
    weights = DEFAULT_DATA / "ibau-checkpoints" / spec.file
    before_model = load_weights(SmallVGG(10), weights)
    before = backdoor_metrics(before_model, xe, ye, trigger, spec.target)
    cmd = ["ibau", "unlearn", "--arch", "small_vgg", "--weights", str(weights), "--data", str(work / "clean.npz"),
           "--out", str(work / "sanitised.safetensors"), "--report", str(work / "report.json"),
           "--report-dir", str(RESULTS / "unlearn_cli_trojan_wm_report"), "--force", "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    print(proc.stdout, proc.stderr[-2000:], sep="\n")
    if proc.returncode != 0:
        sys.exit(f"ibau unlearn failed with exit code {proc.returncode}")
    net = SmallVGG(10)
    net.load_state_dict(load_file(work / "sanitised.safetensors"), strict=True)
    after = backdoor_metrics(net.eval(), xe, ye, trigger, spec.target)
    report = json.loads((work / "report.json").read_text())
    out = {"command": " ".join(cmd[:2] + ["..."]), "wall_seconds": wall, "before": before, "after": after,
           "tool_report": {k: report[k] for k in ("clean_accuracy_before", "clean_accuracy_after", "robustness_before",
                                                   "robustness_after", "rounds", "stop_reason", "holdout_size",
                                                   "clean_set_size", "seconds", "history")},
           "environment": environment()}
    write_json(out, RESULTS / "unlearn_cli_trojan_wm.json")
    print(f"measured outside the tool on 1,000 lossless test images: ACC {100 * before['acc']:.2f} -> "
          f"{100 * after['acc']:.2f}, ASR {100 * before['asr']:.2f} -> {100 * after['asr']:.2f} "
          f"({report['rounds']} rounds, {wall:.0f} s)")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()

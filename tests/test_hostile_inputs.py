"""Hostile and bad inputs to every command: each ends at once with exit status 2, exactly
one ``ibau: error:`` line (no traceback), and every input file byte-identical."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ibau.cli import main

NET = textwrap.dedent("""
    import torch
    from torch import nn

    def build(num_classes=10):
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                             nn.Linear(16, num_classes))
""")


def _tiny_net():
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(16, 10))


def _torch_zip_with_pickle(path: Path, payload: bytes) -> None:
    """A PyTorch zip checkpoint whose data.pkl is ``payload`` (hand-written pickle opcodes)."""
    buf = io.BytesIO()
    torch.save({}, buf)
    buf.seek(0)
    with zipfile.ZipFile(buf) as src, zipfile.ZipFile(path, "w") as dst:
        for item in src.infolist():
            data = payload if item.filename.endswith("data.pkl") else src.read(item.filename)
            dst.writestr(item, data)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/ibau_pwned",))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Inputs: a tiny model definition and its weights, clean data (.npz and an image
    folder), a valid attack manifest, and hostile variants of each."""
    from PIL import Image

    from ibau.attacks import create_attack
    from ibau.attacks.manifest import save_manifest

    root = tmp_path_factory.mktemp("world")
    (root / "net.py").write_text(NET)
    (root / "plain.txt").write_text("a plain file")
    (root / "exp.toml").write_text('[experiment]\nname = "e"\n[profiles.cpu]\nmodels = []\n')
    (root / "deep.toml").write_text("a = " + "[" * 3000 + "]" * 3000)
    (root / "malformed.toml").write_text('[experiment]\nname = 5\n[profiles.cpu]\nmodels = ["m"]\n')
    sd = _tiny_net().state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, root / "w.safetensors")
    torch.save(sd, root / "w.pth")
    g = np.random.default_rng(0)
    x = g.integers(0, 256, (150, 8, 8), dtype=np.uint8)
    y = np.arange(150) % 10
    np.savez(root / "clean.npz", x=x, y=y)
    Image.fromarray(x[0]).save(root / "pic.safetensors", format="PNG")  # a picture with an output's name
    imgs = root / "imgs"
    for c in range(2):
        (imgs / str(c)).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(x[3 * c + i]).save(imgs / str(c) / f"{i}.png")
    # hostile weights
    _torch_zip_with_pickle(root / "odict5.pth", b"\x80\x02ccollections\nOrderedDict\nK\x05\x85R.")
    _torch_zip_with_pickle(root / "rebuild.pth", b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nK\x01K\x02K\x03\x87R.")
    _torch_zip_with_pickle(root / "evil.pth", pickle.dumps(_Evil(), protocol=2))
    (root / "garbage.pth").write_bytes(b"not a pickle at all")
    (root / "trunc.safetensors").write_bytes((root / "w.safetensors").read_bytes()[:40])
    torch.save({"a": "string"}, root / "strings.pth")
    torch.save({"net": {"net": {"net": {"w": torch.zeros(1)}}}}, root / "deep.pth")
    nan = {k: v.clone() for k, v in sd.items()}
    nan["4.weight"][0, 0] = float("nan")
    torch.save(nan, root / "nan.pth")
    # hostile data
    with zipfile.ZipFile(root / "notarray.npz", "w") as zf:
        zf.writestr("x.npy", b"this is not array data")
        zf.writestr("y.npy", b"nor is this")
    np.savez(root / "objects.npz", x=np.array([{"a": 1}] * 3, dtype=object), y=np.arange(3))
    (root / "corrupt.npz").write_bytes(b"PK\x03\x04 broken zip")
    np.savez(root / "nanx.npz", x=np.full((150, 1, 8, 8), np.nan, np.float32), y=y)
    np.savez(root / "nolabels.npz", x=x)
    # a valid manifest and hostile variants
    atk = create_attack("badnets", target=0)
    atk.prepare(None, torch.from_numpy(x[:, None]).float() / 255, torch.from_numpy(y))
    mdir = root / "manifests"
    mdir.mkdir()
    save_manifest(atk, mdir / "ok.attack.json")
    good = json.loads((mdir / "ok.attack.json").read_text())
    (mdir / "list.attack.json").write_text("[1, 2, 3]")
    (mdir / "deep.attack.json").write_text('{"attack": "badnets", "config": ' + "[" * 5000 + "]" * 5000 + "}")
    (mdir / "escape.attack.json").write_text(json.dumps({**good, "trigger_file": "../w.safetensors"}))
    (mdir / "abs.attack.json").write_text(json.dumps({**good, "trigger_file": str(root / "w.safetensors")}))
    (mdir / "noimage.trigger.safetensors").write_bytes(b"\x00" * 64)
    (mdir / "noimage.attack.json").write_text(json.dumps({**good, "trigger_file": "noimage.trigger.safetensors"}))
    (mdir / "target.attack.json").write_text(json.dumps(_with_target(good, 99)))
    (mdir / "unknown.attack.json").write_text(json.dumps({**good, "attack": "rm_rf"}))
    (mdir / "notjson.attack.json").write_text("{this is not json")
    return root


def _with_target(manifest: dict, target: int) -> dict:
    out = json.loads(json.dumps(manifest))
    out["target"] = target
    if isinstance(out.get("config"), dict) and "target" in out["config"]:
        out["config"]["target"] = target
    return out


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def U(*extra, weights="w.safetensors", data="clean.npz", out="OUT/o.safetensors", report="OUT/r.json"):
    """``ibau unlearn`` arguments with the world's inputs, overridden by ``extra``."""
    args = ["unlearn", "--model-def", "W/net.py:build", "--weights", f"W/{weights}", "--data", f"W/{data}",
            "--out", out, "--report", report, "--quiet", "--device", "cpu", "--no-scan"]
    return args + list(extra)


def E(*extra, manifest="ok.attack.json"):
    return ["evaluate", "--model-def", "W/net.py:build", "--weights", "W/w.safetensors", "--data", "W/clean.npz",
            "--manifest", f"W/manifests/{manifest}", "--device", "cpu", *extra]


def P(*extra):
    return ["poison", "--model-def", "W/net.py:build", "--data", "W/clean.npz", "--attack", "badnets",
            "--epochs", "1", "--out", "OUT/p.safetensors", "--quiet", "--device", "cpu", *extra]


def D(*extra, method="neural_cleanse"):
    return ["defend", "--method", method, "--model-def", "W/net.py:build", "--weights", "W/w.safetensors",
            "--data", "W/clean.npz", "--out", "OUT/d.safetensors", "--report", "OUT/d.json", "--quiet",
            "--device", "cpu", *extra]


CASES = {
    # numeric options, refused by the library's validation before any work
    "batch-size 0": (U("--batch-size", "0"), "batch_size"),
    "batch-size negative": (U("--batch-size", "-5"), "batch_size"),
    "norm-bound -1": (U("--norm-bound", "-1"), "norm_bound"),
    "norm-bound nan": (U("--norm-bound", "nan"), "norm_bound"),
    "holdout 0": (U("--holdout", "0"), "holdout"),
    "holdout negative": (U("--holdout", "-0.5"), "holdout"),
    "holdout fractional count": (U("--holdout", "1.5"), "holdout"),
    "holdout all images": (U("--holdout", "150"), "holdout"),
    "holdout nan": (U("--holdout", "nan"), "holdout"),
    "max-rounds 0": (U("--max-rounds", "0"), "max_rounds"),
    "perturb-fraction 2": (U("--perturb-fraction", "2"), "perturb_fraction"),
    "perturb-fraction negative": (U("--perturb-fraction", "-0.1"), "perturb_fraction"),
    "outer-lr nan": (U("--outer-lr", "nan"), "outer_lr"),
    "outer-lr inf": (U("--outer-lr", "inf"), "outer_lr"),
    "outer-lr negative": (U("--outer-lr", "-1"), "outer_lr"),
    "inner-lr inf": (U("--inner-lr", "inf"), "inner_lr"),
    "inner-reg nan": (U("--inner-reg", "nan"), "inner_reg"),
    "hypergrad-iters -1": (U("--hypergrad-iters", "-1"), "hypergrad_iters"),
    "fp-step 0": (U("--fp-step", "0"), "fp_step"),
    "threshold 2": (U("--threshold", "2"), "threshold"),
    "rounds -1": (U("--rounds", "-1"), "rounds"),
    "rounds text": (U("--rounds", "many"), "rounds"),
    "seed negative": (U("--seed", "-1"), "seed"),
    "num-classes -3": (U("--num-classes", "-3"), "num_classes"),
    "num-classes 0": (U("--num-classes", "0"), "num_classes"),
    "robustness-bound 0": (U("--robustness-bound", "0"), "robustness_bound"),
    "batch-size text": (U("--batch-size", "ten"), "batch-size"),
    "normalize 2 values for 1 channel": (U("--normalize", "0.5,0.5/0.2,0.2"), "channel"),
    "normalize garbage": (U("--normalize", "a/b"), "normalize"),
    "normalize zero std": (U("--normalize", "0.5/0"), "normalize"),
    "hypergrad-solver unknown": (U("--hypergrad-solver", "magic"), "hypergrad-solver"),
    # devices
    "device meta": (U("--device", "meta"), "meta"),
    "device cuda absent": (U("--device", "cuda"), "GPU"),
    "device unknown": (U("--device", "tpu9"), "device"),
    # weights files
    "weights OrderedDict(5)": (U(weights="odict5.pth"), "cannot read"),
    "weights _rebuild_tensor_v2(1,2,3)": (U(weights="rebuild.pth"), "cannot read"),
    "weights code-running pickle": (U(weights="evil.pth"), "refusing"),
    "weights garbage": (U(weights="garbage.pth"), "cannot read"),
    "weights truncated safetensors": (U(weights="trunc.safetensors"), "safetensors"),
    "weights strings": (U(weights="strings.pth"), "state dict"),
    "weights nested wrappers": (U(weights="deep.pth"), "does not fit"),
    "weights NaN": (U(weights="nan.pth"), "NaN"),
    "weights a folder": (U(weights="imgs"), "weights"),
    # data files
    "npz member not array data": (U(data="notarray.npz"), "notarray.npz"),
    "npz object array": (U(data="objects.npz"), "objects.npz"),
    "npz corrupt": (U(data="corrupt.npz"), "corrupt.npz"),
    "npz NaN images": (U(data="nanx.npz"), "nan"),
    "npz without labels": (U(data="nolabels.npz"), "y"),
    # inputs are never destroyed, even with --force
    "out is the weights": (U("--force", out="W/w.safetensors"), "input"),
    "report is the data": (U("--force", report="W/clean.npz"), "input"),
    "report-dir is the data folder": (U("--force", "--report-dir", "W/imgs", data="imgs"), "input"),
    "report-dir contains the data": (U("--force", "--report-dir", "W/."), "input"),
    "out inside the data folder": (U("--force", data="imgs", out="W/imgs/0/o.safetensors"), "input"),
    "report is the model definition": (U("--force", report="W/net.py"), "input"),
    "out and report the same": (U(out="OUT/same.safetensors", report="OUT/same.safetensors"), "same place"),
    "out under a file": (U(out="W/plain.txt/o.safetensors"), "not a folder"),
    "out not safetensors": (U(out="OUT/o.pth"), ".safetensors"),
    "report-dir a folder ibau did not write": (U("--force", "--report-dir", "W/manifests"), "did not write"),
    "demo over a folder ibau did not write": (["demo", "--out-dir", "W/imgs", "--force", "--quiet"], "did not write"),
    "demo over the working directory": (["demo", "--out-dir", ".", "--force", "--quiet"], "refusing"),
    "report a device": (U("--force", report="/dev/full"), "not a regular file"),
    # manifests for evaluate
    "manifest a JSON list": (E(manifest="list.attack.json"), "manifest"),
    "manifest deeply nested": (E(manifest="deep.attack.json"), "manifest"),
    "manifest trigger outside its folder": (E(manifest="escape.attack.json"), "manifest"),
    "manifest absolute trigger path": (E(manifest="abs.attack.json"), "manifest"),
    "manifest trigger not a tensor file": (E(manifest="noimage.attack.json"), "trigger"),
    "manifest target out of range": (E(manifest="target.attack.json"), "99"),
    "manifest unknown attack": (E(manifest="unknown.attack.json"), "rm_rf"),
    "manifest not JSON": (E(manifest="notjson.attack.json"), "manifest"),
    "manifest missing": (E(manifest="nope.attack.json"), "not found"),
    "evaluate json over the weights": (E("--json", "W/w.safetensors", "--force"), "input"),
    "evaluate json over the manifest": (E("--json", "W/manifests/ok.attack.json", "--force"), "input"),
    "evaluate json over the trigger file": (E("--json", "W/manifests/ok.attack.trigger.safetensors", "--force"),
                                            "input"),
    "poison out over the attack's picture": (P("--force", "--attack", "blend", "--attack-option",
                                               "image='W/pic.safetensors'", "--out", "W/pic.safetensors"), "input"),
    # poison
    "poison ratio 2": (P("--ratio", "2"), "ratio"),
    "poison ratio 0": (P("--ratio", "0"), "ratio"),
    "poison target 99": (P("--target", "99"), "99"),
    "poison subset 0": (P("--subset", "0"), "subset"),
    "poison lr nan": (P("--lr", "nan"), "lr"),
    "poison epochs -1": (P("--epochs", "-1"), "epochs"),
    "poison batch-size 0": (P("--batch-size", "0"), "batch_size"),
    "poison unknown attack": (P("--attack", "nope"), "nope"),
    "poison attack option without =": (P("--attack-option", "oops"), "KEY=VALUE"),
    "poison unknown attack option": (P("--attack-option", "colour=5"), "colour"),
    "poison out over the trigger weights": (P("--force", "--trigger-weights", "W/w.safetensors", "--out",
                                              "W/w.safetensors"), "input"),
    # defend
    "defend unknown method": (D(method="nope"), "nope"),
    "defend unknown setting": (D("--param", "nosuch=1"), "nosuch"),
    "defend negative epochs": (D("--param", "epochs=-1"), "epochs"),
    "defend holdout 0": (D("--holdout", "0"), "holdout"),
    "defend seed among the settings": (D("--param", "seed=-1"), "seed"),
    "defend progress among the settings": (D("--param", "progress=5"), "progress"),
    "defend setting of the wrong type": (D("--param", "lr=[1, 2]"), "lr"),
    "poison blend picture not an image": (P("--attack", "blend", "--attack-option", "image='W/plain.txt'"), "picture"),
    # bench
    "bench missing config": (["bench", "list", "W/nope.toml"], "nope.toml"),
    "bench negative workers": (["bench", "run", "W/nope.toml", "--workers", "-1"], "workers"),
    "bench deeply nested TOML": (["bench", "list", "W/deep.toml"], "nested too deeply"),
    "bench malformed experiment": (["bench", "list", "W/malformed.toml"], "malformed"),
    "bench report over its experiment file": (["bench", "report", "W/exp.toml", "--out", "W/exp.toml"], "input"),
    "bench device meta": (["bench", "run", "W/malformed.toml", "--device", "meta"], "meta"),
}


def _materialise(args: list[str], world: Path, out: Path) -> list[str]:
    return [a.replace("W/", f"{world}/").replace("OUT/", f"{out}/") for a in args]


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input_is_refused_cleanly(name, world, tmp_path, capsys):
    args, expected = CASES[name]
    before = _digest(world)
    out = tmp_path / "out"
    t0 = time.perf_counter()
    code = main(_materialise(args, world, out))
    seconds = time.perf_counter() - t0
    captured = capsys.readouterr()
    err_lines = captured.err.strip().splitlines()
    assert code == 2, (name, captured.err[-2000:])
    assert len(err_lines) == 1 and err_lines[0].startswith("ibau: error: "), (name, captured.err[-2000:])
    assert "Traceback" not in captured.err + captured.out
    assert expected.lower() in err_lines[0].lower(), (name, err_lines[0])
    assert _digest(world) == before, f"{name}: an input file changed"
    assert not out.exists() or not any(out.iterdir()), f"{name}: something was written"
    assert seconds < 60, (name, seconds)
    assert not Path("/tmp/ibau_pwned").exists()


def test_there_are_at_least_40_hostile_cases():
    assert len(CASES) >= 40


def test_a_corrupt_or_hostile_checkpoint_beside_out_is_refused_with_how_to_start_over(world, tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    for payload in (b"garbage", pickle.dumps(_Evil(), protocol=2)):
        ckpt = tmp_path / "p.safetensors.ckpt"
        ckpt.write_bytes(payload)
        code = main(_materialise(P("--out", str(out)), world, tmp_path))
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert "delete" in err[0] and str(ckpt) in err[0], err
        assert ckpt.read_bytes() == payload and not out.exists()
    assert not Path("/tmp/ibau_pwned").exists()


def test_existing_outputs_need_force_and_evaluate_json_is_not_replaced(world, tmp_path, capsys):
    target = tmp_path / "metrics.json"
    target.write_text("keep")
    code = main(_materialise(E("--json", str(target)), world, tmp_path))
    err = capsys.readouterr().err
    assert code == 2 and "--force" in err and target.read_text() == "keep"
    code = main(_materialise(E("--json", str(target), "--force"), world, tmp_path))
    capsys.readouterr()
    assert code == 0 and json.loads(target.read_text())["images"] == 150


def test_outputs_get_the_users_umask(world, tmp_path, capsys):
    target = tmp_path / "metrics.json"
    old = os.umask(0o022)
    try:
        assert main(_materialise(E("--json", str(target)), world, tmp_path)) == 0
    finally:
        os.umask(old)
    capsys.readouterr()
    assert target.stat().st_mode & 0o777 == 0o644


def test_sigterm_behaves_like_sigint(world, tmp_path):
    """A real process: SIGTERM during the work says what was written and exits 143.
    The signal is sent once the run's progress bar shows that the work has started."""
    import signal
    import subprocess
    import sys
    import threading

    args = _materialise(U("--rounds", "10000", "--batch-size", "10", out="OUT/o.safetensors", report="OUT/r.json"),
                        world, tmp_path / "o")
    args.remove("--quiet")
    proc = subprocess.Popen([sys.executable, "-m", "ibau", *args], stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    chunks: list[str] = []
    started = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        while True:
            c = proc.stderr.read(1)
            if not c:
                return
            chunks.append(c)
            if "%" in c or "it/s" in "".join(chunks[-8:]):
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert started.wait(180), "".join(chunks)[-2000:]
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    reader.join(timeout=30)
    err = "".join(chunks)
    assert proc.returncode == 143, err[-2000:]
    assert "ibau: terminated; nothing was written" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_a_real_process_prints_exactly_one_line(world, tmp_path):
    """Outside pytest's capture: no warning text, no traceback, one line on stderr, exit 2,
    for a code-running pickle saved with pickle protocol 4 (torch warns about it)."""
    import shutil
    import subprocess
    import sys

    evil = tmp_path / "evil4.pth"
    with open(evil, "wb") as fh:
        pickle.dump({"w": _Evil()}, fh, protocol=4)
    shutil.copy(evil, world / "evil4.pth")
    try:
        for args, expected in ((U(weights="evil4.pth"), "refusing"), (U("--batch-size", "0"), "batch_size")):
            proc = subprocess.run([sys.executable, "-m", "ibau", *_materialise(args, world, tmp_path / "o")],
                                  capture_output=True, text=True, timeout=120)
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("ibau: error: "), proc.stderr
            assert expected in lines[0], lines
    finally:
        (world / "evil4.pth").unlink()
        assert proc.stdout == ""
    assert not Path("/tmp/ibau_pwned").exists()

"""``ibau evaluate --trigger-image``: a known trigger, no manifest (issue 14, item 5).

The three modes stamp exactly as documented (compared with the formula computed here
from the pixel arrays written to the files), bad option combinations and files end with
one ``ibau: error:`` line and exit status 2, and on the toy backdoored model of
:mod:`ibau.testing` the true trigger, given as files, has a high ASR that matches the
package's own measure, while the same files sending images to another class do not.
"""

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ibau import save_weights
from ibau import testing as toy
from ibau.attacks import ImageTrigger
from ibau.cli import main
from ibau.errors import InputError
from ibau.jobs import DataSource, ModelSource
from ibau.jobs.commands import evaluate_job
from ibau.metrics import attack_success_rate

S = toy.S


def _png(path, arr):
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(path)
    return path


def _chw(arr_hwc):
    a = torch.from_numpy(np.asarray(arr_hwc, dtype=np.float32))
    return a.unsqueeze(0) if a.dim() == 2 else a.permute(2, 0, 1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Toy backdoored weights, its test data, and the true trigger as files: a white picture
    with a mask on the 2x2 patch, and the same patch as an additive perturbation image."""
    root = tmp_path_factory.mktemp("trigger_world")
    threads = torch.get_num_threads()  # module fixtures run before conftest's one-thread fixture
    torch.set_num_threads(1)
    try:
        _write_world(root)
    finally:
        torch.set_num_threads(threads)
    return root


def _write_world(root):
    (root / "net.py").write_text("from ibau.testing import TinyNet\n"
                                 "def make(num_classes=4):\n    return TinyNet(num_classes)\n")
    save_weights(toy.poisoned_model(0), root / "w.safetensors")
    x, y = toy.make_data(300, 21)
    np.savez(root / "test.npz", x=x.numpy(), y=y.numpy())
    _png(root / "white.png", np.full((S, S, 3), 255))
    m = np.zeros((S, S), dtype=np.uint8)
    m[-3:-1, -3:-1] = 255
    _png(root / "mask.png", m)
    _png(root / "mask_top_left.png", np.roll(m, (-5, -5), axis=(0, 1)))
    d = np.full((S, S, 3), 128, dtype=np.uint8)
    d[-3:-1, -3:-1] = 255
    _png(root / "additive.png", d)
    _png(root / "big.png", np.full((2 * S, 2 * S, 3), 255))
    _png(root / "colour_mask.png", np.stack([m, m // 2, m], -1))
    (root / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")


def E(world, *extra):
    return ["evaluate", "--model-def", f"{world / 'net.py'}:make", "--weights", str(world / "w.safetensors"),
            "--data", str(world / "test.npz"), "--device", "cpu", *extra]


# -- the three modes stamp as documented ---------------------------------------------------
def test_mask_mode_stamps_one_minus_m_x_plus_m_t(tmp_path):
    rng = np.random.default_rng(0)
    pic = rng.integers(0, 256, (S, S, 3), dtype=np.uint8)
    mask = rng.integers(0, 256, (S, S), dtype=np.uint8)  # fractional values mix
    trig = ImageTrigger(_png(tmp_path / "t.png", pic), mask=_png(tmp_path / "m.png", mask), target=1,
                        image_shape=(3, S, S))
    x = torch.rand(5, 3, S, S)
    m, t = _chw(mask) / 255, _chw(pic) / 255
    assert torch.allclose(trig.apply(x), (1 - m) * x + m * t, atol=1e-6)
    assert trig.apply(x[0]).shape == (3, S, S)  # one image
    # a grayscale picture is used for every channel; an RGBA picture's alpha is dropped
    gray = rng.integers(0, 256, (S, S), dtype=np.uint8)
    trig = ImageTrigger(_png(tmp_path / "g.png", gray), mask=tmp_path / "m.png", target=1)
    assert torch.allclose(trig.apply(x), (1 - m) * x + m * (_chw(gray) / 255), atol=1e-6)
    rgba = np.concatenate([pic, np.zeros((S, S, 1), dtype=np.uint8)], -1)  # fully transparent
    trig = ImageTrigger(_png(tmp_path / "a.png", rgba), mask=tmp_path / "m.png", target=1)
    assert torch.allclose(trig.apply(x), (1 - m) * x + m * t, atol=1e-6)
    # a .npy mask is taken as it is
    mf = rng.random((1, S, S)).astype(np.float32)
    np.save(tmp_path / "m.npy", mf)
    trig = ImageTrigger(tmp_path / "t.png", mask=tmp_path / "m.npy", target=1)
    mt = torch.from_numpy(mf)
    assert torch.allclose(trig.apply(x), (1 - mt) * x + mt * t, atol=1e-6)


def test_blend_mode_stamps_one_minus_alpha_x_plus_alpha_t(tmp_path):
    pic = np.random.default_rng(1).integers(0, 256, (S, S, 3), dtype=np.uint8)
    x = torch.rand(4, 3, S, S)
    t = _chw(pic) / 255
    for alpha in (0.2, 1.0):
        trig = ImageTrigger(_png(tmp_path / "t.png", pic), mode="blend", alpha=alpha, target=0)
        assert torch.allclose(trig.apply(x), (1 - alpha) * x + alpha * t, atol=1e-6)
    assert torch.allclose(trig.apply(x), t.expand_as(x), atol=1e-6)  # alpha 1: the picture itself


def test_additive_mode_reads_128_as_zero(tmp_path):
    v = np.random.default_rng(2).integers(0, 256, (S, S, 3), dtype=np.uint8)
    v[0, :4] = np.array([0, 1, 128, 255])[:, None]  # the documented fixed points, in every channel
    trig = ImageTrigger(_png(tmp_path / "d.png", v), mode="additive", target=2)
    x = torch.rand(6, 3, S, S)
    out = trig.apply(x)
    assert torch.allclose(out, (x + (_chw(v) - 128) / 127).clamp(0, 1), atol=1e-6)
    assert torch.equal(out[:, :, 0, 2], x[:, :, 0, 2])  # 128: no change, exactly
    assert torch.equal(out[:, :, 0, 3], torch.ones_like(x[:, :, 0, 3]))  # 255: +1 -> white
    assert torch.equal(out[:, :, 0, 0], torch.zeros_like(x[:, :, 0, 0]))  # 0 and 1: -1 -> black
    assert torch.equal(out[:, :, 0, 1], torch.zeros_like(x[:, :, 0, 1]))
    # a .npy perturbation is d itself
    d = np.random.default_rng(3).uniform(-0.1, 0.1, (3, S, S)).astype(np.float32)
    np.save(tmp_path / "d.npy", d)
    trig = ImageTrigger(tmp_path / "d.npy", mode="additive", target=2)
    assert torch.allclose(trig.apply(x), (x + torch.from_numpy(d)).clamp(0, 1), atol=1e-6)
    np.save(tmp_path / "big.npy", 2 * d + 1.5)
    with pytest.raises(InputError, match=r"\[-1, 1\]"):
        ImageTrigger(tmp_path / "big.npy", mode="additive", target=2)


def test_library_refuses_what_does_not_fit(tmp_path):
    _png(tmp_path / "rgb.png", np.full((S, S, 3), 200))
    _png(tmp_path / "m.png", np.full((S, S), 255))
    with pytest.raises(InputError, match="channels"):  # an RGB trigger on grayscale images
        ImageTrigger(tmp_path / "rgb.png", mask=tmp_path / "m.png", target=0, image_shape=(1, S, S))
    trig = ImageTrigger(tmp_path / "rgb.png", mask=tmp_path / "m.png", target=0)
    with pytest.raises(InputError, match="16x16"):  # checked per batch without image_shape
        trig.apply(torch.rand(2, 3, 16, 16))
    with pytest.raises(InputError, match="alpha"):
        ImageTrigger(tmp_path / "rgb.png", mode="blend", alpha=0, target=0)
    with pytest.raises(InputError, match="needs a mask"):
        ImageTrigger(tmp_path / "rgb.png", mode="mask", target=0)
    with pytest.raises(InputError, match="target"):
        ImageTrigger(tmp_path / "rgb.png", mode="additive", target=4, num_classes=4)
    with pytest.raises(InputError, match="mode"):
        ImageTrigger(tmp_path / "rgb.png", mode="paste", target=0)


# -- the command: end to end on a backdoored toy model --------------------------------------
def test_evaluate_known_trigger_measures_the_backdoor(world, tmp_path, capsys):
    out = tmp_path / "e.json"
    assert main(E(world, "--trigger-image", str(world / "white.png"), "--mask", str(world / "mask.png"),
                  "--target", "0", "--json", str(out))) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("ACC ") and "ASR" in line and "(300 images)" in line
    ev = json.loads(out.read_text())
    x, y = toy.make_data(300, 21)
    expected = attack_success_rate(toy.poisoned_model(0), x, y, toy.trigger(), toy.TARGET)
    assert ev["asr"] > 0.9 and ev["asr"] == pytest.approx(expected)  # the package's measure, non-target images
    assert ev["manifest"] is None and ev["images"] == 300 and {"acc", "asr_all", "ra"} <= set(ev)
    trig = ev["trigger"]
    assert trig["mode"] == "mask" and trig["target"] == 0 and trig["file"] == str(world / "white.png")
    assert trig["sha256"] == hashlib.sha256((world / "white.png").read_bytes()).hexdigest()
    assert trig["mask_sha256"] == hashlib.sha256((world / "mask.png").read_bytes()).hexdigest()
    # the same pixels as an additive perturbation (255 = +1 on the patch, 128 elsewhere)
    assert main(E(world, "--trigger-image", str(world / "additive.png"), "--additive", "--target", "0",
                  "--json", str(tmp_path / "a.json"))) == 0
    ea = json.loads((tmp_path / "a.json").read_text())
    assert ea["asr"] == pytest.approx(ev["asr"]) and ea["trigger"]["mode"] == "additive"
    # the trigger somewhere else, or another target: no backdoor to measure
    assert main(E(world, "--trigger-image", str(world / "white.png"), "--mask", str(world / "mask_top_left.png"),
                  "--target", "0", "--json", str(tmp_path / "tl.json"))) == 0
    assert json.loads((tmp_path / "tl.json").read_text())["asr"] < 0.5
    capsys.readouterr()
    assert main(E(world, "--trigger-image", str(world / "white.png"), "--blend", "0.5", "--target", "1")) == 0
    printed = capsys.readouterr().out
    report = json.loads(printed[:printed.rindex("}") + 1])  # without --json the metrics are printed
    assert report["asr"] < 0.5 and report["trigger"]["alpha"] == 0.5 and report["trigger"]["target"] == 1


BAD = {
    "no target": (["--trigger-image", "white.png", "--mask", "mask.png"], "needs --target"),
    "no mode": (["--trigger-image", "white.png", "--target", "0"], "one of --mask FILE, --blend ALPHA or --additive"),
    "two modes": (["--trigger-image", "white.png", "--mask", "mask.png", "--additive", "--target", "0"],
                  "not allowed with argument --mask"),
    "blend and mask": (["--trigger-image", "white.png", "--blend", "0.2", "--mask", "mask.png", "--target", "0"],
                       "not allowed with argument --blend"),
    "manifest and trigger image": (["--manifest", "m.json", "--trigger-image", "white.png", "--additive",
                                    "--target", "0"], "not allowed with argument --manifest"),
    "neither": (["--target", "0"], "one of the arguments --manifest --trigger-image is required"),
    "target with manifest": (["--manifest", "m.json", "--target", "0"], "--target go with --trigger-image"),
    "target out of range": (["--trigger-image", "white.png", "--mask", "mask.png", "--target", "4"],
                            "target 4 is not a class of the model: it must lie in [0, 4)"),
    "negative target": (["--trigger-image", "white.png", "--additive", "--target", "-1"], "target must be >= 0"),
    "wrong size": (["--trigger-image", "big.png", "--blend", "0.2", "--target", "0"],
                   "is 16x16 (HxW) but the images are 8x8"),
    "mask of wrong size": (["--trigger-image", "white.png", "--mask", "big.png", "--target", "0"],
                           "is 16x16 (HxW) but the images are 8x8"),
    "blend 0": (["--trigger-image", "white.png", "--blend", "0", "--target", "0"], "alpha must be > 0"),
    "blend above 1": (["--trigger-image", "white.png", "--blend", "1.5", "--target", "0"], "alpha must be <= 1"),
    "colour mask": (["--trigger-image", "white.png", "--mask", "colour_mask.png", "--target", "0"],
                    "must be grayscale"),
    "unreadable image": (["--trigger-image", "garbage.png", "--additive", "--target", "0"], "cannot read"),
    "missing image": (["--trigger-image", "nothing.png", "--additive", "--target", "0"], "file not found"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_trigger_options_end_with_one_error_line(world, capsys, case):
    extra, message = BAD[case]
    extra = [str(world / a) if a.endswith((".png", ".json")) else a for a in extra]
    out = world / "never.json"
    assert main(E(world, *extra, "--json", str(out))) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ibau: error: "), captured.err
    assert message in err[0]
    assert captured.out == "" and not out.exists()


def test_json_never_replaces_the_trigger_files(world, capsys):
    before = (world / "white.png").read_bytes()
    assert main(E(world, "--trigger-image", str(world / "white.png"), "--mask", str(world / "mask.png"),
                  "--target", "0", "--json", str(world / "white.png"), "--force")) == 2
    assert "ibau: error:" in capsys.readouterr().err
    assert (world / "white.png").read_bytes() == before


def test_job_takes_a_manifest_or_a_trigger(world):
    model = ModelSource(model_def=f"{world / 'net.py'}:make", weights=world / "w.safetensors")
    data = DataSource(spec=str(world / "test.npz"))
    with pytest.raises(InputError, match="not both"):
        evaluate_job(model, data, manifest=world / "m.json", trigger_image=world / "white.png",
                     trigger_mode="additive", target=0)
    with pytest.raises(InputError, match="manifest .* or a trigger image"):
        evaluate_job(model, data)
    with pytest.raises(InputError, match="needs a mode"):
        evaluate_job(model, data, trigger_image=world / "white.png", target=0)
    written = evaluate_job(model, data, trigger_image=world / "white.png", trigger_mode="mask",
                           mask=world / "mask.png", target=0, device="cpu")
    assert written.report["asr"] > 0.9 and written.report["trigger"]["mode"] == "mask"


def test_option_combinations_are_refused_before_any_file_is_read(tmp_path, capsys):
    """The weights, data and trigger files do not exist: the missing mode is still what is said."""
    assert main(["evaluate", "--arch", "small_vgg", "--weights", str(tmp_path / "none.safetensors"), "--data",
                 str(tmp_path / "none.npz"), "--trigger-image", str(tmp_path / "none.png"), "--target", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ibau: error: --trigger-image needs one of --mask") and err.count("\n") == 1

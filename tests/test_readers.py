"""Tests for ibau.data.readers: every format is faked on disk in a temporary folder."""

from __future__ import annotations

import csv
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ibau.data import readers
from ibau.data.readers import (
    DATASETS,
    DataError,
    check_dataset,
    load_cifar10,
    load_dataset,
    load_gtsrb,
    load_image_folder,
    load_npz,
)

# --------------------------------------------------------------------------- npz


def _npz(tmp_path: Path, name: str = "d.npz", **arrays) -> Path:
    p = tmp_path / name
    np.savez(p, **arrays)
    return p


def test_npz_uint8_nhwc_layout(tmp_path):
    x = np.zeros((4, 5, 6, 3), dtype=np.uint8)
    x[2, 1, 4, 0] = 255   # image 2, row 1, col 4, red
    x[2, 3, 0, 2] = 51    # image 2, row 3, col 0, blue
    y = np.array([0, 1, 2, 1], dtype=np.uint8)
    xt, yt = load_npz(_npz(tmp_path, x=x, y=y))
    assert xt.shape == (4, 3, 5, 6) and xt.dtype == torch.float32
    assert yt.dtype == torch.int64 and yt.tolist() == [0, 1, 2, 1]
    assert xt[2, 0, 1, 4] == 1.0
    assert xt[2, 2, 3, 0] == pytest.approx(0.2)
    assert xt.sum() == pytest.approx(1.2)
    assert xt.is_contiguous()


def test_npz_float_nchw_kept(tmp_path):
    x = np.random.default_rng(0).random((3, 1, 4, 4)).astype(np.float64)
    xt, yt = load_npz(_npz(tmp_path, x=x, y=np.array([0.0, 1.0, 1.0])))
    assert xt.dtype == torch.float32 and xt.shape == (3, 1, 4, 4)
    assert torch.allclose(xt, torch.from_numpy(x).float())
    assert yt.dtype == torch.int64 and yt.tolist() == [0, 1, 1]


def test_npz_float_tiny_overshoot_clamped(tmp_path):
    x = np.full((2, 1, 2, 2), 1 + 5e-7, dtype=np.float32)
    x[0] = -5e-7
    xt, _ = load_npz(_npz(tmp_path, x=x, y=np.array([0, 1])))
    assert xt.min() == 0.0 and xt.max() == 1.0


def test_npz_grayscale_nhw(tmp_path):
    x = np.zeros((2, 3, 4), dtype=np.uint8)
    x[1, 2, 3] = 255
    xt, _ = load_npz(_npz(tmp_path, x=x, y=np.array([0, 1])))
    assert xt.shape == (2, 1, 3, 4)
    assert xt[1, 0, 2, 3] == 1.0 and xt.sum() == 1.0


def test_npz_never_unpickles(tmp_path):
    p = tmp_path / "obj.npz"
    np.savez(p, x=np.array([object()], dtype=object), y=np.array([0]))
    with pytest.raises(DataError, match="no object arrays"):
        load_npz(p)


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"x": np.zeros((2, 4, 4, 3), np.uint8)}, r"no array 'y' \(it has: x\)"),
        ({"images": np.zeros((2, 4, 4, 3), np.uint8), "labels": np.zeros(2)},
         r"no array 'x' or 'y' \(it has: images, labels\)"),
        ({"x": np.zeros((10, 32), np.uint8), "y": np.zeros(10, int)}, r"4 dimensions .*\(10, 32\)"),
        ({"x": np.zeros((10, 32, 32), np.float32), "y": np.zeros(10, int)},
         r"4 dimensions \(N,H,W,C uint8 or N,C,H,W float\), got shape \(10, 32, 32\)"),
        ({"x": np.zeros((3, 4, 4, 3), np.uint8), "y": np.zeros(2, int)}, "3 images but y has 2 labels"),
        ({"x": np.zeros((2, 4, 4, 3), np.uint8), "y": np.array([0.0, 1.5])}, "non-integer labels"),
        ({"x": np.zeros((2, 4, 4, 3), np.uint8), "y": np.array([0, -1])}, "negative label -1"),
        ({"x": np.zeros((2, 4, 4, 3), np.uint8), "y": np.zeros((2, 1), int)}, r"1-D.*reshape\(-1\)"),
        ({"x": np.full((2, 1, 4, 4), 2.0, np.float32), "y": np.zeros(2, int)}, r"\[0,1\], got \[2, 2\]"),
        ({"x": np.full((2, 1, 4, 4), np.nan, np.float32), "y": np.zeros(2, int)}, "NaN or inf"),
        ({"x": np.zeros((2, 32, 32, 3), np.float32), "y": np.zeros(2, int)}, r"looks like N,H,W,C"),
        ({"x": np.zeros((2, 3, 32, 32), np.uint8), "y": np.zeros(2, int)}, r"looks like N,C,H,W"),
        ({"x": np.zeros((2, 4, 4, 3), np.int32), "y": np.zeros(2, int)}, "dtype int32"),
        ({"x": np.zeros((0, 4, 4, 3), np.uint8), "y": np.zeros(0, int)}, "0 images"),
    ],
)
def test_npz_errors(tmp_path, arrays, match):
    with pytest.raises(DataError, match=match) as info:
        load_npz(_npz(tmp_path, **arrays))
    assert "\n" not in str(info.value) and ": " in str(info.value)


def test_npz_missing_and_not_zip(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_npz(tmp_path / "nope.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"this is not a zip archive at all")
    with pytest.raises(DataError, match=r"not a readable \.npz.*np\.savez"):
        load_npz(bad)
    single = tmp_path / "one.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(DataError, match="single array"):
        load_npz(single)
    assert issubclass(DataError, ValueError)


# ------------------------------------------------------------------ image folder


def _png(path: Path, color, size=(4, 3), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_image_folder_labels_and_pixels(tmp_path):
    # class names deliberately created out of order: labels must follow sorted names
    for name, color in [("zebra", (0, 0, 255)), ("ant", (255, 0, 0))]:
        for i in range(3):
            _png(tmp_path / name / f"{i}.PNG", color)
    (tmp_path / "ant" / "notes.txt").write_text("ignored")
    (tmp_path / ".hidden").mkdir()
    x, y, names = load_image_folder(tmp_path)
    assert names == ["ant", "zebra"]
    assert x.shape == (6, 3, 3, 4) and x.dtype == torch.float32
    assert y.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.all(x[:3, 0] == 1) and torch.all(x[:3, 1:] == 0)  # ant = red
    assert torch.all(x[3:, 2] == 1) and torch.all(x[3:, :2] == 0)  # zebra = blue


def test_image_folder_grayscale_and_mixed_modes(tmp_path):
    for name, v in [("a", 51), ("b", 204)]:
        for i in range(3):
            _png(tmp_path / name / f"{i}.png", v, mode="L")
    x, y, _ = load_image_folder(tmp_path)
    assert x.shape == (6, 1, 3, 4)
    assert torch.allclose(x[:3], torch.tensor(0.2)) and torch.allclose(x[3:], torch.tensor(0.8))
    _png(tmp_path / "b" / "3.jpg", (10, 20, 30))  # one colour image -> everything RGB
    x, y, _ = load_image_folder(tmp_path)
    assert x.shape == (7, 3, 3, 4) and y.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert torch.allclose(x[0], torch.tensor(0.2))  # grey replicated on R, G, B


def test_image_folder_sizes(tmp_path):
    _png(tmp_path / "a" / "0.png", (255, 0, 0), size=(4, 3))
    _png(tmp_path / "b" / "0.png", (0, 255, 0), size=(8, 6))
    with pytest.raises(DataError, match=r"differ in size.*pass size="):
        load_image_folder(tmp_path)
    x, y, _ = load_image_folder(tmp_path, size=(5, 7))
    assert x.shape == (2, 3, 5, 7)
    assert torch.allclose(x[1, 1], torch.tensor(1.0)) and torch.allclose(x[1, 0], torch.tensor(0.0))
    assert load_image_folder(tmp_path, size=2)[0].shape == (2, 3, 2, 2)
    with pytest.raises(DataError, match="size must be"):
        load_image_folder(tmp_path, size=(0, 3))


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="folder not found"):
        load_image_folder(tmp_path / "missing")
    _png(tmp_path / "loose.png", (0, 0, 0))
    with pytest.raises(DataError, match=r"no class sub-folders \(it holds 1 loose images\)"):
        load_image_folder(tmp_path)
    _png(tmp_path / "cats" / "0.png", (0, 0, 0))
    (tmp_path / "dogs").mkdir()
    (tmp_path / "dogs" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"class folder .*dogs has no images"):
        load_image_folder(tmp_path)
    (tmp_path / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match=r"cannot read image .*broken\.jpg"):
        load_image_folder(tmp_path)


def test_image_folder_truncated_image_named(tmp_path):
    _png(tmp_path / "a" / "0.png", (1, 2, 3), size=(16, 16))
    good = tmp_path / "b" / "0.png"
    _png(good, (1, 2, 3), size=(16, 16))
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])  # valid header, damaged body
    with pytest.raises(DataError, match=r"cannot read image .*b.0\.png"):
        load_image_folder(tmp_path)


# ----------------------------------------------------------------------- CIFAR-10


def _cifar_records(n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, n)]
    return data, labels


class _Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 byte strings, as in the official CIFAR files."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_str8(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = _save_str8
    dispatch[str] = _save_str8


def _py2_pickle(obj) -> bytes:
    """A protocol-2 pickle shaped like one written by Python 2 with numpy 1.x."""
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


def _write_cifar_py(folder: Path, n: int = 5, protocol: int | str = pickle.DEFAULT_PROTOCOL) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data, labels = _cifar_records(n, i)
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"img_{j}.png".encode() for j in range(n)]}
        if protocol == "py2":
            (folder / name).write_bytes(_py2_pickle(batch))
        else:
            with open(folder / name, "wb") as f:
                pickle.dump(batch, f, protocol=protocol)
        out[name] = (data, labels)
    return out


def _expected(data: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32) / 255)


@pytest.mark.parametrize("protocol", ["py2", 4, 5])
def test_cifar_python(tmp_path, protocol):
    truth = _write_cifar_py(tmp_path / "cifar-10-batches-py", protocol=protocol)
    # a known pixel: row 2, col 7 of each plane
    x, y = load_cifar10(tmp_path, split="test")
    data, labels = truth["test_batch"]
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.tolist() == labels
    for c in range(3):
        assert x[3, c, 2, 7] == pytest.approx(data[3, c * 1024 + 2 * 32 + 7] / 255)
    assert torch.equal(x, _expected(data))
    xtr, ytr = load_cifar10(tmp_path / "cifar-10-batches-py", split="train")  # root itself holds the files
    assert xtr.shape == (25, 3, 32, 32)
    assert ytr.tolist() == sum((truth[f"data_batch_{k}"][1] for k in range(1, 6)), [])
    assert torch.equal(xtr[10:15], _expected(truth["data_batch_3"][0]))


def test_cifar_python_str_keys(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    data, labels = _cifar_records(3, 0)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": data, "labels": np.array(labels)}, f)
    x, y = load_cifar10(tmp_path)
    assert y.tolist() == labels and torch.equal(x, _expected(data))


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_malicious_pickle_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar_py(folder)
    marker = tmp_path / "pwned"
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": _Evil(marker), b"labels": [0]}, f)
    with pytest.raises(DataError, match=r"refusing to unpickle (posix|nt|os)\.system from .*test_batch"):
        load_cifar10(tmp_path, split="test")
    assert not marker.exists()
    # the payload really would have run with a plain unpickler (keeps the test honest)
    with open(folder / "test_batch", "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_cifar_python_bad_files(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"cannot read CIFAR batch .*test_batch"):
        load_cifar10(tmp_path)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 1]}, f)
    with pytest.raises(DataError, match="CIFAR-100"):
        load_cifar10(tmp_path)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(DataError, match=r"expected uint8 \(N, 3072\)"):
        load_cifar10(tmp_path)
    (folder / "data_batch_1").write_bytes(b"")
    with pytest.raises(DataError, match=r"missing .*data_batch_2, data_batch_3"):
        load_cifar10(tmp_path, split="train")


def _write_cifar_bin(folder: Path, n: int = 4) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, name in enumerate([f"data_batch_{k}.bin" for k in range(1, 6)] + ["test_batch.bin"]):
        data, labels = _cifar_records(n, 100 + i)
        records = np.concatenate([np.array(labels, np.uint8)[:, None], data], axis=1)
        (folder / name).write_bytes(records.tobytes())
        out[name] = (data, labels)
    return out


def test_cifar_binary(tmp_path):
    truth = _write_cifar_bin(tmp_path / "cifar-10-batches-bin", n=4)
    x, y = load_cifar10(tmp_path, split="test")
    data, labels = truth["test_batch.bin"]
    assert x.shape == (4, 3, 32, 32) and y.tolist() == labels
    assert x[1, 0, 0, 0] == pytest.approx(data[1, 0] / 255)          # R plane first pixel
    assert x[1, 1, 31, 31] == pytest.approx(data[1, 2047] / 255)      # G plane last pixel
    assert x[1, 2, 5, 9] == pytest.approx(data[1, 2048 + 5 * 32 + 9] / 255)
    xtr, ytr = load_cifar10(tmp_path, split="train")
    assert xtr.shape == (20, 3, 32, 32)
    assert torch.equal(xtr[16:], _expected(truth["data_batch_5.bin"][0]))
    assert ytr[:4].tolist() == truth["data_batch_1.bin"][1]


def test_cifar_binary_bad_size(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    (folder / "test_batch.bin").write_bytes(bytes(3073 * 2 + 5))
    with pytest.raises(DataError, match=r"not a multiple of 3073"):
        load_cifar10(tmp_path)
    (folder / "test_batch.bin").write_bytes(bytes([11]) + bytes(3072))
    with pytest.raises(DataError, match=r"range 11\.\.11, expected 0\.\.9"):
        load_cifar10(tmp_path)


def test_cifar_not_found(tmp_path):
    with pytest.raises(DataError, match=r"no CIFAR-10 test files found \(looked for .*cifar-10-batches-py.*"
                                        r"cifar-10-batches-bin"):
        load_cifar10(tmp_path)
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"")
    with pytest.raises(DataError, match="tar xzf"):
        load_cifar10(tmp_path)
    with pytest.raises(DataError, match="unknown split 'val'"):
        load_cifar10(tmp_path, split="val")


# -------------------------------------------------------------------------- GTSRB

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)
_HEADER = ["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"]


def _sign(path: Path, w: int, h: int, roi: tuple[int, int, int, int], color) -> None:
    """A w x h image, BLUE outside the inclusive ROI and ``color`` inside it."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:] = BLUE
    x1, y1, x2, y2 = roi
    a[y1:y2 + 1, x1:x2 + 1] = color
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)  # .ppm by suffix


def _write_csv(path: Path, rows: list[list], header=_HEADER) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=";")
        w.writerow(header)
        w.writerows(rows)


def _gtsrb_train(root: Path) -> None:
    specs = {0: [(30, 25, (5, 5, 24, 19)), (40, 44, (3, 6, 35, 39))],
             1: [(29, 31, (4, 5, 24, 26)), (50, 35, (10, 2, 40, 30)), (33, 33, (0, 0, 32, 32))]}
    for cls, imgs in specs.items():
        d = root / "GTSRB" / "Final_Training" / "Images" / f"{cls:05d}"
        rows = []
        for j, (w, h, roi) in enumerate(imgs):
            name = f"00000_{j:05d}.ppm"
            _sign(d / name, w, h, roi, RED if cls == 0 else GREEN)
            rows.append([name, w, h, *roi, cls])
        _write_csv(d / f"GT-{cls:05d}.csv", rows)


def test_gtsrb_train_crop_resize(tmp_path):
    _gtsrb_train(tmp_path)
    x, y = load_gtsrb(tmp_path, split="train", size=8)
    assert x.shape == (5, 3, 8, 8) and y.tolist() == [0, 0, 1, 1, 1]
    red = torch.tensor([1.0, 0, 0])[:, None, None].expand(3, 8, 8)
    green = torch.tensor([0, 1.0, 0])[:, None, None].expand(3, 8, 8)
    for i in range(2):
        assert torch.equal(x[i], red)   # every pixel from inside the ROI: no blue border
    for i in range(2, 5):
        assert torch.equal(x[i], green)
    # other accepted layouts: root/Final_Training/Images and root/Images
    assert load_gtsrb(tmp_path / "GTSRB", split="train", size=4)[0].shape == (5, 3, 4, 4)
    assert load_gtsrb(tmp_path / "GTSRB" / "Final_Training", split="train")[0].shape == (5, 3, 32, 32)


def test_gtsrb_roi_inclusive(tmp_path):
    """A 1-pixel-wide ROI (X1 == X2) must keep exactly that column."""
    d = tmp_path / "Images" / "00007"
    a = np.zeros((4, 6, 3), np.uint8)
    a[:, 2] = 200
    d.mkdir(parents=True)
    Image.fromarray(a).save(d / "a.ppm")
    _write_csv(d / "GT-00007.csv", [["a.ppm", 6, 4, 2, 0, 2, 3, 7]])
    x, y = load_gtsrb(tmp_path, split="train", size=3)
    assert y.tolist() == [7]
    assert torch.allclose(x, torch.tensor(200 / 255))


def _gtsrb_test(root: Path, csv_at: Path | None, labelled: bool = True) -> None:
    images = root / "GTSRB" / "Final_Test" / "Images"
    specs = [(30, 30, (5, 5, 24, 24), 14, RED), (41, 35, (6, 4, 33, 30), 2, GREEN)]
    rows = []
    for j, (w, h, roi, cls, color) in enumerate(specs):
        _sign(images / f"{j:05d}.ppm", w, h, roi, color)
        rows.append([f"{j:05d}.ppm", w, h, *roi, cls])
    if csv_at is not None:
        if labelled:
            _write_csv(csv_at / "GT-final_test.csv", rows)
        else:
            _write_csv(csv_at / "GT-final_test.test.csv", [r[:-1] for r in rows], _HEADER[:-1])


@pytest.mark.parametrize("where", [".", "GTSRB", "GTSRB/Final_Test/Images"])
def test_gtsrb_test_csv_lookup(tmp_path, where):
    _gtsrb_test(tmp_path, tmp_path / where)
    x, y = load_gtsrb(tmp_path, split="test", size=6)
    assert y.tolist() == [14, 2] and x.shape == (2, 3, 6, 6)
    assert torch.all(x[0, 0] == 1) and torch.all(x[0, 1:] == 0)
    assert torch.all(x[1, 1] == 1) and torch.all(x[1, [0, 2]] == 0)


def test_gtsrb_test_errors(tmp_path):
    _gtsrb_test(tmp_path, tmp_path / "GTSRB" / "Final_Test" / "Images", labelled=False)
    with pytest.raises(DataError, match=r"no ClassId column: the labelled GT-final_test\.csv is needed"):
        load_gtsrb(tmp_path, split="test")
    (tmp_path / "GTSRB" / "Final_Test" / "Images" / "GT-final_test.test.csv").unlink()
    with pytest.raises(DataError, match=r"GT-final_test\.csv not found"):
        load_gtsrb(tmp_path, split="test")
    with pytest.raises(DataError, match="no GTSRB training images found"):
        load_gtsrb(tmp_path, split="train")


def test_gtsrb_train_errors(tmp_path):
    d = tmp_path / "Images" / "00003"
    _sign(d / "a.ppm", 10, 10, (1, 1, 8, 8), RED)
    with pytest.raises(DataError, match=r"annotation file missing: .*GT-00003\.csv"):
        load_gtsrb(tmp_path, split="train")
    _write_csv(d / "GT-00003.csv", [["a.ppm", 10, 10, 1, 1, 8, 8, 3], ["gone.ppm", 10, 10, 1, 1, 8, 8, 3]])
    with pytest.raises(DataError, match=r"missing: .*gone\.ppm"):
        load_gtsrb(tmp_path, split="train")
    _write_csv(d / "GT-00003.csv", [["a.ppm", 10, 10, 1, 1, 8, 8]], _HEADER[:-1])
    with pytest.raises(DataError, match="lacks column.*ClassId"):
        load_gtsrb(tmp_path, split="train")
    _write_csv(d / "GT-00003.csv", [["a.ppm", 10, 10, 9, 1, 3, 8, 3]])
    with pytest.raises(DataError, match=r"ROI .* is empty"):
        load_gtsrb(tmp_path, split="train")


# -------------------------------------------------------------- dispatch + checks


def test_load_dataset_dispatch(tmp_path, monkeypatch):
    p = _npz(tmp_path, x=np.zeros((2, 4, 4, 3), np.uint8), y=np.array([0, 1]))
    x, y = load_dataset(str(p))
    assert x.shape == (2, 3, 4, 4) and y.tolist() == [0, 1]
    folder = tmp_path / "imgs"
    _png(folder / "b" / "0.png", (0, 0, 0), size=(4, 4))
    _png(folder / "a" / "0.png", (0, 0, 0), size=(6, 6))
    x, y = load_dataset(folder, size=5)
    assert x.shape == (2, 3, 5, 5) and y.tolist() == [0, 1]
    _write_cifar_bin(tmp_path / "c" / "cifar-10-batches-bin", n=2)
    assert load_dataset("CIFAR10", data_dir=tmp_path / "c")[0].shape == (2, 3, 32, 32)
    assert load_dataset("cifar10", data_dir=tmp_path / "c", split="train")[0].shape == (10, 3, 32, 32)
    _gtsrb_train(tmp_path / "g")
    assert load_dataset("gtsrb", data_dir=tmp_path / "g", split="train")[0].shape == (5, 3, 32, 32)
    assert load_dataset("gtsrb", data_dir=tmp_path / "g", split="train", size=7)[0].shape == (5, 3, 7, 7)
    assert set(DATASETS) == {"cifar10", "gtsrb", "digits"}
    # the registry is what dispatch consults
    from ibau.data import Dataset, Split

    def toy(root, split, size):
        return Split(torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]))

    monkeypatch.setitem(DATASETS, "toy", Dataset("toy", toy))
    assert load_dataset("toy", data_dir=tmp_path)[1].tolist() == [0, 1]


def test_load_dataset_errors(tmp_path):
    with pytest.raises(DataError, match=r"dataset 'cifar10' needs data_dir, the folder holding its files"):
        load_dataset("cifar10")
    with pytest.raises(DataError, match=r"unknown data 'foo': give a \.npz file, an image folder, "
                                        r"or one of: cifar10, digits, gtsrb"):
        load_dataset("foo")
    with pytest.raises(DataError, match="no such file or folder"):
        load_dataset(str(tmp_path / "missing.npz"))
    txt = tmp_path / "data.csv"
    txt.write_text("1,2")
    with pytest.raises(DataError, match=r"is not a \.npz"):
        load_dataset(txt)
    with pytest.raises(DataError, match="cifar10 images are 32x32"):
        load_dataset("cifar10", data_dir=tmp_path, size=64)
    with pytest.raises(DataError, match="unknown split"):
        load_dataset("cifar10", data_dir=tmp_path, split="valid")


def test_check_dataset():
    x = torch.rand(6, 3, 4, 4)
    y = torch.tensor([0, 1, 2, 0, 1, 42])
    check_dataset(x, y)
    check_dataset(x, y, num_classes=43, min_size=6)
    with pytest.raises(DataError, match=r"labels go up to 42 but the model has 10 classes: "
                                        r"set num_classes to 43 or check the data"):
        check_dataset(x, y, num_classes=10)
    with pytest.raises(DataError, match=r"only class 3: at least 2 classes"):
        check_dataset(x, torch.full((6,), 3))
    bad = x.clone()
    bad[2, 1, 0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN or inf"):
        check_dataset(bad, y)
    with pytest.raises(DataError, match=r"\[0,1\]"):
        check_dataset(x * 255, y)
    with pytest.raises(DataError, match="6 images but at least 10"):
        check_dataset(x, y, min_size=10)
    with pytest.raises(DataError, match="6 images but y has 5 labels"):
        check_dataset(x, y[:5])
    with pytest.raises(DataError, match="4 dimensions"):
        check_dataset(x[0], y)
    with pytest.raises(DataError, match="float tensor"):
        check_dataset((x * 255).to(torch.uint8), y)
    with pytest.raises(DataError, match="integer class ids"):
        check_dataset(x, y.float())
    with pytest.raises(DataError, match="non-negative"):
        check_dataset(x, y - 1)
    with pytest.raises(DataError, match="torch tensors"):
        check_dataset(x.numpy(), y)


def test_module_surface():
    assert readers.__doc__ and "unpickl" in readers.__doc__
    for name in readers.__all__:
        assert getattr(readers, name) is not None

"""One dataset registry (ibau.data.DATASETS) for the CLI, the grid and the benchmarks, and
hostile data files refused with a DataError (an InputError), never a traceback."""

from __future__ import annotations

import lzma
import zipfile

import numpy as np
import pytest
import torch

from ibau.bench import data as bdata
from ibau.data import DATASETS, DataError, Dataset, load_arrays, load_dataset, load_npz, split_digits
from ibau.errors import InputError
from ibau.registry import Registry, UnknownName


def test_one_registry_with_attributes():
    assert isinstance(DATASETS, Registry) and bdata.DATASETS is DATASETS
    assert {"cifar10", "gtsrb", "digits"} <= set(DATASETS)
    assert all(isinstance(d, Dataset) and d.title for d in DATASETS.values())
    assert bdata.NUM_CLASSES["gtsrb"] == DATASETS["gtsrb"].num_classes == 43
    assert not DATASETS["digits"].needs_data_dir and DATASETS["cifar10"].needs_data_dir
    with pytest.raises(UnknownName, match="unknown dataset 'mnist'; known: cifar10, digits, gtsrb"):
        bdata.load("mnist", None, "test")


def test_digits_split_is_the_demo_split():
    pytest.importorskip("sklearn")
    x, y, train, clean, test, _ = split_digits(0)
    assert len(x) == 1797 and x.shape[1:] == (1, 8, 8) and float(x.max()) <= 1.0
    tr, te = DATASETS["digits"].load(split="train"), DATASETS["digits"].load(split="test")
    assert torch.equal(tr.x, x[train]) and torch.equal(te.y, y[torch.cat([clean, test])])
    xl, yl = load_dataset("digits", split="train")
    assert torch.equal(xl, tr.x) and torch.equal(yl, tr.y)
    with pytest.raises(DataError, match="digits images are 8x8"):
        load_dataset("digits", size=32)


def test_named_datasets_read_the_arrays_layout(tmp_path):
    folder = tmp_path / "gtsrb32"
    folder.mkdir()
    np.save(folder / "x_test.npy", np.full((6, 4, 4, 3), 255, np.uint8))
    np.save(folder / "y_test.npy", np.arange(6))
    with lzma.open(folder / "x_train.npy.xz", "wb") as fh:
        np.save(fh, np.zeros((4, 4, 4, 3), np.uint8))
    np.save(folder / "y_train.npy", np.array([0, 1, 2, 3]))
    x, y = load_dataset("gtsrb", data_dir=tmp_path)
    assert x.shape == (6, 3, 4, 4) and float(x.min()) == 1.0 and y.tolist() == list(range(6))
    assert load_dataset("gtsrb", data_dir=tmp_path, split="train")[0].shape == (4, 3, 4, 4)
    with pytest.raises(DataError, match="size"):
        load_dataset("gtsrb", data_dir=tmp_path, size=32)


@pytest.mark.parametrize("kind", ["pickled", "truncated_xz", "float_nan", "object_y"])
def test_hostile_arrays_are_refused(tmp_path, kind):
    if kind == "pickled":
        np.save(tmp_path / "x_test.npy", np.array([{"a": 1}] * 3, dtype=object), allow_pickle=True)
    elif kind == "truncated_xz":
        (tmp_path / "x_test.npy.xz").write_bytes(lzma.compress(b"\x93NUMPY garbage")[:10])
    elif kind == "float_nan":
        np.save(tmp_path / "x_test.npy", np.full((3, 1, 2, 2), np.nan, np.float32))
    else:
        np.save(tmp_path / "x_test.npy", np.zeros((3, 2, 2), np.uint8))
        np.save(tmp_path / "y_test.npy", np.array(["a", "b", "c"], dtype=object), allow_pickle=True)
    with pytest.raises(DataError):
        load_arrays(tmp_path, "test")


def _npz_with_member(path, name, payload: bytes):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(name, payload)
    return path


@pytest.mark.parametrize("case", ["not_array", "pickled_member", "corrupt_zip", "string_x", "complex_x", "inf_x"])
def test_hostile_npz_files_are_refused(tmp_path, case):
    p = tmp_path / "d.npz"
    if case == "not_array":
        _npz_with_member(p, "x.npy", b"this is not an npy member")
        with zipfile.ZipFile(p, "a") as z:
            z.writestr("y.npy", b"nor this")
    elif case == "pickled_member":
        np.savez(p, x=np.array([object()] * 2, dtype=object), y=np.array([0, 1]))
    elif case == "corrupt_zip":
        p.write_bytes(b"PK\x03\x04" + b"\x00" * 40)
    elif case == "string_x":
        np.savez(p, x=np.array(["a", "b"]), y=np.array([0, 1]))
    elif case == "complex_x":
        np.savez(p, x=np.zeros((2, 1, 2, 2), np.complex64), y=np.array([0, 1]))
    else:
        x = np.zeros((2, 1, 2, 2), np.float32)
        x[0, 0, 0, 0] = np.inf
        np.savez(p, x=x, y=np.array([0, 1]))
    with pytest.raises(DataError) as info:
        load_npz(p)
    assert isinstance(info.value, InputError) and str(p) in str(info.value)


def test_truncated_image_is_refused(tmp_path):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / cls / "0.png")
    raw = (tmp_path / "b" / "0.png").read_bytes()
    (tmp_path / "b" / "0.png").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="cannot read image"):
        load_dataset(tmp_path)


def test_library_messages_name_parameters_not_flags(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset("cifar10")
    assert "data_dir" in str(info.value) and "--" not in str(info.value)
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", data_dir=tmp_path, size=64)
    assert "size" in str(info.value) and "--" not in str(info.value)

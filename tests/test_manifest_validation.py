"""Attack manifests are untrusted input: every malformed or hostile one is refused with
a ManifestError (an InputError), never a traceback, and nothing outside the manifest's
folder is read."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from ibau.attacks import BadNets, Blend, L2Inv, MultiTrigger
from ibau.attacks.manifest import MAX_MANIFEST_BYTES, ManifestError, load_manifest, save_manifest
from ibau.errors import InputError


def _saved(tmp_path, attack=None):
    attack = attack or Blend(target=1, image_shape=(3, 8, 8))
    path = save_manifest(attack, tmp_path / "m.attack.json")
    return path, json.loads(path.read_text())


def _rewrite(path, manifest):
    path.write_text(json.dumps(manifest))
    return path


def _retrigger(path, manifest, state):
    """Replace the trigger file (and its hash in the manifest) with ``state``."""
    import hashlib

    tpath = path.with_name(manifest["trigger_file"])
    save_file(state, str(tpath))
    manifest["trigger_sha256"] = hashlib.sha256(tpath.read_bytes()).hexdigest()
    return _rewrite(path, manifest)


def test_round_trip_still_works(tmp_path):
    path, _ = _saved(tmp_path)
    attack, manifest = load_manifest(path, num_classes=10, image_shape=(3, 8, 8))
    assert manifest["attack"] == "blend" and attack.target == 1
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(attack.apply(x), Blend(target=1, image_shape=(3, 8, 8)).apply(x))


def test_manifest_error_is_an_input_error():
    assert issubclass(ManifestError, InputError) and issubclass(ManifestError, ValueError)


@pytest.mark.parametrize("text, match", [
    ("[1, 2, 3]", "a JSON object is needed, got list"),
    ('"blend"', "a JSON object is needed, got str"),
    ("{not json", "not JSON"),
    ("[" * 100_000 + "]" * 100_000, "not JSON|nested deeper|JSON object"),
    ('{"attack": "blend", "x": ' + "[" * 40 + "]" * 40 + "}", "nested deeper"),
    (json.dumps({"config": {}}), "needs an 'attack' name"),
    (json.dumps({"attack": "rootkit"}), "unknown attack 'rootkit'"),
    (json.dumps({"attack": "blend", "config": "alpha=1"}), "'config' must be a JSON object"),
    (json.dumps({"attack": "blend", "config": {"alpha": {"x": 1}}}), "setting 'alpha'"),
    (json.dumps({"attack": "blend", "config": {"alpha": 7}}), "alpha must be <= 1"),
    (json.dumps({"attack": "blend", "config": {"bogus": 1}}), "no setting bogus"),
    (json.dumps({"attack": "blend", "config": {"target": -3}}), "target must be >= 0"),
    (json.dumps({"attack": "blend", "config": {"target": 1}, "target": 2}), "disagrees"),
    (json.dumps({"attack": "badnets", "config": {"patch": 40, "image_shape": [3, 32, 32]}}), "patch 40 is larger"),
    (json.dumps({"attack": "hidden_trigger", "config": {"patch_size": 9, "image_shape": [3, 8, 8]}}),
     "patch_size 9 is larger"),
    (json.dumps({"attack": "multi", "parts": []}), "'parts' must be a list"),
    (json.dumps({"attack": "multi", "parts": [{"attack": "nope"}]}), "part 0: unknown attack"),
])
def test_malformed_manifests_are_refused(tmp_path, text, match):
    path = tmp_path / "m.attack.json"
    path.write_text(text)
    with pytest.raises(ManifestError, match=match):
        load_manifest(path)


def test_oversized_manifest_is_refused(tmp_path):
    path = tmp_path / "big.attack.json"
    path.write_text(json.dumps({"attack": "blend", "pad": "x" * (MAX_MANIFEST_BYTES + 1)}))
    with pytest.raises(ManifestError, match="more than"):
        load_manifest(path)


def test_missing_and_binary_manifests(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path / "none.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ManifestError, match="not JSON"):
        load_manifest(tmp_path / "bin.json")


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.safetensors", "sub/../../outside.safetensors", "", 5])
def test_trigger_paths_must_stay_in_the_folder(tmp_path, name):
    folder = tmp_path / "in"
    folder.mkdir()
    path, manifest = _saved(folder)
    (tmp_path / "outside.safetensors").write_bytes(path.with_name(manifest["trigger_file"]).read_bytes())
    manifest["trigger_file"] = name
    _rewrite(path, manifest)
    with pytest.raises(ManifestError, match="trigger_file"):
        load_manifest(path)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_trigger_symlink_out_of_the_folder_is_refused(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    path, manifest = _saved(folder)
    real = path.with_name(manifest["trigger_file"])
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(real.read_bytes())
    real.unlink()
    real.symlink_to(outside)
    with pytest.raises(ManifestError, match="outside the manifest's folder"):
        load_manifest(path)


def test_trigger_file_that_is_not_safetensors(tmp_path):
    import hashlib

    path, manifest = _saved(tmp_path)
    tpath = path.with_name(manifest["trigger_file"])
    tpath.write_bytes(b"\x89PNG\r\n\x1a\n not tensors")
    manifest["trigger_sha256"] = hashlib.sha256(tpath.read_bytes()).hexdigest()
    _rewrite(path, manifest)
    with pytest.raises(ManifestError, match="not a valid safetensors"):
        load_manifest(path)


def test_changed_trigger_fails_the_hash(tmp_path):
    path, manifest = _saved(tmp_path)
    tpath = path.with_name(manifest["trigger_file"])
    save_file({"pattern": torch.zeros(3, 8, 8), "mask": torch.zeros(3, 8, 8)}, str(tpath))
    with pytest.raises(ManifestError, match="does not match the hash"):
        load_manifest(path)


def test_non_finite_trigger_is_refused(tmp_path):
    path, manifest = _saved(tmp_path)
    bad = torch.zeros(3, 8, 8)
    bad[0, 0, 0] = float("nan")
    _retrigger(path, manifest, {"pattern": bad, "mask": torch.zeros(3, 8, 8)})
    with pytest.raises(ManifestError, match="NaN or inf"):
        load_manifest(path)


def test_integer_trigger_is_refused(tmp_path):
    path, manifest = _saved(tmp_path)
    _retrigger(path, manifest, {"pattern": torch.zeros(3, 8, 8, dtype=torch.int64)})
    with pytest.raises(ManifestError, match="floating point"):
        load_manifest(path)


def test_trigger_of_the_wrong_shape_is_refused(tmp_path):
    path, manifest = _saved(tmp_path)
    _retrigger(path, manifest, {"pattern": torch.zeros(3, 16, 16), "mask": torch.zeros(3, 16, 16)})
    with pytest.raises(ManifestError, match="does not match its manifest"):
        load_manifest(path)
    _retrigger(path, manifest, {"pattern": torch.zeros(8, 8)})
    with pytest.raises(ManifestError, match="does not fit"):
        load_manifest(path)
    _retrigger(path, manifest, {"unrelated": torch.zeros(3, 8, 8)})
    with pytest.raises(ManifestError, match="does not fit"):
        load_manifest(path)


def test_generated_attack_without_its_trigger_is_refused(tmp_path):
    path = tmp_path / "l2.attack.json"
    _rewrite(path, {"attack": "l2_inv", "config": {"target": 0}, "target": 0, "trigger_file": None})
    with pytest.raises(ManifestError, match="needs its generated trigger"):
        load_manifest(path)
    assert L2Inv.needs_model


def test_targets_out_of_range_and_wrong_images(tmp_path):
    path, _ = _saved(tmp_path, BadNets(target=8, image_shape=(3, 8, 8), patch=2))
    with pytest.raises(ManifestError, match="target 8 is not a class"):
        load_manifest(path, num_classes=5)
    assert load_manifest(path, num_classes=9)[0].target == 8
    with pytest.raises(ManifestError, match="for images"):
        load_manifest(path, image_shape=(3, 16, 16))
    multi = MultiTrigger([(BadNets(target=0, image_shape=(3, 8, 8), patch=2), 0),
                          (Blend(target=7, image_shape=(3, 8, 8)), 7)])
    mpath = save_manifest(multi, tmp_path / "multi.attack.json")
    with pytest.raises(ManifestError, match="target 7 is not a class"):
        load_manifest(mpath, num_classes=5)
    assert len(load_manifest(mpath, num_classes=10)[0]) == 2


def test_save_refuses_to_overwrite_before_writing_anything(tmp_path):
    path, _ = _saved(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(FileExistsError, match="force=True"):
        save_manifest(Blend(target=2, image_shape=(3, 8, 8)), path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before

"""The experiment grid: specs expand into cells, cells run and resume, the report reads them."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from ibau import InputError
from ibau.bench import SpecError, expand, finished, is_common_file, load_experiment, load_results, run_grid
from ibau.bench import data as bdata
from ibau.bench.report import tsne_separation, write_report
from ibau.bench.runner import source_digest
from ibau.bench.sources import ImageTrigger, model_cache_key


def spec(tmp_path: Path, text: str, name: str = "x.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# ----------------------------------------------------------------------------- spec
def test_expand_product_zip_and_setting_axes(tmp_path):
    path = spec(tmp_path, """
        [experiment]
        name = "e"
        [models.a]
        weights = "${data}/a.pth"
        attack = { name = "badnets", target = 1 }
        [models.b]
        weights = "${data}/b.pth"
        attack = { name = "badnets", target = 2 }
        [profiles.p]
        models = ["a", "b"]
        defenses = ["ibau", "nad"]
        seeds = [0, 1]
        settings.ibau = { rounds = 2 }
        axes = { "settings.ibau.norm_bound" = [1.0, 5.0] }
        [profiles.z]
        models = ["a"]
        defenses = ["ibau"]
        zip_axes = true
        axes = { "protocol.clean_size" = [100, 50], "settings.ibau.rounds" = [1, 3] }
    """)
    exp = load_experiment(path)
    cells = expand(exp, "p")
    assert len(cells) == 2 * 2 * 2 * 2
    assert len({c.key for c in cells}) == len(cells)
    # the norm-bound axis reaches I-BAU's settings only; NAD cells get no such setting
    ib = [c for c in cells if c.params["defense"] == "ibau"]
    assert sorted({c.params["settings"]["norm_bound"] for c in ib}) == [1.0, 5.0]
    assert all(c.params["settings"]["rounds"] == 2 for c in ib)
    assert all("norm_bound" not in c.params["settings"] for c in cells if c.params["defense"] == "nad")
    # defense-major order: every model of the first defense before the second defense
    assert [c.params["defense"] for c in cells[:8]] == ["ibau"] * 8
    z = expand(exp, "z")
    assert [(c.params["protocol"]["clean_size"], c.params["settings"]["rounds"]) for c in z] == [(100, 1), (50, 3)]
    # keys are a pure function of the settings: same file, same keys; a changed setting, a new key
    assert [c.key for c in expand(load_experiment(path), "p")] == [c.key for c in cells]
    path.write_text(path.read_text().replace("rounds = 2", "rounds = 3"))
    changed = {c.key for c in expand(load_experiment(path), "p")}
    assert changed & {c.key for c in cells} == {c.key for c in cells if c.params["defense"] == "nad"}


@pytest.mark.parametrize("body, message", [
    ("[profiles.p]\nmodels = ['nope']\n", "model 'nope' is not defined"),
    ("[profiles.p]\nmodel = ['a']\n", "unknown keys ['model']"),
    ("[profiles.p]\nzip_axes = true\naxes = { a = [1, 2], b = [1] }\n", "zip_axes needs axes of equal length"),
])
def test_spec_errors(tmp_path, body, message):
    path = spec(tmp_path, "[experiment]\nname = 'e'\n[models.a]\nweights = 'w'\n" + body)
    with pytest.raises(SpecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        expand(load_experiment(path), "p")


def test_unknown_profile(tiny_grid):
    with pytest.raises(SpecError, match="no profile 'q'; it has cpu"):
        expand(load_experiment(tiny_grid()), "q")


def test_common_file_models_and_settings(tmp_path):
    spec(tmp_path, """
        [models.shared]
        weights = "w.pth"
        attack = { name = "badnets", target = 3 }
        [settings.cpu.ibau]
        rounds = 7
        batch_size = 50
    """, "common.toml")
    path = spec(tmp_path, """
        [experiment]
        name = "e"
        common = "common.toml"
        [profiles.cpu]
        models = ["shared"]
        settings.ibau = { rounds = 2 }
    """)
    assert is_common_file(tmp_path / "common.toml") and not is_common_file(path)
    (cell,) = expand(load_experiment(path), "cpu")
    assert cell.params["model"]["attack"]["target"] == 3
    assert cell.params["settings"] == {"rounds": 2, "batch_size": 50}  # the file's own setting wins


# ----------------------------------------------------------------------------- data
def test_protocol_split_arrays_layout_with_eval_mask(tmp_path):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    rng = np.random.default_rng(0)
    np.save(folder / "x_test.npy", rng.integers(0, 255, (60, 4, 4, 3), dtype=np.uint8))
    np.save(folder / "y_test.npy", np.arange(60) % 10)
    mask = np.zeros(60, bool)
    mask[:20] = True
    np.save(folder / "test_eval.npy", mask)
    bdata.load.cache_clear()
    (xc, yc), (xe, ye) = bdata.protocol_split("cifar10", str(tmp_path), {"clean_size": 30, "split_seed": 0})
    assert xc.shape == (30, 3, 4, 4) and xe.shape == (20, 3, 4, 4)
    assert torch.equal(ye, torch.arange(20) % 10)  # the marked images measure, in order
    (xs, _), _ = bdata.protocol_split("cifar10", str(tmp_path), {"clean_size": 10, "split_seed": 0})
    assert torch.equal(xs, xc[:10])  # smaller clean sets are nested in larger ones (Table 5)
    with pytest.raises(ValueError, match="leaves no evaluation"):
        bdata.protocol_split("cifar10", str(tmp_path), {"clean_size": 41, "split_seed": 0})


def test_unseen_train_split_never_holds_an_image_the_model_trained_on():
    from ibau.poisoning import subset

    tr = bdata.load("digits", None, "train")
    seen, _ = subset(tr["x"], tr["y"], 300, 0)
    x, y = bdata.unseen_train_split("digits", None, {"clean_size": 100, "split_seed": 1}, 300, 0)
    assert len(x) == 100
    flat_seen, flat = seen.flatten(1), x.flatten(1)
    assert not (flat[:, None, :] == flat_seen[None, :, :]).all(-1).any()  # no clean image is a training image
    assert (flat[:, None, :] == tr["x"].flatten(1)[None, :, :]).all(-1).any(1).all()  # all come from the train split
    again, _ = bdata.unseen_train_split("digits", None, {"clean_size": 100, "split_seed": 1}, 300, 0)
    other, _ = bdata.unseen_train_split("digits", None, {"clean_size": 100, "split_seed": 2}, 300, 0)
    assert torch.equal(x, again) and not torch.equal(x, other)
    with pytest.raises(InputError, match="never saw"):
        bdata.unseen_train_split("digits", None, {"clean_size": 100}, None, 0)


def test_protocol_split_without_mask_is_disjoint():
    (xc, _), (xe, _) = bdata.protocol_split("digits", None, {"clean_size": 100, "split_seed": 1, "eval_size": 50})
    assert len(xc) == 100 and len(xe) == 50
    flat_c = {tuple(v.tolist()) for v in xc.flatten(1)}
    assert not any(tuple(v.tolist()) in flat_c for v in xe.flatten(1))


def test_image_trigger_and_cache_key(tmp_path):
    from PIL import Image

    img = np.zeros((8, 8, 3), np.uint8)
    img[6:, 6:] = 255
    Image.fromarray(img).save(tmp_path / "t.png")
    atk = ImageTrigger(image=str(tmp_path / "t.png"), target=4)
    x = torch.zeros(2, 3, 8, 8)
    out = atk.apply(x)
    assert out[:, :, 6:, 6:].min() == 1 and out[:, :, :6].max() == 0
    assert atk.target_of(torch.tensor([0, 1])).tolist() == [4, 4]
    entry = {"train": {"attack": {"image": str(tmp_path / "t.png"), "target": 4}, "epochs": 1}}
    k1 = model_cache_key(entry, "digits")
    img[0, 0] = 7  # same path, other content: another model
    Image.fromarray(img).save(tmp_path / "t.png")
    assert model_cache_key(entry, "digits") != k1


# ----------------------------------------------------------------------------- runner
def test_source_digest_follows_the_package_files(tmp_path, monkeypatch):
    import shutil

    import ibau.bench.runner as runner

    original = source_digest()
    here = Path(runner.__file__).resolve().parents[1]
    copy = tmp_path / "ibau"
    shutil.copytree(here, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(runner, "__file__", str(copy / "bench" / "runner.py"))  # digest the copy
    assert source_digest() == original  # the same files elsewhere: the same digest
    (copy / "utils.py").write_text((copy / "utils.py").read_text() + "\n# changed\n")
    assert source_digest() != original


def test_grid_runs_caches_models_and_resumes(tmp_path, tiny_grid, one_thread):
    exp = load_experiment(tiny_grid())
    cells = expand(exp, "cpu")
    res, cache = tmp_path / "res", tmp_path / "cache"
    s = run_grid(cells, results=res, cache=cache, workers=0, threads=1, progress=False, printer=None)
    assert (s.done, s.skipped, s.failed) == (2, 0, 0)
    recs = {r["params"]["defense"]: r for r in load_results(res, "tiny")}
    none, ib = recs["none"]["result"], recs["ibau"]["result"]
    assert none["before"]["asr"] > 0.5  # the planted backdoor works
    assert none["source"]["cached"] is False and ib["source"]["cached"] is True  # trained once, reused
    assert ib["before"] == none["before"]
    assert len(ib["history"]) == 2 and ib["history"][1]["round"] == 1
    for r in recs.values():
        assert r["status"] == "ok" and r["params"]["seed"] == 0 and r["wall_seconds"] > 0
        assert r["peak_rss_mb"] > 0 and r["environment"]["torch"] == torch.__version__
        # the code version even where git has none (a copy of src): a digest of the package's files
        assert r["source_sha256"] == source_digest() and len(r["source_sha256"]) == 16
    stamps = {p: p.stat().st_mtime_ns for p in (res / "tiny").glob("*.json")}
    s2 = run_grid(cells, results=res, cache=cache, workers=0, threads=1, progress=False, printer=None)
    assert (s2.done, s2.skipped) == (0, 2)
    assert {p: p.stat().st_mtime_ns for p in (res / "tiny").glob("*.json")} == stamps
    # a changed setting makes the old I-BAU file stale; prune removes exactly it
    from ibau.bench.runner import stale_files

    path = tmp_path / "tiny.toml"
    path.write_text(path.read_text().replace("rounds = 1", "rounds = 2"))
    stale = stale_files([load_experiment(path)], res)
    assert [p.name for p in stale] == [next(p.name for p in stamps if "-ibau-" in p.name)]


def test_grid_cells_are_bit_identical_for_a_seed(tmp_path, tiny_grid, one_thread):
    """Same cell, same seed, two runs (the model from the cache both times): the same numbers,
    for the paper's recipe (the grid's ``ibau``) and the default one."""
    path = tiny_grid()
    path.write_text(path.read_text().replace("norm_bound = 2.5 }", "norm_bound = 2.5 }\nzip_axes = true\n"
                                             'axes = { "settings.ibau.recipe" = ["paper", "default"] }'))
    cells = [c for c in expand(load_experiment(path), "cpu") if c.params["defense"] == "ibau"]
    assert sorted(c.params["settings"]["recipe"] for c in cells) == ["default", "paper"]
    cache = tmp_path / "cache"

    def numbers(folder: str) -> dict:
        run_grid(cells, results=tmp_path / folder, cache=cache, workers=0, threads=1, progress=False, printer=None)
        out = {}
        for r in load_results(tmp_path / folder, "tiny"):
            res = r["result"]
            out[r["params"]["settings"]["recipe"]] = (res["after"], [
                {k: v for k, v in h.items() if not k.startswith("seconds") and k != "elapsed"} for h in res["history"]])
        return out

    first, second = numbers("a"), numbers("b")
    assert first == second and set(first) == {"default", "paper"}
    assert first["default"] != first["paper"]


def test_failed_cell_is_recorded_and_retried(tmp_path, one_thread, capsys):
    path = spec(tmp_path, """
        [experiment]
        name = "bad"
        [models.m]
        weights = "${data}/missing.pth"
        attack = { name = "badnets", target = 0 }
        requires = "make it first"
        [profiles.cpu]
        dataset = "digits"
        clean_size = 100
        defenses = ["none"]
    """)
    cells = expand(load_experiment(path), "cpu")
    s = run_grid(cells, results=tmp_path / "r", cache=tmp_path / "c", data_dir=tmp_path, workers=0, threads=1,
                 progress=False, printer=None)
    assert s.failed == 1 and not finished(tmp_path / "r", cells[0])
    err = json.loads(next((tmp_path / "r" / "bad").glob("*.error.json")).read_text())
    assert "weights not found" in err["error"] and "make it first" in err["error"]
    said = capsys.readouterr()
    assert not said.out and "failed: " in said.err and "weights not found" in said.err  # quiet, not silent
    assert run_grid(cells, results=tmp_path / "r", cache=tmp_path / "c", data_dir=tmp_path, workers=0, threads=1,
                    progress=False, printer=None).failed == 1  # tried again, not skipped


@pytest.mark.slow
def test_killed_grid_resumes_without_redoing_finished_cells(kill_and_resume):
    """Kill the runner (and its worker processes) mid-grid, start it again: the grid
    completes and the cells finished before the kill are not recomputed."""
    kill_and_resume(["--workers", "1"])


# ----------------------------------------------------------------------------- report
def test_report_from_results(tmp_path, tiny_grid, one_thread):
    config = tiny_grid()
    exp = load_experiment(config)
    res = tmp_path / "res"
    run_grid(expand(exp, "cpu"), results=res, cache=tmp_path / "cache", workers=0, threads=1, progress=False,
             printer=None)
    out = write_report([exp], res, tmp_path / "REPORT.md", profile="cpu")
    text = out.read_text()
    rec = next(r for r in load_results(res, "tiny") if r["params"]["defense"] == "ibau")
    a = rec["result"]["after"]
    assert f"{100 * a['acc']:.1f} / {100 * a['asr']:.1f}" in text
    assert "[paper 98 / 5]" in text and f"Δ {100 * a['acc'] - 98:+.1f}" in text
    assert "2/2 cells finished" in text
    assert "| I-BAU is effective" in text and ("**reproduced**" in text or "**not reproduced**" in text)
    # a stale result (other settings) is not shown: change the setting, the cell is "not run"
    config.write_text(config.read_text().replace("rounds = 1", "rounds = 2"))
    text2 = write_report([load_experiment(config)], res, tmp_path / "R2.md", profile="cpu").read_text()
    assert "1/2 cells finished" in text2 and "not run [paper 98 / 5]" in text2


def test_tsne_separation_counts_nearest_true_centroid():
    emb = {"clean": [[0, 0], [0, 1], [10, 10], [10, 11]], "triggered": [[0, 0.5], [9, 10], [1, 1]]}
    assert tsne_separation(emb, [0, 0, 1, 1], [0, 1, 1]) == pytest.approx(2 / 3)


def test_knn_agreement_true_class_vs_target_cluster():
    from ibau.bench.tasks import knn_agreement

    g = torch.Generator().manual_seed(0)
    centers = torch.eye(3) * 10
    y = torch.arange(3).repeat_interleave(20)
    clean = centers[y] + 0.1 * torch.randn(60, 3, generator=g)
    yt = torch.tensor([1, 2, 1, 2])
    back = {"clean": clean, "y": y, "triggered": centers[yt] + 0.1, "y_triggered": yt}
    stuck = {**back, "triggered": centers[torch.zeros(4, dtype=torch.long)] + 0.1}  # all in the target's cluster
    assert knn_agreement(back) == {"triggered_true_class": 1.0, "clean_leave_one_out": 1.0, "k": 10}
    assert knn_agreement(stuck)["triggered_true_class"] == 0.0


def test_ablation_table_counts_models_meeting_the_targets():
    """The issue-13 ablation layout: ACC drop and ASR per round from each cell's history,
    means over the models, and how many models meet the target of their clean-set size."""
    from ibau.bench.report import _ablation_lines

    def rec(model, variant, size, rounds, seconds=10.0):
        hist = [{"point": "before", "acc": 0.8, "asr": 1.0}] + [{"point": f"round {i + 1}", "acc": a, "asr": s}
                                                                 for i, (a, s) in enumerate(rounds)]
        return {"params": {"defense": "ibau", "variant": variant, "protocol": {"clean_size": size},
                           "model": {"name": model}},
                "result": {"before": {"acc": 0.8, "asr": 1.0}, "history": hist, "seconds": seconds}}

    recs = [rec("a", "V0", 2500, [(0.79, 0.5), (0.79, 0.05)]),   # drop 1 point, ASR 5%: meets
            rec("b", "V0", 2500, [(0.70, 0.0), (0.70, 0.0)]),    # drop 10 points: misses
            rec("a", "V1", 2500, [(0.80, 0.09), (0.80, 0.12)]),  # ASR 12% after round 2: misses
            {"params": {"defense": "none"}, "result": {}}]
    meta = {"variants": {"V0": "paper", "V1": "clip"}, "targets": {"2500": [0.10, 0.015]}}
    text = "\n".join(_ablation_lines(meta, recs, per_model=True))
    assert "| V0 | 2,500 | 2 | 5.5 ± 6.4 | 25.0 ± 35.4 | 0/2 | 5.5 ± 6.4 | 2.5 ± 3.5 | 1/2 |" in text
    assert "| V1 | 2,500 | 1 | 0.0 | 9.0 | 1/1 | 0.0 | 12.0 | 0/1 |" in text
    assert "1.0 / 50.0 → 1.0 / 5.0 ✓" in text and "10.0 / 0.0 → 10.0 / 0.0 |" in text


def test_a_cell_with_many_axes_gets_a_result_file_name_the_file_system_accepts(tmp_path):
    """A label of every axis can pass 255 bytes (the grid once failed to write such a cell): the
    name is cut, the key keeps the cells apart, and the record is written and found finished."""
    from ibau.bench.runner import write_record
    from ibau.bench.spec import MAX_LABEL, Cell

    settings = {f"an_axis_with_a_long_name_{i}": "a_long_value_too" for i in range(12)}
    cells = [Cell("exp", {"model": {"name": "m"}, "defense": "ibau", "settings": {**settings, "seed": s}},
                  label="-".join(f"{k}={v}" for k, v in settings.items()) + f"-s{s}") for s in (0, 1)]
    assert all(len(c.label) > 255 for c in cells)
    names = [c.filename for c in cells]
    assert names[0] != names[1] and all(len(n) + 14 <= 255 for n in names)  # 14: the atomic write's "." and ".XXXXXXXX.tmp"
    assert names[0].startswith(cells[0].label[:MAX_LABEL] + "-")
    assert all(len(c.error_filename) + 14 <= 255 for c in cells)  # a failure's record fits too
    record = {**cells[0].as_dict(), "status": "ok", "result": {}, "wall_seconds": 0.0}
    assert write_record(tmp_path, record)["status"] == "ok"
    assert finished(tmp_path, cells[0]) and not finished(tmp_path, cells[1])
    failed = {**cells[1].as_dict(), "status": "error", "error": "boom", "wall_seconds": 0.0}
    assert write_record(tmp_path, failed)["status"] == "error"
    assert (tmp_path / "exp" / cells[1].error_filename).exists() and not finished(tmp_path, cells[1])


def test_a_cell_naming_the_default_recipe_is_keyed_by_what_that_recipe_is(monkeypatch):
    """A new default recipe makes new cells: results of the old one no longer pass for finished."""
    from ibau.bench.spec import cell_key
    from ibau.defenses import ibau as ibau_module

    default = {"defense": "ibau", "settings": {"recipe": "default", "rounds": 5}, "seed": 0}
    paper = {"defense": "ibau", "settings": {"recipe": "paper", "rounds": 5}, "seed": 0}
    explicit = {"defense": "ibau", "settings": {"rounds": 5, "outer_lr": 1e-3}, "seed": 0}
    before = {name: cell_key(p) for name, p in (("default", default), ("paper", paper), ("explicit", explicit))}
    changed = {**ibau_module.DEFAULT_SETTINGS, "excess_share": 0.5}
    monkeypatch.setitem(ibau_module.IBAU.recipes, "default", changed)
    assert cell_key(default) != before["default"]
    assert cell_key(paper) == before["paper"] and cell_key(explicit) == before["explicit"]

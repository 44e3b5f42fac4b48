"""What a cell does. ``TASKS[params["task"]](params, env) -> result dict``.

``defend``: load the cell's poisoned model and attack, measure ACC/ASR on the
evaluation images, run the defense on the clean set (or, for DP-SGD, train from
scratch on a poisoned training subset), measuring ACC/ASR at every point the defense
reports (I-BAU round, epoch, ...), stop at the first point with ASR < ``stop_asr`` when
set (the paper's "time to take effect"), then the optional ``measures``:

* ``error_gap`` (appendix Tables 7-8): after the defense, the error on triggered
  images -- the share NOT classified as their true label -- on the clean set the
  defense used versus on the unseen evaluation images; the gap is their absolute
  difference (the paper's "empirical error gap using the original trigger").
* ``tsne`` (Figure 4): penultimate-layer features of evaluation images with and
  without the trigger, before and after the defense, embedded in 2-D with t-SNE, and
  the share of triggered images whose nearest clean neighbours in feature space carry
  their true class (:func:`knn_agreement`), which the figure shows qualitatively.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..jobs.runner import make_defense
from .spec import SpecError
from ..defenses.base import time_to_effect, took_effect
from ..metrics import predict
from ..poisoning import evaluate_attack, subset
from . import data as bdata
from .sources import load_model

__all__ = ["TASKS", "Env", "run_defend"]


class Env(dict):
    """Where the cell runs: ``data_dir``, ``cache`` (Path), ``device`` (str), ``progress``."""


def _none(v: Any) -> Any:
    """TOML has no null: the string "none" stands for None in settings."""
    if isinstance(v, str) and v.lower() == "none":
        return None
    if isinstance(v, dict):
        return {k: _none(x) for k, x in v.items()}
    return v


def _metrics(model, attack, x, y, batch: int) -> dict[str, Any]:
    m = evaluate_attack(model, attack, x, y, batch_size=batch)
    out = {k: m[k] for k in ("acc", "asr", "asr_all", "ra") if k in m}
    if "per_trigger" in m:
        out["asr_per_trigger"] = [p["asr"] for p in m["per_trigger"]]
        out["asr_min"] = m["asr_min"]
    return out


def _triggered_error(model, attack, x, y, batch: int) -> float:
    """Share of triggered images not classified as their true label (1 - robust accuracy),
    over all images (for several triggers: the mean over triggers)."""
    parts = getattr(attack, "attacks", None)
    fns = [attack.apply] if parts is None else [lambda t, i=i: attack.apply(t, which=i) for i in range(len(parts))]
    errs = [float((predict(model, x, batch_size=batch, transform=f) != y).float().mean()) for f in fns]
    return sum(errs) / len(errs)


def _tsne(feats: torch.Tensor, seed: int) -> list[list[float]]:
    from sklearn.manifold import TSNE

    perplexity = min(30.0, max(5.0, (len(feats) - 1) / 3))
    emb = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(feats.numpy())
    return [[round(float(a), 3), round(float(b), 3)] for a, b in emb]


def run_defend(params: dict[str, Any], env: Env) -> dict[str, Any]:
    device = torch.device(env.get("device", "cpu"))
    dataset, root = params["dataset"], env.get("data_dir")
    num_classes = bdata.NUM_CLASSES.get(dataset) or int(params["model"].get("num_classes", 10))
    (xc, yc), (xe, ye) = bdata.protocol_split(dataset, root, params["protocol"])
    if params["protocol"].get("clean_from", "test") == "train_unseen":
        if "train" not in params["model"]:
            raise SpecError(f"clean_from = 'train_unseen' needs a model the runner trains (a 'train' recipe); "
                            f"{params['model'].get('name')!r} has none")
        recipe = params["model"]["train"]
        xc, yc = bdata.unseen_train_split(dataset, root, params["protocol"], recipe.get("size"),
                                          int(recipe.get("seed", 0)))
    batch = int(params["protocol"].get("eval_batch", 500))
    t_load = time.perf_counter()
    model, attack, source = load_model(params["model"], dataset, root, Path(env["cache"]), device, num_classes, xe,
                                       progress=env.get("progress", False))
    source["seconds"] = time.perf_counter() - t_load

    def evaluate(m) -> dict[str, Any]:
        return _metrics(m, attack, xe, ye, batch)

    before = evaluate(model)
    out: dict[str, Any] = {"before": before, "source": source, "clean_size": len(xc), "eval_size": len(xe)}
    measures = set(params.get("measures", []))
    feats_before = None
    if "tsne" in measures:
        feats_before = _features_both(model, attack, xe, ye, params)
    name = params["defense"]
    if name == "none":
        out.update(after=before, history=[{"point": "before", "elapsed": 0.0, **before}], seconds=0.0,
                   stop_reason="no defense", time_to_effect=None)
        return out
    settings = _none(dict(params.get("settings", {})))
    if name == "ibau":
        # the reproduction grid's I-BAU is the paper's (Algorithm 1 as the authors ran it): its cells keep
        # their meaning when the library's default recipe changes; `recipe = "default"` asks for the default
        settings.setdefault("recipe", "paper")
    defense = make_defense(name, settings, seed=params.get("seed", 0),
                           progress=bool(env.get("progress", False)))
    if getattr(defense, "data_role", "clean") == "training":
        # DP-SGD trains a fresh model from scratch on the poisoned training data
        tr = bdata.load(dataset, root, "train")
        xt, yt = subset(tr["x"], tr["y"], params.get("dp_train_size"), params.get("seed", 0))
        ratio = float(params["model"].get("train", {}).get("ratio", params["model"].get("ratio", 0.2)))
        ps = attack.poisoned_set(xt, yt, ratio, seed=params.get("seed", 0))
        fit_x, fit_y = ps.batch(torch.arange(len(ps)))
        model = _fresh_like(params, num_classes, xe).to(device)  # same architecture, fresh weights
        out["dp_training_size"] = len(fit_x)
    else:
        fit_x, fit_y = xc, yc
    stop_asr = params.get("stop_asr")
    max_drop = params.get("stop_max_drop")  # absent from older cells: ASR alone decides

    def effective(rec: dict[str, Any]) -> bool | str:
        return (took_effect(rec, before["acc"], stop_asr, max_drop)
                and f"effective at {rec['point']} (ASR < {stop_asr:g})")

    res = defense.fit(model, fit_x, fit_y, evaluate=evaluate, stop_when=None if stop_asr is None else effective)
    model = res.model
    last = {k: v for k, v in res.history[-1].items() if k in before}
    out.update(after=last, seconds=res.seconds, stop_reason=res.stop_reason, points=len(res.history) - 1,
               time_to_effect=time_to_effect(res.history, threshold=stop_asr if stop_asr is not None else 0.2,
                                             max_drop=max_drop),
               history=[{k: v for k, v in h.items() if isinstance(v, (int, float, str, list, type(None)))}
                        for h in res.history],
               config=defense.config())
    scan = res.extras.get("scan")
    if isinstance(scan, dict):
        out["flagged"] = scan.get("flagged")
        ai = scan.get("anomaly_index")
        out["anomaly_index"] = ai.tolist() if hasattr(ai, "tolist") else ai
    if "error_gap" in measures:
        e_clean = _triggered_error(model, attack, xc, yc, batch)
        e_eval = _triggered_error(model, attack, xe, ye, batch)
        out["error_gap"] = {"clean_set_error": e_clean, "eval_error": e_eval, "gap": abs(e_eval - e_clean)}
    if feats_before is not None:
        out["tsne"] = _tsne_record(feats_before, _features_both(model, attack, xe, ye, params), params)
    return out


def _fresh_like(params: dict[str, Any], num_classes: int, x) -> torch.nn.Module:
    from .sources import build_model

    torch.manual_seed(int(params.get("seed", 0)))
    return build_model(params["model"], num_classes, x.shape[1], x.shape[-1])


def _features_both(model, attack, xe, ye, params: dict[str, Any]) -> dict[str, Any]:
    from ..models.features import features

    n = int(params.get("tsne_images", 500))
    g = torch.Generator().manual_seed(int(params.get("seed", 0)))
    idx = torch.randperm(len(xe), generator=g)[:n]
    x, y = xe[idx], ye[idx]
    t = attack.target_of(y)
    keep = t != y  # triggered images of non-target classes only
    xt = attack.apply(x[keep])
    return {"clean": features(model, x), "triggered": features(model, xt), "y": y, "y_triggered": y[keep]}


def knn_agreement(feats: dict[str, Any], k: int = 10) -> dict[str, float]:
    """In the (penultimate) feature space: the share of triggered images whose ``k`` nearest
    clean images mostly carry the triggered image's true class, and, as the ceiling, the
    same leave-one-out share for the clean images themselves."""
    clean, trig, y, yt = feats["clean"], feats["triggered"], feats["y"], feats["y_triggered"]
    classes = int(max(int(y.max()), int(yt.max()) if len(yt) else 0)) + 1

    def vote(dist: torch.Tensor) -> torch.Tensor:
        idx = dist.topk(min(k, dist.shape[1]), largest=False).indices
        return torch.nn.functional.one_hot(y[idx], classes).sum(1).argmax(1)

    d_clean = torch.cdist(clean, clean)
    d_clean.fill_diagonal_(float("inf"))
    return {"triggered_true_class": float((vote(torch.cdist(trig, clean)) == yt).float().mean()) if len(yt) else 0.0,
            "clean_leave_one_out": float((vote(d_clean) == y).float().mean()), "k": k}


def _tsne_record(before: dict[str, Any], after: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    seed = int(params.get("seed", 0))
    rec: dict[str, Any] = {"labels": before["y"].tolist(), "labels_triggered": before["y_triggered"].tolist(),
                           "knn": {"before": knn_agreement(before), "after": knn_agreement(after)}}
    for when, f in (("before", before), ("after", after)):
        emb = _tsne(torch.cat([f["clean"], f["triggered"]]), seed)
        rec[when] = {"clean": emb[: len(f["clean"])], "triggered": emb[len(f["clean"]):]}
    return rec


#: task name -> function(params, env) -> result
TASKS: dict[str, Callable[[dict[str, Any], Env], dict[str, Any]]] = {"defend": run_defend}

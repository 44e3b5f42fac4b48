"""One job per command: options in, files out, a result back for the terminal.

Each job checks every option and every output path before it loads anything heavy
(:class:`~ibau.jobs.outputs.Outputs`), loads its inputs through
:func:`~ibau.jobs.inputs.load_inputs`, calls one library function, and writes its
outputs weights first (a report never names weights that are not on disk). Under
``torchrun`` only rank 0 writes. The command line (:mod:`ibau.cli`) parses arguments,
calls one of these, and prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError, check_choice, check_int, check_number
from .inputs import DataSource, ModelSource, load_inputs, resolve_device, seed_everything
from .outputs import Outputs

__all__ = ["defaults_of", "unlearn_job", "defend_job", "poison_job", "evaluate_job", "scan_job", "Written", "parse_holdout", "parse_rounds",
           "ibau_settings_check"]


@dataclass
class Written:
    """What a job produced: its report (plain data), the files it wrote, lines to print."""

    report: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    status: int = 0  # the command's exit status (``ibau scan``: 1 when a backdoor is found)


def _is_main() -> bool:
    from ..distributed import is_main

    return is_main()


def parse_holdout(value: Any) -> float | int:
    """A fraction in (0, 1) or a whole count >= 1 (floats such as ``500.0`` count as counts)."""
    check_number("holdout", value, low=0, low_open=True, high=1e12)
    if value >= 1:
        if not float(value).is_integer():
            raise InputError(f"holdout must be a fraction in (0, 1) or a whole count, got {value!r}")
        return int(value)
    return float(value)


def parse_rounds(value: Any) -> int | str | None:
    if value is None:  # the recipe's number of rounds
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        rounds = int(str(value))
    except ValueError:
        raise InputError(f"rounds must be 'auto' or a non-negative integer, got {value!r}") from None
    return check_int("rounds", rounds, low=0, high=10_000)


def ibau_settings_check(settings: dict[str, Any], recipe: str = "default") -> None:
    """Build an :class:`~ibau.IBAU` from ``settings`` once, to refuse bad values up front
    (``norm_bound="auto"`` is resolved per image size later; any valid bound stands in)."""
    from ..defenses.ibau import IBAU

    kwargs = dict(settings)
    if kwargs.get("norm_bound") == "auto":
        kwargs["norm_bound"] = 10.0
    try:
        IBAU.from_recipe(recipe, **kwargs)
    except InputError:
        raise
    except (TypeError, ValueError) as exc:
        raise InputError(f"I-BAU setting: {exc}") from None


def _plan(force: bool, model: ModelSource | None, data: DataSource | None, extra_inputs=(),
          log: list[Path] | None = None) -> Outputs:
    plan = Outputs(force=force)
    if log is not None:  # the caller sees what is on disk, e.g. to report it on an interruption
        plan.written = log
    if model is not None:
        plan.add_inputs(model.paths(), "model file")
    if data is not None:
        plan.add_inputs(data.paths(), "data")
    for path, what in extra_inputs:
        plan.add_input(path, what)
    return plan


# ----------------------------------------------------------------------------- unlearn
def defaults_of(fn) -> dict[str, Any]:
    """The keyword defaults of a library function or job: the one place they are written."""
    import inspect

    return {k: v.default for k, v in inspect.signature(fn).parameters.items() if v.default is not v.empty}


def _unlearn_defaults() -> dict[str, Any]:
    from ..unlearn import unlearn

    return defaults_of(unlearn)


_U = _unlearn_defaults()  # the library's defaults, written once in ibau.unlearn.unlearn


def unlearn_job(model: ModelSource, data: DataSource, *, out: Path, report: Path, report_dir: Path | None = None,
                force: bool = False, holdout: Any = _U["holdout"], rounds: Any = _U["rounds"],
                max_rounds: int | None = _U["max_rounds"], threshold: float = _U["threshold"],
                max_accuracy_drop: float = _U["max_accuracy_drop"], recipe: str = _U["recipe"],
                robustness_bound: float | None = _U["robustness_bound"], scan: bool = _U["scan"],
                scan_settings: dict[str, Any] | None = None, seed: int = _U["seed"], device: Any = "auto",
                progress: bool = True, ibau_settings: dict[str, Any] | None = None,
                log: list[Path] | None = None) -> Written:
    """``ibau unlearn``: sanitise ``model`` with I-BAU on ``data``; write weights and reports."""
    from ..io import save_weights, write_json
    from ..report import require_matplotlib, summary, write_report_dir
    from ..unlearn import unlearn

    plan = _plan(force, model, data, log=log)
    out = plan.add(out, "output weights", suffix=".safetensors")
    report = plan.add(report, "report")
    report_dir = plan.add(report_dir, "report folder", folder=True)
    plan.check()
    holdout = parse_holdout(holdout)
    rounds = parse_rounds(rounds)
    if max_rounds is not None:
        check_int("max_rounds", max_rounds, low=1, high=10_000)
    check_number("threshold", threshold, low=0, high=1)
    check_number("max_accuracy_drop", max_accuracy_drop, low=0, high=1)
    from ..defenses.ibau import RECIPES

    check_choice("recipe", recipe, tuple(RECIPES))
    check_number("robustness_bound", robustness_bound, low=0, low_open=True, allow_none=True)
    check_int("seed", seed, low=0, high=2**63 - 1)
    settings = dict(ibau_settings or {})
    ibau_settings_check(settings, recipe)
    resolve_device(device)
    if report_dir is not None:
        require_matplotlib()

    inputs = load_inputs(model, data, device=device, seed=seed)
    plan.check_space(2 * _state_bytes(inputs.model))
    if inputs.normalize is not None:
        settings["normalize"] = inputs.normalize
    result = unlearn(inputs.model, inputs.x, inputs.y, holdout=holdout, rounds=rounds, max_rounds=max_rounds,
                     threshold=threshold, max_accuracy_drop=max_accuracy_drop, recipe=recipe, seed=seed,
                     progress=progress, robustness_bound=robustness_bound, scan=scan, scan_settings=scan_settings,
                     **settings)
    rep = result.report
    rep["inputs"] = inputs.info
    written = Written(report=rep)
    if not _is_main():  # torchrun: rank 0 writes
        return written
    save_weights(inputs.model, out, force=force, metadata={"producer": "ibau unlearn"})
    plan.wrote(out)
    if report_dir is not None:
        write_report_dir(report_dir, rep, {k: v.numpy() for k, v in result.artifacts.items()}, force=force)
        plan.wrote(report_dir)
    write_json(rep, report, force=force)
    plan.wrote(report)
    written.files = {"sanitised weights": out, "report": report}
    if report_dir is not None:
        written.files["markdown report"] = report_dir / "report.md"
    written.lines = [summary(rep)]
    return written


# ----------------------------------------------------------------------------- defend
def defend_job(method: str, model: ModelSource, data: DataSource, *, out: Path, report: Path, force: bool = False,
               holdout: Any = 0.1, seed: int = 0, device: Any = "auto", progress: bool = True,
               settings: dict[str, Any] | None = None, log: list[Path] | None = None) -> Written:
    """``ibau defend``: any registered defense; repaired weights, a JSON report and the
    method's tensors (e.g. reversed triggers) in ``REPORT.npz``."""
    import numpy as np

    from ..defend import defend
    from ..io import atomic_write, save_weights, write_json
    from .runner import make_defense, settings_of

    plan = _plan(force, model, data, log=log)
    out = plan.add(out, "output weights", suffix=".safetensors")
    report = plan.add(report, "report")
    artifacts_path = plan.add(report.with_suffix(".npz") if report.suffix != ".npz" else None, "artifacts file")
    if artifacts_path is None:
        raise InputError(f"the report must not end in .npz (its tensors go to REPORT.npz), got {report}")
    plan.check()
    holdout = parse_holdout(holdout)
    settings = dict(settings or {})
    seed = settings.pop("seed", seed)  # a seed or progress among the settings is the job's own
    progress = settings.pop("progress", progress)
    check_int("seed", seed, low=0, high=2**63 - 1)
    if not isinstance(progress, bool):
        raise InputError(f"progress must be True or False, got {progress!r}")
    defense = make_defense(method, settings, seed=seed, progress=progress)  # validates the settings
    if model.weights is None and defense.data_role != "training":
        raise InputError(f"weights are required for {method} (it repairs a trained model)")
    if model.normalize is not None and "normalize" not in settings_of(type(defense)):
        raise InputError(f"{method} does not take normalize (it works on the model's own inputs)")
    resolve_device(device)
    inputs = load_inputs(model, data, device=device, seed=seed)
    plan.check_space(2 * _state_bytes(inputs.model))
    if inputs.normalize is not None:
        settings["normalize"] = inputs.normalize
    result = defend(inputs.model, inputs.x, inputs.y, method, holdout=holdout, seed=seed, progress=progress,
                    **settings)
    rep = result.report
    rep["inputs"] = inputs.info
    written = Written(report=rep)
    if not _is_main():
        return written
    save_weights(result.model, out, force=force, metadata={"producer": f"ibau defend --method {method}"})
    plan.wrote(out)
    if result.artifacts:
        arrays = {k: v.numpy() for k, v in result.artifacts.items()}

        def write_npz(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)

        atomic_write(artifacts_path, write_npz, force=force)
        plan.wrote(artifacts_path)
        rep["artifacts"] = {"file": artifacts_path.name, "arrays": sorted(arrays)}
    write_json(rep, report, force=force)
    plan.wrote(report)
    acc0, acc1 = rep["clean_accuracy_before"], rep["clean_accuracy_after"]
    lines = [f"{method}: held-out clean accuracy {100 * acc0:.2f}% -> {100 * acc1:.2f}% "
             f"({rep['holdout_size']} images), {rep['seconds_defense']:.1f} s; {rep['stop_reason']}"]
    scan = rep["extras"].get("scan")
    if scan:
        idx = ", ".join(f"{c}:{a:.2f}" for c, a in enumerate(scan["anomaly_index"]))
        lines.append(f"anomaly index per class: {idx}; flagged: {scan['flagged'] or 'none'}")
    lines += [f"warning: {w}" for w in rep["warnings"]]
    written.lines = lines
    written.files = {"weights": out, "report": report}
    if result.artifacts:
        written.files["artifacts"] = artifacts_path
    return written


# ----------------------------------------------------------------------------- poison
def poison_job(attack_name: str, model: ModelSource, data: DataSource, *, out: Path, force: bool = False,
               attack_options: dict[str, Any] | None = None, target: int | None = None, ratio: float = 0.2,
               subset_size: int | None = None, eval_data: DataSource | None = None,
               trigger_weights: Path | None = None, trigger_epochs: int = 10, epochs: int = 50,
               batch_size: int = 128, lr: float = 1e-3, seed: int = 0, device: Any = "auto",
               progress: bool = True, log: list[Path] | None = None) -> Written:
    """``ibau poison``: train a poisoned model; weights, the attack manifest (with the
    trigger tensors) and the metrics next to each other. Same seed, same weights: every
    model is built after seeding and training draws from seeded generators."""
    from ..attacks import ATTACKS, create_attack
    from ..attacks.manifest import save_manifest, trigger_path
    from ..data.poison import check_attack_targets, check_ratio
    from ..io import load_weights, save_weights, write_json
    from ..poisoning import default_checkpoint, poison_and_train, subset
    from ..train import TrainConfig, train
    from .inputs import build_model, output_dim

    plan = _plan(force, model, data, [(trigger_weights, "trigger weights")], log=log)
    for key, value in (attack_options or {}).items():  # e.g. a picture file: never overwritten
        if isinstance(value, str) and value and Path(value).exists():
            plan.add_input(value, f"file of the attack setting {key}")
    if eval_data is not None:
        plan.add_inputs(eval_data.paths(), "evaluation data")
    out = plan.add(out, "output weights", suffix=".safetensors")
    manifest_path = plan.add(out.with_name(out.stem + ".attack.json"), "manifest")
    plan.add(trigger_path(manifest_path), "trigger file")
    metrics_path = plan.add(out.with_name(out.stem + ".metrics.json"), "metrics file")
    # rewritten every epoch; one left by an interrupted run is resumed from
    checkpoint = plan.add(default_checkpoint(out), "training checkpoint", may_exist=True)
    plan.check()
    check_ratio(ratio)
    check_int("subset", subset_size, low=1, allow_none=True)
    check_int("trigger_epochs", trigger_epochs, low=0, high=100_000)
    check_int("seed", seed, low=0, high=2**63 - 1)
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)  # validates its fields
    if trigger_weights is not None and not Path(trigger_weights).is_file():
        raise InputError(f"trigger weights file not found: {trigger_weights}")
    options = dict(attack_options or {})
    if target is not None:
        options["target"] = check_int("target", target, low=0)
    import inspect

    if "seed" in inspect.signature(ATTACKS.get_or_raise(attack_name).__init__).parameters:
        options.setdefault("seed", seed)
    try:
        attack = create_attack(attack_name, **options)
    except InputError:
        raise
    except (TypeError, ValueError, KeyError) as exc:
        raise InputError(f"bad option for attack {attack_name!r}: {exc}") from None
    dev = resolve_device(device)

    x, y = subset(*data.load(), subset_size, seed)
    evald = eval_data.load() if eval_data is not None else None
    inputs = load_inputs(model, (x, y), device=dev, seed=seed)  # built after seeding
    plan.check_space(4 * _state_bytes(inputs.model))  # weights, trigger, and the per-epoch checkpoint
    classes = inputs.num_classes
    check_attack_targets(attack, classes)  # before a reference model is trained for the trigger
    if evald is not None:
        from ..data import check_dataset

        check_dataset(*evald, num_classes=classes)
        output_dim(inputs.model, evald[0])
    if getattr(attack, "needs_model", False) or any(getattr(a, "needs_model", False)
                                                    for a in getattr(attack, "attacks", [])):
        ref = build_model(model, int(y.max()), seed + 1).to(dev)
        if trigger_weights is not None:
            load_weights(ref, trigger_weights)
        else:
            train(ref, (x, y), TrainConfig(trigger_epochs, batch_size, lr, seed + 1), progress=progress,
                  desc="clean model for the trigger")
        attack.prepare(ref.eval(), x, y)
    else:
        try:  # fits shape-dependent triggers (patch position, warping field, picture) to the data's images
            attack.prepare(None, x, y)
        except (ValueError, TypeError) as exc:
            raise InputError(f"attack {attack_name!r} cannot be used on these images: {exc}") from None
    seed_everything(seed)  # the poisoning and training draw from here on: same seed, same model
    record = poison_and_train(inputs.model, x, y, attack, ratio=ratio, config=config, seed=seed,
                              checkpoint=checkpoint, progress=progress, eval_data=evald)
    written = Written(report=record)
    if not _is_main():
        return written
    save_weights(inputs.model, out, force=force, metadata={"producer": "ibau poison"})
    plan.wrote(out)
    save_manifest(attack, manifest_path, extra={"weights": out.name, "data": str(data.spec), "training": record},
                  force=force)
    plan.wrote(manifest_path)
    write_json(record, metrics_path)
    plan.wrote(metrics_path)
    m = record.get("metrics")
    line = f"poisoned {record['poisoned']} of {record['training_size']} training images with {attack.name}"
    if m:
        line += f"; ACC {100 * m['acc']:.2f}%, ASR {100 * m['asr']:.2f}%"
    written.lines = [line]
    written.files = {"weights": out, "manifest": manifest_path}
    return written


def _state_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


# ----------------------------------------------------------------------------- evaluate
def evaluate_job(model: ModelSource, data: DataSource, *, manifest: Path | None = None,
                 trigger_image: Path | None = None, trigger_mode: str | None = None, mask: Path | None = None,
                 alpha: float | None = None, target: int | None = None, json_out: Path | None = None,
                 force: bool = False, device: Any = "auto", seed: int = 0, log: list[Path] | None = None) -> Written:
    """``ibau evaluate``: clean accuracy, attack success rate and robust accuracy of
    ``model`` under the attack a manifest describes, or under a known trigger
    (:class:`~ibau.attacks.ImageTrigger`: ``trigger_image`` stamped with ``trigger_mode``
    ``"mask"`` (with ``mask``), ``"blend"`` (with ``alpha``) or ``"additive"``, sending images
    to ``target``). Give exactly one of ``manifest`` and ``trigger_image``. The metrics are
    the same either way; a trigger's description (files, SHA-256, mode, alpha, target) is
    the report's ``trigger``."""
    from ..io import write_json
    from ..poisoning import evaluate_attack

    if (manifest is None) == (trigger_image is None):
        raise InputError("give either an attack manifest (from ibau poison) or a trigger image"
                         + (", not both" if manifest is not None else ""))
    plan = _plan(force, model, data, log=log)
    if manifest is not None:
        from ..attacks.manifest import load_manifest

        extra = {k: v for k, v in (("trigger_mode", trigger_mode), ("mask", mask), ("alpha", alpha),
                                   ("target", target)) if v is not None}
        if extra:
            raise InputError(f"{', '.join(extra)} go with a trigger image; a manifest names its own trigger and target")
        _, described = load_manifest(manifest)  # its schema and trigger file, before anything else
        plan.add_input(manifest, "manifest")
        if described.get("trigger_file"):  # the trigger tensors are an input too
            plan.add_input(Path(manifest).parent / described["trigger_file"], "trigger file")
    else:
        from ..attacks.user_trigger import check_trigger_settings

        if trigger_mode is None:
            raise InputError("a trigger image needs a mode: 'mask' (with a mask), 'blend' (with alpha) or 'additive'")
        check_trigger_settings(trigger_mode, alpha=alpha, mask=mask)
        if target is None:
            raise InputError("a trigger image needs the target class its triggered images are sent to (target)")
        check_int("target", target, low=0)
        for path, what in ((trigger_image, "trigger image"), (mask, "trigger mask")):
            if path is not None:
                if not Path(path).is_file():
                    raise InputError(f"{what} file not found: {path}")
                plan.add_input(path, what)
    json_out = plan.add(json_out, "metrics file")
    plan.check()
    resolve_device(device)
    inputs = load_inputs(model, data, device=device, seed=seed, min_size=1)
    shape = tuple(inputs.x.shape[1:])
    if manifest is not None:
        attack, _ = load_manifest(manifest, num_classes=inputs.num_classes, image_shape=shape)
    else:
        from ..attacks.user_trigger import ImageTrigger

        if not 0 <= target < inputs.num_classes:
            raise InputError(f"target {target} is not a class of the model: it must lie in [0, {inputs.num_classes})")
        attack = ImageTrigger(trigger_image, target=target, mode=trigger_mode, mask=mask, alpha=alpha,
                              image_shape=shape, num_classes=inputs.num_classes)
        if not bool((inputs.y != target).any()):
            raise InputError(f"every image of the data is of the target class {target}: the attack success rate "
                             "is measured on the images of the other classes")
    net = inputs.model.eval()
    if inputs.normalize is not None:
        from ..models import Normalized

        net = Normalized(net, *inputs.normalize)
    metrics = evaluate_attack(net, attack, inputs.x, inputs.y)
    result = {"weights": str(model.weights), "manifest": None if manifest is None else str(manifest),
              "data": str(data.spec), "images": len(inputs.x), **metrics}
    if trigger_image is not None:
        result["trigger"] = attack.describe()
    written = Written(report=result)
    if json_out is not None and _is_main():
        write_json(result, json_out, force=force)
        plan.wrote(json_out)
        written.files = {"metrics": json_out}
    written.lines = [f"ACC {100 * metrics['acc']:.2f}%  ASR {100 * metrics['asr']:.2f}%"
                     + (f"  RA {100 * metrics['ra']:.2f}%" if "ra" in metrics else "") + f"  ({len(inputs.x)} images)"]
    return written


# ----------------------------------------------------------------------------- scan
def scan_job(model: ModelSource, data: DataSource, *, report: Path | None = None, report_dir: Path | None = None,
             force: bool = False, seed: int = 0, device: Any = "auto", progress: bool = True,
             settings: dict[str, Any] | None = None, log: list[Path] | None = None) -> Written:
    """``ibau scan``: is ``model`` backdoored? A verdict from clean ``data`` alone; the JSON
    report and, in ``report_dir``, the reversed trigger(s) as tensors and PNGs and a report.md."""
    from ..io import write_json
    from ..scanning import scan
    from ..utils import environment

    plan = _plan(force, model, data, log=log)
    report = plan.add(report, "report")
    report_dir = plan.add(report_dir, "report folder", folder=True)
    plan.check()
    check_int("seed", seed, low=0, high=2**63 - 1)
    resolve_device(device)
    settings = dict(settings or {})
    inputs = load_inputs(model, data, device=device, seed=seed)
    if inputs.normalize is not None:
        settings["normalize"] = inputs.normalize
    result = scan(inputs.model, inputs.x, inputs.y, seed=seed, progress=progress, **settings)
    rep = {**result.as_dict(), "inputs": inputs.info, "versions": environment()}
    written = Written(report=rep)
    written.lines = [result.summary()] + [f"warning: {w}" for w in result.warnings]
    written.status = 1 if result.backdoored else 0
    if not _is_main():
        return written
    if report_dir is not None:
        from ..report import write_scan_dir

        write_scan_dir(report_dir, rep, result.triggers, force=force)
        plan.wrote(report_dir)
        written.files["scan report folder"] = report_dir
    if report is not None:
        write_json(rep, report, force=force)
        plan.wrote(report)
        written.files["report"] = report
    return written

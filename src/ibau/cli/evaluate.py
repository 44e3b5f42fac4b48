"""``ibau evaluate``: clean accuracy, attack success rate and robust accuracy under an attack:
one described by a manifest (``ibau poison``), or a known trigger given as image files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .options import FLOAT, INT, CommandLineError, command, data_source, log_of, model_options, model_source

_TRIGGER_HELP = """\
Without a manifest, measure your own trigger: --trigger-image FILE --target K and exactly one
of --mask FILE ((1 - m) * x + m * t, the mask a grayscale image / 255), --blend ALPHA
((1 - ALPHA) * x + ALPHA * t, 0 < ALPHA <= 1) or --additive (clamp(x + d, 0, 1), the
perturbation d stored as an 8-bit image with 128 meaning 0: d = (v - 128) / 127, so 255 is
+1 and 1 is -1; save it as PNG, or give a .npy float array of d in [-1, 1]). Files must have
the images' height and width (nothing is resized); a grayscale trigger is used for every
channel, an alpha channel is dropped. A .npy (C, H, W) or (H, W) float array may replace any
of the files (values in [0, 1]; d in [-1, 1] for --additive). ASR counts the images not of
class K that the model sends to K."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = _TRIGGER_HELP
    model_options(p)
    a = p.add_argument_group("attack (one of --manifest, --trigger-image)")
    src = a.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", type=Path, help="the attack manifest written by ibau poison")
    src.add_argument("--trigger-image", type=Path, metavar="FILE",
                     help="your trigger: an image (PNG/JPEG/...) or a .npy array of the images' size; needs "
                          "--target and one of --mask, --blend, --additive")
    how = a.add_mutually_exclusive_group()
    how.add_argument("--mask", type=Path, metavar="FILE",
                     help="stamp (1 - m) * x + m * trigger; m: a grayscale image of the images' size, / 255 "
                          "(255 = trigger, 0 = image), or a .npy array in [0, 1]")
    how.add_argument("--blend", type=FLOAT, metavar="ALPHA",
                     help="stamp (1 - ALPHA) * x + ALPHA * trigger, 0 < ALPHA <= 1")
    how.add_argument("--additive", action="store_true",
                     help="stamp clamp(x + d, 0, 1); the trigger image holds d as (v - 128) / 127 "
                          "(128 = no change, 255 = +1, 1 = -1), or is a .npy array of d in [-1, 1]")
    a.add_argument("--target", type=INT, metavar="K",
                   help="with --trigger-image: the class the trigger sends images to, in [0, classes)")
    p.add_argument("--data", required=True, help="test data: .npz, image folder, or cifar10 / gtsrb")
    p.add_argument("--data-dir", type=Path, help="where the files of a named dataset are")
    p.add_argument("--split", default="test", choices=("train", "test"), help="(default: test)")
    p.add_argument("--json", type=Path, help="write the metrics here (default: print them)")
    p.add_argument("--force", action="store_true", help="replace an existing --json file (never an input)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")


def _trigger_options(args: argparse.Namespace) -> dict:
    """The known-trigger options as the job's keywords; CommandLineError for a combination
    the flags cannot make."""
    modes = [flag for flag, given in (("--mask", args.mask is not None), ("--blend", args.blend is not None),
                                      ("--additive", args.additive)) if given]
    if args.manifest is not None:
        stray = modes + (["--target"] if args.target is not None else [])
        if stray:
            raise CommandLineError(f"{', '.join(stray)} go with --trigger-image, not with --manifest (a manifest "
                                   "names its own trigger and target)")
        return {}
    if not modes:
        raise CommandLineError("--trigger-image needs one of --mask FILE, --blend ALPHA or --additive "
                               "(see ibau evaluate --help)")
    if args.target is None:
        raise CommandLineError("--trigger-image needs --target K, the class the trigger sends images to")
    mode = modes[0].lstrip("-")
    return {"trigger_image": args.trigger_image, "trigger_mode": mode, "mask": args.mask, "alpha": args.blend,
            "target": args.target}


@command("evaluate", "clean accuracy, attack success rate and robust accuracy of a model under an attack "
                     "(an ibau poison manifest, or your own trigger image)", add_arguments)
def run(args: argparse.Namespace) -> int:
    from ..jobs.commands import evaluate_job

    trigger = _trigger_options(args)  # option combinations first, before any file is looked at
    written = evaluate_job(model_source(args), data_source(args), manifest=args.manifest, json_out=args.json,
                           force=args.force, device=args.device, log=log_of(args), **trigger)
    if args.json is None:
        print(json.dumps(written.report, indent=2))
    for line in written.lines:
        print(line)
    return 0

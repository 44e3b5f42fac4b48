"""``ibau poison``: train a poisoned model (data + model + attack -> weights, manifest, metrics)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import FLOAT, INT, command, data_source, defaults_of, finish, log_of, model_options, model_source, \
    parse_key_values, run_options


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..jobs.commands import poison_job
    from ..train import TrainConfig

    defaults = TrainConfig()
    job = defaults_of(poison_job)
    model_options(p, weights_required=False)
    d = p.add_argument_group("data")
    d.add_argument("--data", required=True, help="training data: .npz, image folder, or cifar10 / gtsrb")
    d.add_argument("--data-dir", type=Path, help="where the files of a named dataset are")
    d.add_argument("--split", default="train", choices=("train", "test"), help="(default: train)")
    d.add_argument("--subset", type=INT, help="train on a seeded random subset of this many images")
    d.add_argument("--eval-data", help="data to measure ACC/ASR on (default: the test split of a named dataset)")
    a = p.add_argument_group("attack")
    a.add_argument("--attack", required=True, help="an attack of the registry (ibau.attacks.ATTACKS)")
    a.add_argument("--target", type=INT, help="target class (default: the attack's paper setting)")
    a.add_argument("--attack-option", action="append", metavar="KEY=VALUE", help="other attack settings")
    a.add_argument("--ratio", type=FLOAT, default=job["ratio"],
                   help=f"poisoned share of the training set (default: {job['ratio']})")
    a.add_argument("--trigger-weights", type=Path,
                   help="for triggers generated against a model: that model's weights (default: train a clean "
                        "model with the same recipe for --trigger-epochs)")
    a.add_argument("--trigger-epochs", type=INT, default=job["trigger_epochs"],
                   help=f"(default: {job['trigger_epochs']})")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=INT, default=defaults.epochs, help=f"(default: {defaults.epochs})")
    t.add_argument("--batch-size", type=INT, default=defaults.batch_size, help=f"(default: {defaults.batch_size})")
    t.add_argument("--lr", type=FLOAT, default=defaults.lr, help=f"(default: {defaults.lr})")
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, required=True,
                   help="poisoned weights (.safetensors); the manifest and metrics go beside it")
    o.add_argument("--force", action="store_true", help="replace existing outputs (never an input)")
    run_options(p, seed_help="seed of the model, the poisoning and the training (default: 0)")


@command("poison", "train a poisoned model: data + model + attack -> weights, attack manifest, ACC/ASR",
         add_arguments)
def run(args: argparse.Namespace) -> int:
    from ..jobs.commands import poison_job

    eval_spec = args.eval_data or (args.data if args.data in ("cifar10", "gtsrb") else None)
    written = poison_job(args.attack, model_source(args), data_source(args),
                         out=args.out, force=args.force, attack_options=parse_key_values(args.attack_option,
                                                                                         "--attack-option"),
                         target=args.target, ratio=args.ratio, subset_size=args.subset,
                         eval_data=data_source(args, split="test", spec=eval_spec) if eval_spec else None,
                         trigger_weights=args.trigger_weights, trigger_epochs=args.trigger_epochs, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device,
                         progress=not args.quiet, log=log_of(args))
    return finish(args, written)

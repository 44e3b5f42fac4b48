"""One I-BAU round and one training epoch in 1 process vs 2 processes (torch.distributed, gloo).

    python benchmarks/perf/distributed_ibau.py                  # CPU: 1 process x 2 threads, 1 x 1, 2 x 1
    python benchmarks/perf/distributed_ibau.py --device cuda    # a GPU machine: 1 process vs N processes, NCCL

Case: the authors' released CIFAR-10 BadNets model and ``--clean`` seeded lossy CIFAR-10 test
images (``../shared/data``; random images of the same shape when it is absent). Each
configuration runs in fresh processes, one after another, on the same data. Reported:
the round's wall time (the I-BAU ``seconds`` of the history, rank 0), the ratio to the
first row, the bytes all-reduced per round (``ibau.distributed.Comm``) next to the
parameter count, and the largest difference of the perturbation and the weights from
the single process with the same threads per process (the data-parallel round is the
same computation; the inner maximisation, 20 SGD steps of size 10 with argmax pseudo-labels,
amplifies float rounding). Then one
training epoch (Adam, batch 128) of a small VGG on ``--train`` images, plain vs DDP.

Writes ``benchmarks/results/distributed_ibau.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ibau import IBAU
from ibau.bench.data import load, protocol_split
from ibau.io import load_weights, write_json
from ibau.models import SmallVGG
from ibau.train import TrainConfig, train
from ibau.utils import environment

BENCH = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("IBAU_SHARED_DATA", BENCH.parents[1] / "shared" / "data"))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(root: Path, clean: int, n_train: int):
    if (root / "cifar10").is_dir():
        (xc, yc), _ = protocol_split("cifar10", str(root), {"clean_size": clean, "split_seed": 0})
        tr = load("cifar10", str(root), "train")
        xt, yt = tr["x"], tr["y"]
        return xc, yc, xt[:n_train], yt[:n_train], root / "ibau-checkpoints" / "badnets_8_02_ckpt.pth"
    g = torch.Generator().manual_seed(0)
    return (torch.rand(clean, 3, 32, 32, generator=g), torch.randint(0, 10, (clean,), generator=g),
            torch.rand(n_train, 3, 32, 32, generator=g), torch.randint(0, 10, (n_train,), generator=g), None)


def _job(rank: int, world: int, port: int, threads: int, args: dict, out: str) -> None:
    torch.set_num_threads(threads)
    device = torch.device(args["device"], rank) if args["device"] == "cuda" else torch.device("cpu")
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                init_method=f"tcp://127.0.0.1:{port}")
    try:
        xc, yc, xt, yt, weights = _data(Path(args["data"]), args["clean"], args["train"])
        torch.manual_seed(0)
        model = SmallVGG(10)
        if weights is not None:
            load_weights(model, weights)
        model.to(device).eval()
        res = IBAU.paper(rounds=1, seed=0, progress=False).fit(model, xc, yc)  # as in the committed results
        from ibau.distributed import current

        comm = current()
        record = {"round_seconds": res.history[-1]["seconds"], "delta": res.extras["delta"],
                  "state": {k: v.cpu() for k, v in model.state_dict().items()},
                  "bytes": comm.bytes_reduced if comm else 0, "calls": comm.calls if comm else 0}
        torch.manual_seed(0)
        net = SmallVGG(10).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train(net, (xt, yt), TrainConfig(epochs=1, batch_size=128, seed=0), progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        record["epoch_seconds"] = time.perf_counter() - t0
        if rank == 0:
            torch.save(record, f"{out}/r.pt")
    finally:
        if world > 1:
            dist.destroy_process_group()


def run(world: int, threads: int, args: dict) -> dict:
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_job, args=(world, _port(), threads, args, out), nprocs=world, join=True,
                           start_method="spawn")
        return torch.load(f"{out}/r.pt", weights_only=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--clean", type=int, default=2000, help="clean images (global batch 100)")
    ap.add_argument("--train", type=int, default=2560, help="training images for the DDP epoch")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=BENCH / "results" / "distributed_ibau.json")
    args = ap.parse_args(argv)
    opts = {"data": str(args.data), "clean": args.clean, "train": args.train, "device": args.device}
    cores = os.cpu_count() or 1
    if args.device == "cpu":
        configs = [("1 process x %d threads" % cores, 1, cores), ("1 process x 1 thread", 1, 1),
                   (f"{args.procs} processes x {max(1, cores // args.procs)} thread(s)", args.procs,
                    max(1, cores // args.procs))]
    else:
        configs = [("1 process, 1 GPU", 1, 4), (f"{args.procs} processes, {args.procs} GPUs", args.procs, 4)]
    rows = []
    runs = []
    for label, world, threads in configs:
        r = run(world, threads, opts)
        runs.append(r)
        # differences against the single process with the same threads per process (same kernels)
        base = next((q for q, (_, w, t) in zip(runs, configs) if w == 1 and t == threads), runs[0])
        n_params = sum(v.numel() for k, v in r["state"].items() if "running" not in k and "num_batches" not in k)
        rows.append({"config": label, "processes": world, "threads": threads, "round_seconds": r["round_seconds"],
                     "epoch_seconds": r["epoch_seconds"], "bytes_per_round": r["bytes"], "all_reduces": r["calls"],
                     "parameters": n_params,
                     "max_delta_diff": float((r["delta"] - base["delta"]).abs().max()),
                     "max_weight_diff": max(float((r["state"][k].float() - base["state"][k].float()).abs().max())
                                            for k in r["state"])})
        print(rows[-1], flush=True)
    data = {"clean_images": args.clean, "train_images": args.train, "device": args.device, "rows": rows,
            "environment": environment(), "cpu_count": cores,
            "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None}
    write_json(data, args.out, force=True)
    args.out.with_suffix(".md").write_text(report(data))


def report(data: dict) -> str:
    rows = data["rows"]
    b = rows[0]
    lines = [f"# I-BAU round and training epoch: 1 vs several processes ({data['device']}, "
             f"{data['cpu_count']} cores{', ' + data['gpu'] if data['gpu'] else ''})", "",
             f"One I-BAU round on {data['clean_images']:,} clean images (global batch 100, released CIFAR-10 BadNets "
             f"model) and one training epoch on {data['train_images']:,} images; generated by "
             "`benchmarks/perf/distributed_ibau.py`. Ratios: the first row's time / this row's.", "",
             "| configuration | round s | speed-up | epoch s | speed-up | all-reduced per round | = x parameters "
             "| max diff delta / weights vs 1 process, same threads |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['round_seconds']:.1f} | {b['round_seconds'] / r['round_seconds']:.2f}x | "
                     f"{r['epoch_seconds']:.1f} | {b['epoch_seconds'] / r['epoch_seconds']:.2f}x | "
                     f"{r['bytes_per_round'] / 2**20:.1f} MiB in {r['all_reduces']} calls | "
                     f"{r['bytes_per_round'] / 4 / r['parameters']:.1f} | {r['max_delta_diff']:.1e} / "
                     f"{r['max_weight_diff']:.1e} |")
    steps = -(-data["clean_images"] // 100)
    multi = [r for r in rows if r["processes"] > 1]
    if multi:
        per_step = multi[0]["bytes_per_round"] / 4 / steps / multi[0]["parameters"]
        lines += ["", f"Communication: {per_step:.2f} x the parameter count per outer step ({steps} outer steps a "
                  "round): one all-reduce of the parameter gradients, plus perturbation-sized vectors (one per "
                  "inner step, one per hypergradient-solver product) and a few scalars. It grows with the number "
                  "of global batches, not with the images a process holds. Differences are float rounding, "
                  "amplified by the inner maximisation and by Adam's normalised first steps (two single-process "
                  "runs with 1 and 2 threads differ as much)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""End-to-end images/s of the explain job (local Ray, CPU) against the bare engine, side by side in one run.

The bare engine loops over the same images, already decoded and preprocessed, in this process with
all cores; the job reads and decodes the PNGs itself, explains them in Ray actors and writes the Zarr
store. Both use the same model, composite and batch size. Target: job >= 85% of the bare engine.

    .venv/bin/python benchmarks/bench_pipeline.py --images 8192 --size 64 --engine-threads 1
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_images(root: Path, count: int, size: int, classes: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size + size // 4, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def bare_engine(config, batch_size: int, threads: int) -> tuple[float, int]:
    """The engine alone: decoded inputs in memory, one process, ``threads`` torch threads."""
    import lrp
    from pipeline.datasets import load_index, read_image
    from pipeline.models import build_model
    from pipeline.preprocess import Preprocess

    index = load_index(config.dataset.source)
    preprocess = Preprocess(config.preprocess)
    inputs = torch.stack([preprocess(read_image(p))[0] for p in index.samples["path"].to_pylist()])
    labels = torch.as_tensor(index.samples["label"].to_numpy().copy())
    model = build_model(config.model)
    setting = config.explanations[0]
    explainer = lrp.Explainer(model, setting.composite, **setting.params)
    torch.set_num_threads(threads)
    explainer(inputs[:batch_size], labels[:batch_size])  # warm-up, as the actors' first batch is not timed apart
    began = time.perf_counter()
    for start in range(0, len(inputs), batch_size):
        result = explainer(inputs[start:start + batch_size], labels[start:start + batch_size])
        result.relevance.sum(1).numpy()
    return time.perf_counter() - began, len(inputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=64, help="image height in pixels (model input size)")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--composite", default="epsilon_plus")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--actors", type=int, default=os.cpu_count() or 1, help="explain actors (CPUs split evenly)")
    parser.add_argument("--repeats", type=int, default=1, help="alternate engine and job runs, keep the best of each")
    parser.add_argument("--engine-threads", type=int, nargs="+", help="torch threads of the bare engine "
                        "(default: 1 and all cores; the best is the baseline)")
    args = parser.parse_args()

    import ray

    from pipeline.config import config_from_dict
    from pipeline.run import run

    cpus = os.cpu_count() or 1
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_images(root / "data", args.images, args.size, 10)
        values = {
            "dataset": str(root / "data"),
            "model": {"name": args.model, "kwargs": {"num_classes": 10}},
            "preprocess": {"resize": args.size, "pad_to_square": True},
            "explanations": [args.composite],
            "batch_size": args.batch_size, "num_actors": args.actors, "cpus_per_actor": max(1, cpus // args.actors),
            "rows_per_shard": 4 * args.batch_size, "progress": False,
        }
        engine, job, steady = {threads: [] for threads in args.engine_threads or [1, cpus]}, [], []
        for repeat in range(args.repeats):
            for threads in engine:  # the stronger of one thread and all cores is the baseline
                seconds, count = bare_engine(config_from_dict({**values, "store": str(root / "unused")}),
                                             args.batch_size, threads)
                engine[threads].append(count / seconds)
            config = config_from_dict({**values, "store": str(root / f"run{repeat}.zarr")})
            began = time.perf_counter()
            summary = run(config)
            total = time.perf_counter() - began
            assert summary.exit_code == 0, summary.format()
            job.append(summary.rows / total)
            steady.append(summary.computed_rows / summary.seconds)
    best = {threads: max(rates) for threads, rates in engine.items()}
    best_engine, best_job, best_steady = max(best.values()), max(job), max(steady)
    print(f"machine: {platform.processor() or platform.machine()}, {cpus} cores, torch {torch.__version__}")
    print(f"{args.images} images {args.size}x{args.size + args.size // 4} -> {args.size}x{args.size}, {args.model}, "
          f"{args.composite}, batch {args.batch_size}, {args.actors} actor(s) x {max(1, cpus // args.actors)} CPU")
    print(f"| {'what':<44} | {'images/s':>9} | {'vs engine':>9} |")
    print(f"|{'-' * 46}|{'-' * 11}|{'-' * 11}|")
    for threads, rate in best.items():
        print(f"| {f'bare engine, decoded inputs, {threads} thread(s)':<44} | {rate:9.1f} | {rate / best_engine:9.0%} |")
    print(f"| {'explain job, end to end (plan+actors+store)':<44} | {best_job:9.1f} | {best_job / best_engine:9.0%} |")
    print(f"| {'explain job, after actors are up':<44} | {best_steady:9.1f} | {best_steady / best_engine:9.0%} |")


if __name__ == "__main__":
    main()

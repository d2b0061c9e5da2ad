"""Decoding a shard in the actor's threads against decoding it in worker processes (``decode_workers``).

What bounds one GPU actor is the CPU time its own process spends per image while it also drives the model (the
Python of reading, Pillow, the per-image transforms and the batch assembly hold the GIL). The table shows, for the
same JPEGs read into batches ready for the model (normalised inputs), images/s and the CPU milliseconds per image
in the actor's process itself: with workers that is only receiving the batch, normalising it and (on a GPU) the
copy, the rest runs in the workers. Nothing is explained here: this isolates the decoding side.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_decode_workers.py --images 512 --workers 1 2
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.batches import ShardReader, load_sample
from pipeline.decode_workers import DecodeWorkers, WorkerReader
from pipeline.preprocess import Preprocess, PreprocessSpec


def _records(root: Path, n: int, width: int, height: int) -> list[dict]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (height // 8, width // 8, 3), np.uint8)
    records = []
    for i in range(n):
        path = root / f"{i}.jpg"
        image = Image.fromarray(np.roll(base, i, axis=1)).resize((width, height), Image.BILINEAR)
        image.save(path, quality=90)
        records.append(dict(path=str(path), mask_path="", boxes=[], box_classes=[], sample_id=i))
    return records


def _measure(reader, preprocess: Preprocess, device: str | None) -> tuple[float, float, torch.Tensor | None]:
    """(images/s, CPU ms per image in this process, the first batch's inputs) of iterating ``reader`` into model
    inputs on ``device``; None: the batches only (what a GPU actor's process does on the host, the normalisation
    and the copy from pinned memory left to the device)."""
    wall, cpu, count, first = time.perf_counter(), time.process_time(), 0, None
    for batch in reader:
        x = batch.inputs(device, preprocess.normalize) if device else None
        first = x if first is None else first
        count += len(batch.rows)
    if device and device.startswith("cuda"):
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return count / wall, 1e3 * cpu / count, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--image-size", type=int, nargs=2, default=[500, 375], metavar=("W", "H"))
    parser.add_argument("--size", type=int, default=224, help="model input size (resize + center crop)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=4, help="the actor's decoding threads (as claim_cpus gives)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a GPU actor
    spec = PreprocessSpec(resize=args.size, center_crop=args.size)
    preprocess = Preprocess(spec)
    load = lambda row: load_sample(row, preprocess)  # noqa: E731 - the actor's own loader
    with tempfile.TemporaryDirectory() as tmp:
        records = _records(Path(tmp), args.images, *args.image_size)
        rows = {f"actor threads ({args.threads})": []}
        for k in args.workers:
            rows.update({f"{k} decode worker process(es)": [], f"{k} worker(s), batches only": []})
        pools = {k: DecodeWorkers(k, spec) for k in args.workers}
        for pool in pools.values():
            pool.start(wait=True)
        try:
            for _ in range(args.repeats):
                rows[f"actor threads ({args.threads})"].append(
                    _measure(ShardReader(records, load, args.batch_size, args.threads), preprocess, args.device))
                for k, pool in pools.items():
                    for device, what in ((args.device, f"{k} decode worker process(es)"),
                                         (None, f"{k} worker(s), batches only")):
                        rows[what].append(_measure(WorkerReader(records, pool, args.batch_size, load, args.threads),
                                                   preprocess, device))
        finally:
            for pool in pools.values():
                pool.close()
    print(f"{args.images} JPEGs {args.image_size[0]}x{args.image_size[1]} -> {args.size}x{args.size}, batch "
          f"{args.batch_size}, inputs on {args.device}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"| {'decoding':<30} | {'images/s':>9} | {'actor-process CPU ms / image':>28} | "
          f"{'inputs: max abs diff vs threads':>31} |")
    print(f"|{'-' * 32}|{'-' * 11}|{'-' * 30}|{'-' * 33}|")
    reference = rows[f"actor threads ({args.threads})"][0][2]
    for what, results in rows.items():
        rate = max(r[0] for r in results)
        cpu = min(r[1] for r in results)
        first = results[0][2]  # normalised on the device vs on the host
        difference = f"{(first - reference).abs().max().item():.3g}" if first is not None else ""
        print(f"| {what:<30} | {rate:9.1f} | {cpu:28.2f} | {difference:>31} |")


if __name__ == "__main__":
    main()

"""SpRAy's store pass, the read alone: zarr slicing of a shard's rows against ``ExplanationGroup.read_shard``.

Per shard, interleaved (so both see the same load), in one process, on a store made by ``bench_spray.py --keep``;
checks that both give the same maps. Prints seconds and rows per second of each and of the sum pooling.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_spray_read.py STORE [--shards 20]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from aggregations.spray import preprocess
    from pipeline.store import open_store

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store"), parser.add_argument("--shards", type=int, default=20)
    args = parser.parse_args()
    store = open_store(args.store)
    group, seconds = store.group(store.group_names[0]), {"zarr slice": 0.0, "read_shard": 0.0, "sum_pool": 0.0}
    shards = min(args.shards, store.n_shards)
    for shard in range(shards):
        start, stop = store.shard_rows(shard)
        clock = time.perf_counter()
        sliced = group.read("relevance", start, stop)
        seconds["zarr slice"] += time.perf_counter() - clock
        clock = time.perf_counter()
        whole = group.read_shard("relevance", shard)
        seconds["read_shard"] += time.perf_counter() - clock
        clock = time.perf_counter()
        preprocess.sum_pool(whole, 32)
        seconds["sum_pool"] += time.perf_counter() - clock
        assert np.array_equal(sliced, whole, equal_nan=True), shard
    rows = sum(store.shard_rows(s)[1] - store.shard_rows(s)[0] for s in range(shards))
    print("| step | seconds | rows/s |\n| --- | ---: | ---: |")
    for name, value in seconds.items():
        print(f"| {name} | {value:.2f} | {rows / value:.0f} |")
    print(f"read_shard vs zarr slicing: {seconds['zarr slice'] / seconds['read_shard']:.1f}x on {rows} rows")


if __name__ == "__main__":
    main()

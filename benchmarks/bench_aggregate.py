"""Aggregation speed and memory against simply reading the store.

Builds a relevance store of at least ``--gb`` GB (224x224 float32 maps, 10 classes interleaved, one
object box per row, a planted tag in one class so the selective second read runs too) in a temp dir,
then measures, each in a fresh subprocess so peak RSS and CPU seconds (user + system, all threads, interpreter start
included; less sensitive to the machine's load than wall time) are its own:

* zarr read: every chunk of the relevance array read and decompressed with plain zarr (a thread pool of
  ``--workers`` threads, one shard per task, the data dropped right away), with zarr's default config and with
  ``codec_pipeline.batch_size`` set to the shard's row count (faster here); the better of the two is the baseline,
* ShardReader read alone: the same with the aggregation's own read path (pipeline/store.py), no statistics,
* aggregate: ``aggregations.run.aggregate`` (everything: tables, heatmaps, bias flags, writing outputs;
  the planted tag makes its class's rows be read a second time for the spot check),
* one pass only: the same with a spot threshold no spot meets, so nothing is read twice.

Targets (issue 15): aggregation at least 85% of the zarr read speed, peak RSS under 2 GB whatever the
store's size, on 2 GB and on 20 GB (``--gb 2.1,20``).

With ``--groups``, memory against the number of (target, label, prediction) groups instead: a store of
``--classes`` classes with ``--wrong`` of each class's rows predicted as random other classes (about that
many groups per class), aggregated with each of ``--budgets`` (GiB; 0 = one pass, no bound), each in a
fresh subprocess: passes, seconds, peak RSS, and the planner's estimate of the largest pass.

    .venv/bin/python benchmarks/bench_aggregate.py [--gb 2.1[,20]] [--workers 2] [--keep DIR] [--tmp DIR]
    .venv/bin/python benchmarks/bench_aggregate.py --groups [--classes 1000] [--per-class 30] [--size 64]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZE, CLASSES, ROWS_PER_SHARD = 224, 10, 256
TAG = (10, 200, 50, 215)  # x0, y0, x1, y1 of the planted tag in class 3


def build(path: Path, n_rows: int, seed: int = 0) -> None:
    """Relevance-like maps: a positive blob on a random object box, signed noise, a tag on most of class 3."""
    from pipeline.store import RelevanceStore

    rng = np.random.default_rng(seed)
    store = RelevanceStore.create(str(path), config={"benchmark": True}, class_names=[f"c{i}" for i in range(CLASSES)],
                                  groups=["lrp"], n_rows=n_rows, height=SIZE, width=SIZE,
                                  rows_per_shard=ROWS_PER_SHARD, max_boxes=1)
    group = store.group("lrp")
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    for start in range(0, n_rows, ROWS_PER_SHARD):
        n = min(ROWS_PER_SHARD, n_rows - start)
        target = (np.arange(start, start + n) * 7) % CLASSES  # interleaved: many classes in every chunk
        maps = rng.standard_normal((n, SIZE, SIZE), dtype=np.float32) * np.float32(0.001)
        boxes = np.zeros((n, 1, 4), np.float32)
        for i in range(n):
            x0, y0 = rng.integers(0, SIZE - 80, 2)
            boxes[i, 0] = x0, y0, x0 + 80, y0 + 80
            cx, cy = x0 + 40, y0 + 40
            maps[i] += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 20.0**2)).astype(np.float32) * np.float32(0.01)
            if target[i] == 3 and rng.random() < 0.8:
                maps[i, TAG[1]:TAG[3], TAG[0]:TAG[2]] += np.float32(0.04)
        group.write_block(start, relevance=maps, output=maps.sum(axis=(1, 2), dtype=np.float64), target=target,
                          label=target, prediction=target, sample_id=np.arange(start, start + n),
                          path=np.array([f"img{i}.png" for i in range(start, start + n)]), boxes=boxes)


def build_groups(path: Path, classes: int, per_class: int, wrong: int, size: int, seed: int = 0) -> None:
    """Many classes, rows of each class interleaved over the shards, ``wrong`` rows per class mispredicted."""
    from pipeline.store import RelevanceStore

    rng = np.random.default_rng(seed)
    n_rows = classes * per_class
    target = np.arange(n_rows) % classes
    prediction = target.copy()
    for c in range(classes):
        rows = np.flatnonzero(target == c)[:wrong]
        prediction[rows] = (c + 1 + rng.permutation(classes - 1)[:len(rows)]) % classes
    store = RelevanceStore.create(str(path), config={"benchmark": "groups"},
                                  class_names=[f"c{i}" for i in range(classes)], groups=["lrp"], n_rows=n_rows,
                                  height=size, width=size, rows_per_shard=ROWS_PER_SHARD)
    group = store.group("lrp")
    for start in range(0, n_rows, ROWS_PER_SHARD):
        rows = slice(start, min(start + ROWS_PER_SHARD, n_rows))
        maps = rng.standard_normal((rows.stop - start, size, size), dtype=np.float32)
        group.write_block(start, relevance=maps, output=maps.sum(axis=(1, 2), dtype=np.float64), target=target[rows],
                          label=target[rows], prediction=prediction[rows], sample_id=np.arange(start, rows.stop),
                          path=np.array([f"img{i}.png" for i in range(start, rows.stop)]))


def measure_groups(store_path: str, out: str, workers: int, budget_gb: float) -> dict:
    """One aggregation under a budget, with the planner's estimate of its largest pass."""
    from aggregations import views
    from aggregations.run import aggregate
    from aggregations.tables import GroupMeta
    from pipeline.store import open_store

    budget = int(budget_gb * 2**30) if budget_gb > 0 else None
    store = open_store(store_path)
    meta = GroupMeta.read(store.group("lrp"), store.class_names)
    map_bytes = store.height * store.width * 8
    blocks = views.plan_passes(meta, map_bytes, budget)
    start = time.perf_counter()
    result = aggregate(store_path, out, num_workers=workers, memory_budget=budget)
    fine = len(np.unique(meta.keys(("target", "label", "prediction", "correct"))[meta["ok"]], axis=0))
    return {"seconds": time.perf_counter() - start, "passes": result.seconds["lrp"]["passes"], "groups": fine,
            "estimate_mb": max(views.pass_bytes(meta, map_bytes, b) for b in blocks) / 2**20}


def measure_read(store_path: str, workers: int, batch_size: int = 0) -> dict:
    """Plain zarr: ``workers`` threads, one shard-aligned slice each. ``batch_size``: zarr's
    ``codec_pipeline.batch_size`` (0: zarr's default, 1), the one config setting that sped this read up here
    (``async.concurrency`` and ``threading.max_workers`` did not)."""
    import zarr

    if batch_size:
        zarr.config.set({"codec_pipeline.batch_size": batch_size})
    array = zarr.open_array(os.path.join(store_path, "explanations/lrp/relevance"), mode="r")
    step = array.shards[0]
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        nbytes = sum(pool.map(lambda s: array[s:s + step].nbytes, range(0, array.shape[0], step)))
    return {"seconds": time.perf_counter() - start, "bytes": nbytes}


def measure_shard_read(store_path: str, workers: int) -> dict:
    """The aggregation's own read path alone (pipeline/store.py ShardReader), the same threads, no statistics."""
    from pipeline.store import open_store

    reader = open_store(store_path).group("lrp").shard_reader("relevance")
    step = reader.rows_per_shard
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        nbytes = sum(pool.map(lambda s: reader[s:s + step].nbytes, range(0, reader.shape[0], step)))
    return {"seconds": time.perf_counter() - start, "bytes": nbytes}


def measure_aggregate(store_path: str, out: str, workers: int, single_pass: bool = False) -> dict:
    """The whole job; ``single_pass``: with a spot threshold no spot meets, so no class is re-read."""
    from aggregations.bias import BiasSettings
    from aggregations.run import aggregate

    settings = BiasSettings(min_spot_share=2.0) if single_pass else BiasSettings()
    start = time.perf_counter()
    result = aggregate(store_path, out, num_workers=workers, settings=settings)
    seconds = time.perf_counter() - start
    flagged = [(row["class"], row["flag"]) for row in result.classes.to_pylist() if row["flagged"]]
    return {"seconds": seconds, "flagged": flagged, "summary": result.summary["groups"]["lrp"],
            "phases": {**result.seconds["lrp"], "write": result.seconds["write"]}}


def child(kind: str, store_path: str, out: str, workers: int, budget_gb: float = 0.0) -> dict:
    """Run one measurement in a fresh interpreter; its peak RSS comes back with it."""
    call = {"read": f"measure_read({store_path!r}, {workers})",
            "read_batched": f"measure_read({store_path!r}, {workers}, {ROWS_PER_SHARD})",
            "shard_read": f"measure_shard_read({store_path!r}, {workers})",
            "aggregate": f"measure_aggregate({store_path!r}, {out!r}, {workers})",
            "single": f"measure_aggregate({store_path!r}, {out!r}, {workers}, single_pass=True)",
            "groups": f"measure_groups({store_path!r}, {out!r}, {workers}, {budget_gb!r})"}[kind]
    code = (f"import sys, json, resource; sys.path.insert(0, {str(REPO)!r}); "
            f"from benchmarks.bench_aggregate import *; r = {call}; "
            f"u = resource.getrusage(resource.RUSAGE_SELF); r['peak_rss_mb'] = u.ru_maxrss / 1024; "
            f"r['cpu_s'] = u.ru_utime + u.ru_stime; print(json.dumps(r))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        raise RuntimeError(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", default="2.1",
                        help="relevance bytes to build, in GB; comma-separated sizes run one after another, each store "
                             "built, measured and deleted before the next (default 2.1; e.g. 2.1,20)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="threads for all (default: CPUs)")
    parser.add_argument("--repeat", type=int, default=2, help="measurements of each, the best is reported")
    parser.add_argument("--keep", help="build the store here and keep it (default: a temp dir, removed; one size only)")
    parser.add_argument("--tmp", help="folder for the temp stores (default: the system's temp dir)")
    parser.add_argument("--groups", action="store_true", help="memory against the number of groups (see above)")
    parser.add_argument("--classes", type=int, default=1000, help="--groups: classes (default 1000)")
    parser.add_argument("--per-class", type=int, default=30, help="--groups: rows per class (default 30)")
    parser.add_argument("--wrong", type=int, default=10, help="--groups: mispredicted rows per class (default 10)")
    parser.add_argument("--size", type=int, default=64, help="--groups: map height and width (default 64)")
    parser.add_argument("--budgets", default="0,0.5,0.25,0.125", help="--groups: GiB, comma-separated (0: no bound)")
    args = parser.parse_args()
    if args.groups:
        return main_groups(args)
    for gb in (float(g) for g in args.gb.split(",")):
        run_size(args, gb)
    return 0


NAMES = {"read": "zarr read (default config)", "read_batched": "zarr read (batch_size=S)",
         "shard_read": "ShardReader read alone", "aggregate": "aggregate (everything)",
         "single": "aggregate, one pass only"}


def run_size(args, gb: float) -> None:
    """Build a store of ``gb`` GB, measure every kind of ``NAMES`` in turn (``--repeat`` rounds), print, delete."""
    n_rows = int(np.ceil(gb * 1e9 / (SIZE * SIZE * 4)))
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-aggregate-", dir=args.tmp))
    store_path = root / "bench.zarr"
    try:
        if not store_path.exists():
            start = time.perf_counter()
            build(store_path, n_rows)
            print(f"built {n_rows} rows ({n_rows * SIZE * SIZE * 4 / 1e9:.2f} GB of relevance) in "
                  f"{time.perf_counter() - start:.0f}s", flush=True)
        disk = sum(f.stat().st_size for f in (store_path / "explanations/lrp/relevance").rglob("*") if f.is_file())
        runs = {kind: [] for kind in NAMES}
        for _ in range(args.repeat):  # interleaved, so all see the same page cache and machine load
            for kind in runs:
                runs[kind].append(child(kind, str(store_path), str(root / "out"), args.workers))
        best = {kind: min(results, key=lambda r: r["seconds"]) for kind, results in runs.items()}
        baseline = min(best["read"]["seconds"], best["read_batched"]["seconds"])  # the better zarr read
        gb_read = best["read"]["bytes"] / 1e9
        print(f"\nstore: {n_rows} rows x {SIZE}x{SIZE} float32 = {gb_read:.2f} GB of relevance, {disk / 1e9:.2f} GB on "
              f"disk (zstd), shards of {ROWS_PER_SHARD} rows; {args.workers} worker threads; best of {args.repeat}")
        print(f"{'measurement':<30}{'GB/s':>8}{'seconds':>10}{'vs zarr read':>14}{'peak RSS MB':>13}{'CPU s':>8}")
        for kind, name in NAMES.items():
            seconds = best[kind]["seconds"]
            rss = max(r["peak_rss_mb"] for r in runs[kind])
            print(f"{name:<30}{gb_read / seconds:>8.3f}{seconds:>10.2f}{baseline / seconds:>14.0%}{rss:>13.0f}"
                  f"{best[kind]['cpu_s']:>8.1f}")
        floor = best["shard_read"]["seconds"]
        print(f"aggregate against the ShardReader read alone: {floor / best['aggregate']['seconds']:.0%} "
              f"(one pass only: {floor / best['single']['seconds']:.0%})")
        phases = best["aggregate"]["phases"]
        print("aggregate phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items() if k != "passes")
              + f"; passes {phases.get('passes', 1)}")
        print(f"flagged: {best['aggregate']['flagged']} (planted: class 3 cue); rows re-read for the spot check: "
              f"{best['aggregate']['summary']['spot_checked_rows']} of {n_rows}; one pass only flags "
              f"{best['single']['flagged']}")
        print("targets: aggregation >= 85% of the (better) zarr read speed, peak RSS < 2048 MB\n", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def main_groups(args) -> int:
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-groups-"))
    store_path = root / "groups.zarr"
    try:
        if not store_path.exists():
            start = time.perf_counter()
            build_groups(store_path, args.classes, args.per_class, args.wrong, args.size)
            print(f"built {args.classes * args.per_class} rows of {args.size}x{args.size} "
                  f"in {time.perf_counter() - start:.0f}s")
        map_mb = args.size * args.size * 8 / 2**20
        print(f"\n{args.classes} classes x {args.per_class} rows, {args.wrong} mispredicted per class, "
              f"{args.size}x{args.size} maps ({map_mb * 1024:.0f} kB per float64 map); {args.workers} worker threads")
        print(f"{'budget GiB':>10}{'groups':>8}{'passes':>8}{'seconds':>9}{'estimate MB':>13}{'peak RSS MB':>13}")
        for budget in (float(b) for b in args.budgets.split(",")):
            r = child("groups", str(store_path), str(root / "out"), args.workers, budget)
            print(f"{budget or 'none':>10}{r['groups']:>8}{r['passes']:>8}{r['seconds']:>9.1f}{r['estimate_mb']:>13.0f}"
                  f"{r['peak_rss_mb']:>13.0f}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

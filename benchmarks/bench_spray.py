"""SpRAy at dataset scale: ``lrp-audit spray`` against CoRelAy's SpRAy pipeline run class by class, same maps.

Builds a store of ``--rows`` (default 100,000) 64x64 relevance-like maps in a temp dir: classes of three sizes
(``--sizes``, default 250, 1000 and 4000 rows; each size takes a third of the rows), stored class after class.
Every class has an object blob at its own place; two classes in three also carry a planted second strategy
(a stamp at a class-specific place on 20-50% of its rows). Then, each in a fresh subprocess so peak RSS is
its own, per class size (``--classes`` of that size only) and for the whole store:

* ours: ``aggregations.spray.spray`` (the whole ``lrp-audit spray``: the store pass, per-class SpRAy on
  ``--workers`` threads, the outputs written), with ``--embedding`` (default here: none; lrp-audit's own
  default is tsne, and ``--embedding tsne`` adds CoRelAy's TSNEEmbedding to its side);
* corelay: per class, its rows read through ``pipeline.store``, pooled and normalised with the same
  functions (the same preprocessed maps), then CoRelAy 1.0's ``SpectralClustering`` pipeline (SciPyPDist ->
  SparseKNN(10, symmetric) -> SymmetricNormalLaplacian -> EigenDecomposition(32, 'LA') -> KMeans on the K
  smallest eigenvectors, rows unit length), K taken from our eigengap (CoRelAy computes none), one class
  after the other as its examples do.

Printed: seconds, rows per second, the ratio, peak RSS, and the agreement of the partitions (mean adjusted
Rand index between our clusters and CoRelAy's over the classes; the share of classes with ARI 1).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_spray.py [--rows 100000] [--sizes 250 1000 4000]
        [--workers 2] [--keep DIR] [--embedding none|tsne] [--only-all]
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
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZE, ROWS_PER_SHARD, SEED = 64, 500, 0


def plan(rows: int, sizes: list[int]) -> np.ndarray:
    """The target of every row: a share of at least ``rows / len(sizes)`` in classes of each size, class after
    class (so there are at least ``rows`` rows)."""
    per_size = -(-rows // len(sizes))
    targets, c = [], 0
    for size in sizes:
        for _ in range(-(-per_size // size)):
            targets.append(np.full(size, c))
            c += 1
    return np.concatenate(targets)


def build(path: Path, target: np.ndarray) -> None:
    """One object blob per class, noise, a random score; a stamp on 20-50% of the rows of 2 classes in 3."""
    from pipeline.store import RelevanceStore

    rng = np.random.default_rng(SEED)
    n_classes = int(target.max()) + 1
    objects = rng.integers(8, SIZE - 24, (n_classes, 2))
    stamps = rng.integers(0, SIZE - 8, (n_classes, 2))
    stamp_rate = np.where(np.arange(n_classes) % 3 == 2, 0.0, rng.uniform(0.2, 0.5, n_classes))
    store = RelevanceStore.create(str(path), config={"benchmark": "spray"}, class_names=[f"c{i}" for i in
                                  range(n_classes)], groups=["lrp"], n_rows=len(target), height=SIZE, width=SIZE,
                                  rows_per_shard=ROWS_PER_SHARD)
    for start in range(0, len(target), ROWS_PER_SHARD):
        t = target[start:start + ROWS_PER_SHARD]
        maps = rng.normal(0, 0.02, (len(t), SIZE, SIZE)).astype(np.float32)
        stamped = rng.random(len(t)) < stamp_rate[t]
        for i, c in enumerate(t):
            if stamped[i]:
                y, x = stamps[c]
                maps[i, y:y + 8, x:x + 8] += 3.0
            else:
                y, x = objects[c]
                maps[i, y:y + 16, x:x + 16] += 1.0
        maps *= rng.uniform(0.5, 2.0, (len(t), 1, 1)).astype(np.float32)
        store.group("lrp").write_block(start, relevance=maps, target=t, label=t, prediction=t,
                                       sample_id=np.arange(start, start + len(t)),
                                       path=np.array([f"{i}.png" for i in range(start, start + len(t))]))


def run_ours(store: str, classes: list[int], workers: int, out: str, embedding: str) -> dict:
    from aggregations.spray import RunOptions, SpraySettings, spray

    clock = time.perf_counter()
    result = spray(store, out, classes=classes, settings=SpraySettings(embedding=embedding),
                   options=RunOptions(num_workers=workers, progress=False))
    seconds = time.perf_counter() - clock
    table = result.assignments
    labels = {int(c): table["cluster"].to_numpy()[table["target"].to_numpy() == c].tolist() for c in classes}
    ks = {int(r["target"]): int(r["n_clusters"]) for r in result.classes.to_pylist()}
    return {"seconds": seconds, "labels": labels, "k": ks, "rows": len(table),
            "phases": {k: round(v, 2) for k, v in result.seconds["lrp"].items()}}


def run_corelay(store_url: str, classes: list[int], ks: dict, embedding: str) -> dict:
    """CoRelAy's SpRAy, class by class, as its examples run it (one machine, one class after the other); with
    ``embedding`` tsne also CoRelAy's ``TSNEEmbedding`` of the same maps (scikit-learn's t-SNE, as in its
    examples), the 2-D picture ours computes by default."""
    from corelay.pipeline.spectral import SpectralClustering
    from corelay.processor.clustering import KMeans
    from corelay.processor.embedding import EigenDecomposition, TSNEEmbedding

    from aggregations.spray import preprocess
    from pipeline.store import STATUS_OK, open_store

    def smallest(k):
        def select(output):  # eigsh's order: the K smallest Laplacian eigenvalues are the last K columns
            vectors = output[1][:, -k:]
            return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-300)
        return select

    group = open_store(store_url).group("lrp")
    target, status = group.read("target"), group.read("status")
    clock, reading, labels = time.perf_counter(), 0.0, {}
    for c in classes:
        start = time.perf_counter()
        rows = np.flatnonzero((target == c) & (status == STATUS_OK))
        maps = group.read("relevance", int(rows[0]), int(rows[-1]) + 1)  # a class's rows are contiguous
        pooled = preprocess.sum_pool(maps, 32).reshape(len(rows), -1)
        features = preprocess.normalise(pooled, "positive").astype(np.float64)
        reading += time.perf_counter() - start
        k = ks[c]
        pipeline = SpectralClustering(embedding=EigenDecomposition(n_eigval=32, which="LA", normalize=False),
                                      select_eigenvector=smallest(k),
                                      clustering=KMeans(n_clusters=k, kwargs={"n_init": 10, "random_state": 0}))
        labels[c] = np.asarray(pipeline(features)).tolist()  # the pipeline returns the labels
        if embedding == "tsne":
            TSNEEmbedding(n_components=2, kwargs={"random_state": 0})(features)
    return {"seconds": time.perf_counter() - clock, "read_seconds": reading, "labels": labels,
            "rows": sum(len(v) for v in labels.values())}


def child(args) -> None:
    import resource

    classes = json.loads(args.child_classes)
    if args.child == "ours":
        result = run_ours(args.store, classes, args.workers, args.out, args.embedding)
    else:
        ks = {int(k): v for k, v in json.loads(args.child_k).items()}
        result = run_corelay(args.store, classes, ks, args.embedding)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("RESULT " + json.dumps(result))


def spawn(kind: str, store: str, classes: list[int], args, ks: dict | None = None) -> dict:
    """Many locals, few parameters: ``args`` carries the run's options (workers, out, embedding)."""
    workers = args.workers if kind == "ours" else 1
    command = [sys.executable, __file__, "--child", kind, "--store", store, "--out", args.out or "", "--workers",
               str(workers), "--embedding", args.embedding, "--child-classes", json.dumps(classes),
               "--child-k", json.dumps(ks or {})]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode or not line:
        raise RuntimeError(f"{kind} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(line[-1][len("RESULT "):])


def agreement(ours: dict, theirs: dict) -> tuple[float, float]:
    from sklearn.metrics import adjusted_rand_score

    scores = [adjusted_rand_score(ours["labels"][c], theirs["labels"][c]) for c in ours["labels"]]
    return float(np.mean(scores)), float(np.mean(np.isclose(scores, 1.0)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 1000, 4000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--keep", help="build the store here and keep it (default: a temp dir, removed)")
    parser.add_argument("--embedding", default="none", choices=["none", "tsne"],
                        help="ours: the 2-D embedding (lrp-audit's default is tsne); with tsne CoRelAy's side also "
                             "runs its TSNEEmbedding")
    parser.add_argument("--only-all", action="store_true", help="just the all-classes run, not one per size")
    parser.add_argument("--child"), parser.add_argument("--store"), parser.add_argument("--out")
    parser.add_argument("--child-classes"), parser.add_argument("--child-k")
    args = parser.parse_args()
    if args.child:
        return child(args)
    root = Path(args.keep or tempfile.mkdtemp(prefix="bench-spray-"))
    args.out = str(root / "out")
    store = root / "spray.zarr"
    target = plan(args.rows, args.sizes)
    if not store.exists():
        clock = time.perf_counter()
        build(store, target)
        print(f"built {len(target)} rows of {SIZE}x{SIZE} ({int(target.max()) + 1} classes) in "
              f"{time.perf_counter() - clock:.0f} s at {store}", flush=True)
    sizes = np.bincount(target)
    runs = [] if args.only_all else [(f"{s} rows/class", [int(c) for c in np.flatnonzero(sizes == s)])
                                     for s in args.sizes]
    runs.append(("all classes", [int(c) for c in range(len(sizes))]))
    print("| classes | rows | ours s | ours rows/s | ours peak RSS GB | CoRelAy s (of which read) "
          "| CoRelAy rows/s | CoRelAy peak RSS GB | speed-up | mean ARI | classes with ARI 1 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, classes in runs:
        ours = spawn("ours", str(store), classes, args)
        theirs = spawn("corelay", str(store), classes, args, ours["k"])
        ari, exact = agreement(ours, theirs)
        print(f"| {name} ({len(classes)}) | {ours['rows']} | {ours['seconds']:.1f} | "
              f"{ours['rows'] / ours['seconds']:.0f} | {ours['peak_rss_gb']:.2f} | {theirs['seconds']:.1f} "
              f"({theirs['read_seconds']:.1f}) | {theirs['rows'] / theirs['seconds']:.0f} | "
              f"{theirs['peak_rss_gb']:.2f} | {theirs['seconds'] / ours['seconds']:.2f}x | {ari:.3f} | "
              f"{exact:.0%} |", flush=True)
        print(f"    ours phases: {ours['phases']}", file=sys.stderr, flush=True)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Relevance stores built from constructed arrays for the aggregation tests, and a check that tables are equal."""
from __future__ import annotations

import numpy as np

from pipeline.store import RelevanceStore


def make_store(path, relevance, *, target, label=None, prediction=None, output=None, status=None, boxes=None,
               class_names=None, rows_per_shard=4, group="lrp", mask=None, paths=None):
    """Write ``relevance`` (N, H, W) and per-row metadata into a fresh store at ``path``; returns the URL."""
    relevance = np.asarray(relevance, np.float32)
    n, height, width = relevance.shape
    target = np.asarray(target, np.int64)
    arrays = {
        "target": target,
        "label": target if label is None else np.asarray(label, np.int64),
        "prediction": target if prediction is None else np.asarray(prediction, np.int64),
        "output": relevance.sum(axis=(1, 2), dtype=np.float64) if output is None else np.asarray(output, np.float64),
        "sample_id": np.arange(n),
        "path": np.array([f"img{i:03d}.png" for i in range(n)] if paths is None else [str(p) for p in paths]),
    }
    if boxes is not None:
        arrays["boxes"] = np.asarray(boxes, np.float32).reshape(n, -1, 4)
    if mask is not None:
        arrays["mask"] = np.asarray(mask, bool)
    names = class_names or [f"class{c}" for c in range(int(target.max()) + 1)]
    groups = [group] if isinstance(group, str) else list(group)  # several: the same rows in each, in this order
    store = RelevanceStore.create(
        str(path), config={"test": True}, class_names=names, groups=groups, n_rows=n, height=height, width=width,
        rows_per_shard=rows_per_shard, max_boxes=0 if boxes is None else arrays["boxes"].shape[1],
        with_mask=mask is not None,
    )
    status = np.ones(n, np.int8) if status is None else np.asarray(status, np.int8)
    for g in map(store.group, groups):
        for start in range(0, n, rows_per_shard):
            stop = min(start + rows_per_shard, n)
            g.write_block(start, relevance=relevance[start:stop], status=status[start:stop],
                          **{k: v[start:stop] for k, v in arrays.items()})
    return str(path)


def assert_tables_equal(a, b):
    """Tables equal value for value, NaN equal to NaN (Arrow's ``equals`` says NaN != NaN)."""
    assert a.schema == b.schema
    for name in a.column_names:
        left, right = a[name].to_pylist(), b[name].to_pylist()
        assert len(left) == len(right), name
        for x, y in zip(left, right):
            if isinstance(x, (float, list)):
                floats = isinstance(x, float) or all(isinstance(v, float) for v in x)
                np.testing.assert_array_equal(np.asarray(x, dtype=float if floats else object), np.asarray(y),
                                              err_msg=name)
            else:
                assert x == y, (name, x, y)


#: the run config the layout tests' stores are made with
STORE_CONFIG = {"model": {"name": "tiny"}, "settings": [{"composite": "epsilon", "epsilon": 0.01}]}


def example_store(url, **overrides):
    """An empty store of 10 rows in shards of 4 with every optional array (boxes, mask, labels): the layout tests'."""
    kwargs = dict(config=STORE_CONFIG, class_names=["cat", "dog", "car"], groups={"eps": {"composite": "epsilon"}},
                  n_rows=10, height=4, width=5, rows_per_shard=4, max_boxes=2, with_mask=True, num_labels=3)
    kwargs.update(overrides)
    return RelevanceStore.create(url, **kwargs)


def shard_block(store, shard, seed=0):
    """(start, arrays) of one whole shard of random rows for ``write_block``, different per shard and seed."""
    start, stop = store.shard_rows(shard)
    n = stop - start
    rng = np.random.default_rng(seed + shard)
    return start, dict(
        relevance=rng.normal(size=(n, store.height, store.width)).astype(np.float32),
        output=rng.normal(size=n), target=np.arange(start, stop) % 3, label=np.arange(start, stop) % 3,
        prediction=np.zeros(n, int), sample_id=np.arange(start, stop),
        path=[f"img/{i}.png" for i in range(start, stop)], error=[""] * n,
    )

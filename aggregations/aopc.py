"""AOPC: the area over the perturbation curve, per method, with confidence intervals.

Samek et al. (2015) score an ordering of regions by how fast perturbing them in that order lowers f:

    AOPC = 1/(L+1) * < sum_{k=0..L} f(x^(0)) - f(x^(k)) >        (< . >: mean over images)

Higher is better; a random ordering is the reference. Every method was run on the same images with the
same noise (pipeline/perturbation.py), so ``AOPC(method) - AOPC(random)`` is computed per image (paired):
its interval is what says whether a method beats random.

Reads ``<out>/curves/shard-*.parquet`` written by ``lrp-audit evaluate`` and writes beside them:

    <out>/aopc.parquet          one row per method: n, AOPC, CI, paired difference to random with CI
    <out>/aopc_curves.parquet   one row per (method, step k): mean f(x^(k)), mean decline with a 95% band,
                                AOPC of the first k steps

The report's figure and table of these numbers are in aggregations/report/evaluation.py.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.paths import beside, join_url

REFERENCE = "random"
CI_METHODS = ("bootstrap", "t")
TABLE, CURVES, CURVES_DIR, SETTINGS = "aopc.parquet", "aopc_curves.parquet", "curves", "evaluation.json"


def aopc_per_row(curves: np.ndarray) -> np.ndarray:
    """(n, L+1) curves f(x^(k)) -> (n,) AOPC of each image: mean over k of f(x^(0)) - f(x^(k))."""
    curves = np.asarray(curves, np.float64)
    return (curves[:, :1] - curves).mean(axis=1)


# ---- confidence intervals ------------------------------------------------------------------------------------
def _beta_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 1000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return result


def _incomplete_beta(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, 1.0 - x) / b


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t distribution (no scipy): bisection on its CDF, an incomplete beta function."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    tail = 1.0 - p  # P(T > t) = I_{df/(df+t^2)}(df/2, 1/2) / 2
    low, high = 0.0, 1.0
    while _incomplete_beta(df / 2, 0.5, df / (df + high * high)) / 2 > tail:
        high *= 2.0
    for _ in range(200):
        middle = (low + high) / 2
        if _incomplete_beta(df / 2, 0.5, df / (df + middle * middle)) / 2 > tail:
            low = middle
        else:
            high = middle
        if high - low < 1e-12 * max(1.0, high):
            break
    return (low + high) / 2


def mean_interval(values: np.ndarray, ci: str = "bootstrap", level: float = 0.95, resamples: int = 2000,
                  seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): a percentile bootstrap (seeded) or a t interval; NaN bounds with fewer than 2 values."""
    values = np.asarray(values, np.float64)
    n = values.size
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = float(values.mean())
    if n < 2:
        return mean, math.nan, math.nan
    if ci == "t":
        half = t_quantile((1 + level) / 2, n - 1) * float(values.std(ddof=1)) / math.sqrt(n)
        return mean, mean - half, mean + half
    if ci != "bootstrap":
        raise ValueError(f"confidence interval {ci!r} unknown: use one of {', '.join(CI_METHODS)}")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, (1 << 22) // n)  # resample in blocks: memory stays flat for any n
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        means[start:start + size] = values[rng.integers(0, n, size=(size, n))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return mean, float(low), float(high)


# ---- the summary ---------------------------------------------------------------------------------------------
@dataclass
class AopcResult:
    """Per-method AOPC (``table``), mean curves (``curves``) and the settings of the evaluation."""

    table: pa.Table
    curves: pa.Table
    settings: dict = field(default_factory=dict)

    def aopc(self, method: str) -> float:
        rows = self.table.filter(pc.equal(self.table["method"], method))
        if not rows.num_rows:
            raise KeyError(f"no method {method!r}; methods: {self.table['method'].to_pylist()}")
        return float(rows["aopc"][0].as_py())

    def format(self) -> str:
        """The AOPC table as text, best method first."""
        levels = sorted(set(self.table["level"].to_pylist())) if self.table.num_rows else [0.95]
        interval = f"{levels[0] * 100:g}% CI" if len(levels) == 1 else "CI"
        lines = [f"{'method':<28} {'n':>6} {'AOPC':>10} {interval:>22} {'minus random':>13} {interval:>22}"]
        for r in self.table.to_pylist():
            ci = f"[{r['ci_low']:.4g}, {r['ci_high']:.4g}]"
            diff = f"[{r['vs_random_low']:.4g}, {r['vs_random_high']:.4g}]" if r["method"] != REFERENCE else ""
            lines.append(f"{r['method']:<28} {r['n']:>6} {r['aopc']:>10.4g} {ci:>22} "
                         f"{r['vs_random'] if r['method'] != REFERENCE else 0.0:>13.4g} {diff:>22}")
        return "\n".join(lines)


TABLE_SCHEMA = pa.schema([
    ("method", pa.string()), ("setting", pa.string()), ("n", pa.int64()), ("excluded", pa.int64()),
    ("aopc", pa.float64()), ("ci_low", pa.float64()), ("ci_high", pa.float64()),
    ("vs_random", pa.float64()), ("vs_random_low", pa.float64()), ("vs_random_high", pa.float64()),
    ("ci", pa.string()), ("level", pa.float64()),
])
CURVES_SCHEMA = pa.schema([
    ("method", pa.string()), ("step", pa.int64()), ("n", pa.int64()), ("mean_f", pa.float64()),
    ("mean_decline", pa.float64()), ("decline_low", pa.float64()), ("decline_high", pa.float64()),
    ("aopc_at_step", pa.float64()),
])


def _ok_curves(table: pa.Table, method: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(rows, curves (n, L+1)) of a method's ok rows, and how many of its rows were excluded."""
    mine = table.filter(pc.equal(table["method"], method))
    ok = mine.filter(pc.equal(mine["status"], "ok"))
    if ok.num_rows == 0:
        return np.zeros(0, np.int64), np.zeros((0, 0)), mine.num_rows
    curves = np.asarray(ok["curve"].to_pylist(), np.float64)
    finite = np.isfinite(curves).all(axis=1)
    return ok["row"].to_numpy()[finite], curves[finite], mine.num_rows - int(finite.sum())


def summarize(curves: pa.Table, *, ci: str = "bootstrap", level: float = 0.95, resamples: int = 2000, seed: int = 0,
              settings: dict | None = None) -> AopcResult:
    """AOPC per method from a curves table (columns row, method, status, curve); rows not ``ok`` are excluded
    and counted. Sorted by AOPC, best first. ``settings['methods']`` (name -> setting) labels the table."""
    if ci not in CI_METHODS:
        raise ValueError(f"confidence interval {ci!r} unknown: use one of {', '.join(CI_METHODS)}")
    settings = dict(settings or {})
    described = settings.get("methods", {})
    methods = list(dict.fromkeys(curves["method"].to_pylist()))
    data = {m: _ok_curves(curves, m) for m in methods}
    per_row = {m: (rows, aopc_per_row(c) if c.size else np.zeros(0)) for m, (rows, c, _) in data.items()}
    reference = per_row.get(REFERENCE)
    records, curve_rows = [], []
    for m in methods:
        rows, values = per_row[m]
        mean, low, high = mean_interval(values, ci, level, resamples, seed)
        diff = (math.nan,) * 3
        if reference is not None:
            common, mine, theirs = np.intersect1d(rows, reference[0], return_indices=True)
            diff = mean_interval(values[mine] - reference[1][theirs], ci, level, resamples, seed)
        records.append(dict(method=m, setting=json.dumps(described.get(m, {"method": m}), sort_keys=True),
                            n=int(values.size), excluded=int(data[m][2]), aopc=mean, ci_low=low, ci_high=high,
                            vs_random=diff[0], vs_random_low=diff[1], vs_random_high=diff[2], ci=ci, level=level))
        c = data[m][1]
        if c.size:
            decline = c[:, :1] - c
            spread = decline.std(axis=0, ddof=1) / math.sqrt(len(c)) if len(c) > 1 else np.full(c.shape[1], np.nan)
            z = t_quantile((1 + level) / 2, len(c) - 1) if len(c) > 1 else math.nan
            mean_decline = decline.mean(axis=0)
            running = np.cumsum(mean_decline) / np.arange(1, c.shape[1] + 1)
            for k in range(c.shape[1]):
                curve_rows.append(dict(method=m, step=k, n=len(c), mean_f=float(c[:, k].mean()),
                                       mean_decline=float(mean_decline[k]),
                                       decline_low=float(mean_decline[k] - z * spread[k]),
                                       decline_high=float(mean_decline[k] + z * spread[k]),
                                       aopc_at_step=float(running[k])))
    records.sort(key=lambda r: -r["aopc"] if np.isfinite(r["aopc"]) else math.inf)
    return AopcResult(pa.Table.from_pylist(records, schema=TABLE_SCHEMA),
                      pa.Table.from_pylist(curve_rows, schema=CURVES_SCHEMA), settings)


# ---- files -----------------------------------------------------------------------------------------------------
def read_curves(out_dir: str, storage_options: dict | None = None) -> pa.Table:
    """Every shard of ``<out>/curves`` as one table (finished shards only; a run in progress reads partially)."""
    fs, root = fsspec.core.url_to_fs(join_url(out_dir, CURVES_DIR), **dict(storage_options or {}))
    files = sorted(fs.glob(join_url(root, "shard-*.parquet")))
    if not files:
        raise FileNotFoundError(f"no perturbation curves under {join_url(out_dir, CURVES_DIR)!r}: "
                                "run 'lrp-audit evaluate'")
    tables = []
    for path in files:
        with fs.open(path, "rb") as handle:
            tables.append(pq.read_table(handle))
    return pa.concat_tables(tables)


def read_settings(out_dir: str, storage_options: dict | None = None) -> dict:
    try:
        with fsspec.open(join_url(out_dir, SETTINGS), "rt", **dict(storage_options or {})) as handle:
            return json.load(handle)
    except FileNotFoundError:
        return {}


def aggregate_evaluation(out_dir: str, *, ci: str = "bootstrap", level: float = 0.95, resamples: int = 2000,
                         seed: int = 0, storage_options: dict | None = None, write: bool = True) -> AopcResult:
    """Summarize an evaluation directory and (``write``) store ``aopc.parquet`` and ``aopc_curves.parquet`` in it.

    Many parameters because: the keywords are :func:`summarize`'s and the storage options, passed through.
    """
    stored = read_settings(out_dir, storage_options)
    settings = {"methods": stored.get("config", {}).get("explanations", {}),
                "perturbation": stored.get("config", {}).get("perturbation", {}),
                "rows": stored.get("rows"), "dataset": stored.get("config", {}).get("dataset", {})}
    result = summarize(read_curves(out_dir, storage_options), ci=ci, level=level, resamples=resamples, seed=seed,
                       settings=settings)
    if not write:
        return result
    metadata = {b"lrp_audit_aopc": json.dumps(settings, sort_keys=True, default=str).encode()}
    for name, table in ((TABLE, result.table), (CURVES, result.curves)):
        with fsspec.open(join_url(out_dir, name), "wb", **dict(storage_options or {})) as handle:
            pq.write_table(table.replace_schema_metadata(metadata), handle)
    return result


def load(out_dir: str, storage_options: dict | None = None) -> AopcResult | None:
    """The written summary of an evaluation directory, or None when there is none."""
    try:
        with fsspec.open(join_url(out_dir, TABLE), "rb", **dict(storage_options or {})) as handle:
            table = pq.read_table(handle)
        with fsspec.open(join_url(out_dir, CURVES), "rb", **dict(storage_options or {})) as handle:
            curves = pq.read_table(handle)
    except FileNotFoundError:
        return None
    settings = json.loads((table.schema.metadata or {}).get(b"lrp_audit_aopc", b"{}"))
    return AopcResult(table.replace_schema_metadata(None), curves.replace_schema_metadata(None), settings)


def default_evaluation_dir(store_url: str) -> str:
    """``runs/name.zarr`` -> ``runs/name.evaluation``: where the report looks for an evaluation of that run."""
    return beside(store_url, ".evaluation")

"""Region-perturbation evaluation on the Ray actor pool: explain with every method, perturb, re-evaluate.

Same dataset index, targets, preprocessing and model loading as ``lrp-audit explain`` (one YAML serves
both); the work unit is a shard of rows. An actor loads the model once, decodes a shard's images, explains
each batch with every method (LRP composites and the gradient / gradient x input / deconvnet baselines, all
through :class:`lrp.Explainer`), and runs :class:`~pipeline.perturbation.RegionPerturbation` on it: the
B x M x L perturbed images go through the model in large batched forwards on the actor's device.

Output (a local path or fsspec URL)::

    <out>/evaluation.json                 the config identity (a rerun must match it), rows, software
    <out>/curves/shard-000000.parquet     one row per (image row, method): f(x^(k)) for k = 0..L

Each shard is written by its actor in one piece (a temporary name, then a rename), so a shard file exists
only when complete; a rerun computes only the missing shards. ``aggregations.aopc`` summarizes the curves.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .actors import claim_cpus
from .batches import Sample, ShardReader
from .config_types import check_types, paths_as_text
from .config import EVALUATION_ROWS_PER_SHARD, ConfigError, ExplanationSetting, RunConfig, config_from_dict
from .datasets import read_image
from .dispatch import Part, ShardPool
from .models import build_model
from .paths import join_url as _join
from .paths import path_problem
from .perturbation import DEFAULT_REDUCTION, RANDOM, REDUCTIONS, PerturbationSpec, RegionPerturbation, score_map
from .preprocess import Preprocess, PreprocessSpec
from .run import RunPlan, as_recorded, plan_run, software_versions
from .secrets import redact
from .store import canonical_json, config_differences

#: Methods evaluated when none are given: LRP composites and the three baselines of Samek et al. (2015) / Binder
#: et al. (2016, sec. 3). ``random`` (the reference ordering) is always added.
DEFAULT_METHODS = ("epsilon_plus", "epsilon_alpha2_beta1", "epsilon_gamma_box", "gradient", "gradient_x_input",
                   "deconvnet")
DEFAULT_ROWS_PER_SHARD = EVALUATION_ROWS_PER_SHARD
SETTINGS_FILE = "evaluation.json"
CURVES_DIR = "curves"

CURVE_SCHEMA = pa.schema([
    ("row", pa.int64()),          # the row of the explain run (same dataset, targets): joins with its store
    ("sample_id", pa.int64()),
    ("path", pa.string()),
    ("target", pa.int64()),
    ("label", pa.int64()),
    ("prediction", pa.int64()),
    ("method", pa.string()),
    ("status", pa.string()),      # ok, failed (image unreadable), nonfinite (NaN/Inf scores or outputs)
    ("error", pa.string()),
    ("curve", pa.list_(pa.float64())),  # f(x^(k)), k = 0..L; empty unless ok
])


@dataclass
class EvaluationConfig:
    """An evaluation run: ``run`` holds what explain also uses (dataset, model, preprocess, targets, methods as
    ``explanations``, cluster options); ``reductions`` overrides how a method's channels become pixel scores."""

    run: RunConfig
    out: str
    perturbation: PerturbationSpec = field(default_factory=PerturbationSpec)
    sample_size: int | None = None
    reductions: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.sample_size is not None and int(self.sample_size) < 1:
            raise ConfigError(f"sample_size must be at least 1 (or unset for every row), got {self.sample_size}")
        names = [s.name for s in self.run.explanations]
        if RANDOM in names:
            raise ConfigError("'random' is always evaluated as the reference: leave it out of the methods")
        for name, reduction in self.reductions.items():
            if name not in names:
                raise ConfigError(f"reductions names method {name!r}, which is not evaluated ({', '.join(names)})")
            if reduction not in REDUCTIONS:
                raise ConfigError(f"reduction {reduction!r} of {name!r} unknown: use one of {', '.join(REDUCTIONS)}")

    def reduction(self, setting: ExplanationSetting) -> str:
        return self.reductions.get(setting.name, DEFAULT_REDUCTION.get(setting.composite, "sum"))

    def identity(self, plan: RunPlan) -> dict[str, Any]:
        """What defines the results (not how fast they are computed): a rerun must match it to resume."""
        return plan.store_config | {
            "perturbation": self.perturbation.to_dict(), "sample_size": self.sample_size,
            "reductions": {s.name: self.reduction(s) for s in self.run.explanations},
            "rows_per_shard": self.run.rows_per_shard,
        }


def input_range(preprocess: PreprocessSpec) -> tuple[list[float], list[float]]:
    """Per-channel (low, high) of model inputs: pixels in [0, 1], then normalized by mean and std."""
    return ([(0.0 - m) / s for m, s in zip(preprocess.mean, preprocess.std)],
            [(1.0 - m) / s for m, s in zip(preprocess.mean, preprocess.std)])


def config_from_values(values: dict[str, Any]) -> EvaluationConfig:
    """An EvaluationConfig from plain values: explain's keys plus an ``evaluation`` mapping (out, region_size,
    steps, perturbation, low, high, value, blur_sigma, score, seed, forward_batch, sample_size, reductions).

    Defaults that differ from explain: targets ``prediction`` (the decision the model made), rows_per_shard 32,
    and :data:`DEFAULT_METHODS`. Missing input bounds (uniform noise, ``epsilon_gamma_box``'s low/high) come
    from the preprocessing: the range of normalized [0, 1] pixels.
    """
    values = paths_as_text(dict(values))
    section = dict(values.pop("evaluation", None) or {})
    out = section.pop("out", None)
    if not out:
        raise ConfigError("the evaluation needs an output path: evaluation.out (or --out)")
    problem = path_problem(str(out), "folder")
    if problem:
        raise ConfigError(f"evaluation.out: {problem}")
    values.setdefault("store", out)  # explain's config requires one; the evaluation never writes a store
    values.setdefault("targets", "prediction")
    values.setdefault("rows_per_shard", DEFAULT_ROWS_PER_SHARD)
    values.setdefault("explanations", list(DEFAULT_METHODS))
    run = config_from_dict(values)
    low, high = input_range(run.preprocess)
    for setting in run.explanations:
        if setting.composite == "epsilon_gamma_box":
            setting.params.setdefault("low", low)
            setting.params.setdefault("high", high)
    sample_size = section.pop("sample_size", None)
    reductions = dict(section.pop("reductions", None) or {})
    if section.get("perturbation", "uniform") == "uniform" and section.get("low") is None:
        section["low"], section["high"] = low, high
    known = [f.name for f in dataclasses.fields(PerturbationSpec)]
    unknown = sorted(set(section) - set(known))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in evaluation; known keys: "
                          f"{sorted(known + ['out', 'sample_size', 'reductions'])}")
    try:
        section = check_types(PerturbationSpec, section)
        check_types(EvaluationConfig, {"sample_size": sample_size})
        spec = PerturbationSpec(**section)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"evaluation: {error}") from None
    return EvaluationConfig(run, str(out), spec, None if sample_size is None else int(sample_size), reductions)


# ---- the actor -------------------------------------------------------------------------------------------------
@dataclass
class EvaluationJob:
    """What every actor needs, resolved once by the driver."""

    config: EvaluationConfig
    target_mode: str  # label, prediction, classes or labels


def shard_path(out: str, shard: int) -> str:
    """Where one shard's curves go (the same under a URL or a filesystem root)."""
    return _join(_join(out, CURVES_DIR), f"shard-{shard:06d}.parquet")


def _filesystem(config: EvaluationConfig):
    """(filesystem, root path) of the output directory."""
    return fsspec.core.url_to_fs(config.out, **dict(config.run.storage_options or {}))


class EvaluateActor:
    """A Ray actor class (wrapped with ``ray.remote`` by the driver); also usable in-process."""

    def __init__(self, job: EvaluationJob):
        self.job = job
        run = job.config.run
        self.device, self.decode_threads = claim_cpus(run.cpus_per_actor)
        self.model = build_model(run.model, self.device)
        import lrp

        self.explainers = {s.name: lrp.Explainer(self.model, s.composite, tf32=run.tf32, autocast=run.autocast,
                                                 **s.params) for s in run.explanations}
        self.reductions = {s.name: job.config.reduction(s) for s in run.explanations}
        self.preprocess = Preprocess(run.preprocess)
        self.perturb = RegionPerturbation(job.config.perturbation)

    def ready(self) -> dict:
        return {"pid": os.getpid(), "device": str(self.device), "threads": torch.get_num_threads()}

    def _load(self, row: dict) -> Sample | str:
        try:
            return Sample(self.preprocess(read_image(row["path"], self.job.config.run.dataset.storage_options))[0])
        except Exception as error:  # missing, corrupt or unreadable: recorded as failed, the run goes on
            return f"{type(error).__name__}: {error}"

    def evaluate_shard(self, shard: int, rows: pa.Table) -> dict:
        """Curves of every row and method of one shard, written as one Parquet file; returns counts."""
        began = time.perf_counter()
        run = self.job.config.run
        meta = rows.to_pydict()
        n = rows.num_rows
        methods = [*self.explainers, RANDOM]
        target = np.asarray(meta["target"], np.int64).copy()
        prediction = np.full(n, -1, np.int64)
        status = {m: ["failed"] * n for m in methods}
        errors = {m: [""] * n for m in methods}
        curves = {m: [[] for _ in range(n)] for m in methods}

        reader = ShardReader(rows.to_pylist(), self._load, run.batch_size, self.decode_threads)
        for batch in reader:
            self._evaluate(batch, meta, target, prediction, status, errors, curves)
        for i, reason in reader.failures.items():
            for m in methods:
                errors[m][i] = reason

        records = [dict(row=meta["row"][i], sample_id=meta["sample_id"][i], path=redact(meta["path"][i]),
                        target=target[i],
                        label=meta["label"][i], prediction=prediction[i], method=m, status=status[m][i],
                        error=redact(errors[m][i]), curve=curves[m][i]) for i in range(n) for m in methods]
        _write_atomically(pa.Table.from_pylist(records, schema=CURVE_SCHEMA), shard_path(self.job.config.out, shard),
                          run.storage_options)
        counts = {s: sum(st.count(s) for st in status.values()) for s in ("ok", "failed", "nonfinite")}
        failures = sorted({(redact(meta["path"][i]), redact(errors[methods[0]][i]))
                           for i in range(n) if status[methods[0]][i] == "failed"})
        return {"shard": shard, "rows": n, **counts, "failures": failures, "seconds": time.perf_counter() - began}

    def _evaluate(self, batch, meta, target, prediction, status, errors, curves):
        """Perturbation curves of one batch, written into the shard's buffers.

        Many parameters because: the batch and the six per-shard buffers it fills (one each, as the store lays them
        out).
        """
        index = list(batch.rows)
        x = batch.inputs(self.device)
        with torch.no_grad():
            logits = self.model(x)
        prediction[index] = logits.argmax(1).cpu().numpy()
        if self.job.target_mode == "prediction":
            target[index] = prediction[index]
        batch_target = torch.as_tensor(target[index], device=self.device)
        scores, finite = {}, {}
        for name, explainer in self.explainers.items():
            scores[name] = score_map(explainer(x, batch_target).relevance, self.reductions[name])
            finite[name] = torch.isfinite(scores[name]).flatten(1).all(1).cpu().numpy()
        scores[RANDOM], finite[RANDOM] = None, np.ones(len(index), bool)
        sample_ids = [meta["sample_id"][i] for i in index]
        results = self.perturb(self.model, x, batch_target, scores, sample_ids)
        for name, values in results.items():
            values = values.cpu().numpy()
            ok = finite[name] & np.isfinite(values).all(1)
            for j, i in enumerate(index):
                status[name][i] = "ok" if ok[j] else "nonfinite"
                errors[name][i] = "" if ok[j] else "NaN or Inf in the explanation or in f(x^(k))"
                curves[name][i] = values[j].tolist() if ok[j] else []


def _write_atomically(table: pa.Table, path: str, storage_options: dict | None) -> None:
    """Write under a temporary name, then rename: the file is either absent or complete."""
    fs, target = fsspec.core.url_to_fs(path, **dict(storage_options or {}))
    folder, name = target.rsplit("/", 1)
    fs.makedirs(folder, exist_ok=True)
    temporary = f"{folder}/.{name}.{uuid.uuid4().hex}.tmp"
    with fs.open(temporary, "wb") as handle:
        pq.write_table(table, handle)
    fs.mv(temporary, target)


# ---- the driver ------------------------------------------------------------------------------------------------
@dataclass
class EvaluationPlan:
    config: EvaluationConfig
    run: RunPlan
    rows: pa.Table  # the (sampled) rows: row, sample_id, path, target, label, ...
    identity: dict

    @property
    def n_shards(self) -> int:
        return -(-self.rows.num_rows // self.config.run.rows_per_shard)

    def shard_rows(self, shard: int) -> pa.Table:
        size = self.config.run.rows_per_shard
        return self.rows.slice(shard * size, size)


def plan_evaluation(config: EvaluationConfig) -> EvaluationPlan:
    """Validate everything before any work (methods, model, dataset, steps vs. regions); raises ConfigError."""
    run_plan = plan_run(config.run)
    try:
        config.perturbation.num_steps(run_plan.height, run_plan.width)
    except ValueError as error:
        raise ConfigError(f"evaluation: {error}") from error
    for name in ("low", "high"):  # the images are RGB (pipeline/datasets.py): one bound, or one per channel
        bound = getattr(config.perturbation, name)
        if bound is not None and np.atleast_1d(bound).size not in (1, 3):
            raise ConfigError(f"evaluation: {name} {bound} needs 1 value or 3 (one per RGB channel), "
                              f"got {np.atleast_1d(bound).size}")
    rows = run_plan.rows
    if config.sample_size is not None and config.sample_size < rows.num_rows:
        rng = np.random.default_rng(config.perturbation.seed)
        rows = rows.take(pa.array(np.sort(rng.choice(rows.num_rows, config.sample_size, replace=False))))
    return EvaluationPlan(config, run_plan, rows, config.identity(run_plan))


def _prepare_output(plan: EvaluationPlan) -> None:
    """Write evaluation.json, or check that the existing one was made with the same config (a resume)."""
    config = plan.config
    fs, root = _filesystem(config)
    local = _join(root, SETTINGS_FILE)
    identity = json.loads(canonical_json(plan.identity))
    if fs.exists(local):
        with fs.open(local, "rt") as handle:
            old = json.load(handle).get("config", {})
        differences = config_differences(old, as_recorded(identity, old if isinstance(old, dict) else {}))
        if differences:
            raise ConfigError(f"the evaluation at {config.out!r} was made with a different configuration:\n  "
                              + "\n  ".join(differences)
                              + f"\nTo resume it, run with the values it was made with (its {SETTINGS_FILE}); "
                              "to keep it and start another, write to a new --out.")
        return
    fs.makedirs(root, exist_ok=True)
    with fs.open(local, "wt") as handle:
        json.dump({"config": identity, "rows": plan.rows.num_rows, "shards": plan.n_shards,
                   "software": software_versions()}, handle, indent=2, sort_keys=True, default=str)


@dataclass
class EvaluationSummary:
    out: str
    rows: int
    methods: list[str]
    counts: dict[str, int]  # ok / failed / nonfinite / missing, over (row, method) pairs
    failures: list[tuple[str, str]]
    computed_rows: int = 0
    seconds: float = 0.0
    messages: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 when every (row, method) curve is ok; 1 when some failed or are missing."""
        return 0 if self.counts.get("ok", 0) == self.rows * len(self.methods) else 1

    def format(self) -> str:
        rate = self.computed_rows / self.seconds if self.seconds > 0 else 0.0
        lines = [f"evaluation {self.out}: {self.rows} rows x {len(self.methods)} methods ({', '.join(self.methods)}); "
                 f"computed {self.computed_rows} rows this run in {self.seconds:.1f}s ({rate:.2f} images/s)",
                 "  curves: " + ", ".join(f"{k} {v}" for k, v in self.counts.items())]
        if self.failures:
            lines.append(f"failed images ({len(self.failures)}):")
            lines += [f"  {path}: {reason}" for path, reason in self.failures[:20]]
        lines += self.messages
        return "\n".join(lines)


def summarize(plan: EvaluationPlan) -> EvaluationSummary:
    """Counts read back from the shard files, so a resumed run is reported whole."""
    config = plan.config
    methods = [s.name for s in config.run.explanations] + [RANDOM]
    counts = {"ok": 0, "failed": 0, "nonfinite": 0, "missing": 0}
    failures: dict[str, str] = {}
    fs, root = _filesystem(config)
    for shard in range(plan.n_shards):
        path = shard_path(root, shard)
        if not fs.exists(path):
            counts["missing"] += plan.shard_rows(shard).num_rows * len(methods)
            continue
        with fs.open(path, "rb") as handle:
            table = pq.read_table(handle, columns=["path", "status", "error"]).to_pydict()
        for p, s, e in zip(table["path"], table["status"], table["error"]):
            counts[s] = counts.get(s, 0) + 1
            if s == "failed":
                failures.setdefault(p, e)
    return EvaluationSummary(config.out, plan.rows.num_rows, methods, counts, sorted(failures.items()))


def evaluate(config: EvaluationConfig, use_gpu: bool | None = None) -> EvaluationSummary:
    """Compute the perturbation curves of every missing shard on Ray actors; resumable and idempotent."""
    plan = plan_evaluation(config)
    _prepare_output(plan)
    fs, root = _filesystem(config)
    todo = [shard for shard in range(plan.n_shards) if not fs.exists(shard_path(root, shard))]
    if not todo:
        summary = summarize(plan)
        summary.messages.append("nothing to do: every shard is already computed")
        return summary

    task = EvaluationTask(plan)
    pool = ShardPool("evaluation", EvaluateActor, EvaluationJob(config, plan.run.target_mode), config.run, use_gpu)
    result = pool.run(todo, task)
    summary = summarize(plan)
    summary.computed_rows, summary.seconds = result.computed_rows, result.seconds
    summary.messages += task.messages
    return summary


class EvaluationTask:
    """The evaluation's shards for the :class:`~pipeline.dispatch.ShardPool`: one Parquet file each, written whole
    by its actor (so never bisected); a shard that cannot be done is left missing, and a rerun retries it."""

    bisect = False

    def __init__(self, plan: EvaluationPlan):
        self.plan, self.messages = plan, []

    def submit(self, actor, part: Part):
        return actor.evaluate_shard.remote(part.shard, self.plan.shard_rows(part.shard))

    def size(self, shard: int) -> int:
        return self.plan.shard_rows(shard).num_rows

    def fail(self, part: Part, reason: str) -> None:
        self.messages.append(f"shard {part.shard} not computed (a rerun retries it): {reason}")

"""The run config of ``lrp-audit explain``: dataclasses, YAML loading and up-front validation.

Everything that can be wrong with a config is checked by :func:`pipeline.run.plan_run` before the first
image is explained (unknown model or composite, missing weights file, class-count mismatch, target out
of range), and every error says which key to fix. Example YAML::

    dataset: {source: data/voc, kind: voc}
    model: {name: vgg16, weights: DEFAULT}
    preprocess: {from_weights: true, pad_to_square: true}
    explanations:
      - {composite: epsilon, epsilon: 0.01}
      - {composite: epsilon, epsilon: 100}
      - {name: ab, composite: alpha_beta, alpha: 1, beta: 0}
    targets: labels
    store: runs/voc.zarr
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml

from .config_types import check_types, exponent_numbers, paths_as_text
from .models import ModelError, ModelSpec
from .preprocess import PreprocessSpec

TARGET_MODES = ("auto", "label", "prediction", "classes", "labels")
AUTOCAST_DTYPES = (None, "bfloat16", "float16")  # the forward pass's autocast dtype (lrp.Explainer's ``autocast``)
DECODE_MODES = ("cpu", "auto")  # auto: batched nvJPEG on GPU actors (pipeline/gpu_decode.py), CPU elsewhere


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and what to change."""


#: the evaluation's default shard: a row costs (methods x steps) forwards, so smaller shards than explain's
EVALUATION_ROWS_PER_SHARD = 32


@dataclass
class DatasetSpec:
    """``source``: folder, manifest file or VOC root (local or fsspec URL); ``kind``: imagefolder, manifest,
    voc or auto; ``split``: VOC ImageSets/Main split name."""

    source: str
    kind: str = "auto"
    split: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExplanationSetting:
    """One composite with its parameters; written to ``explanations/<name>`` of the store."""

    composite: str
    params: dict[str, Any] = field(default_factory=dict)
    name: str | None = None

    def __post_init__(self):
        if not isinstance(self.composite, str) or not isinstance(self.params, dict):
            raise ConfigError(f"explanation {self.composite!r} {self.params!r}: 'composite' must be a composite "
                              "name and its parameters a mapping")
        self.params = exponent_numbers(self.params)
        if not self.name:
            self.name = self.composite + "".join(f"_{key}={value}" for key, value in sorted(self.params.items()))
        if not isinstance(self.name, str) or "/" in self.name or self.name in (".", "..") \
                or self.name.startswith("__"):
            raise ConfigError(f"explanation name {self.name!r} cannot name a store group: use a string without '/', "
                              "not '.' or '..', not starting with '__'")

    def to_dict(self) -> dict[str, Any]:
        return {"composite": self.composite, **self.params}

    @classmethod
    def parse(cls, value) -> ExplanationSetting:
        """From a dict ``{composite: epsilon, epsilon: 0.01, name: ...}`` or a string ``epsilon:epsilon=0.01,...``."""
        if isinstance(value, ExplanationSetting):
            return value
        if isinstance(value, str):
            composite, _, rest = value.partition(":")
            params = {}
            for item in filter(None, rest.split(",")):
                key, sep, text = item.partition("=")
                if not sep:
                    raise ConfigError(f"explanation {value!r}: parameters are key=value, e.g. epsilon:epsilon=0.01")
                params[key.strip()] = yaml.safe_load(text)
            return cls(composite.strip(), params)
        if isinstance(value, dict):
            given, value = value, dict(value)
            if "composite" not in value:
                raise ConfigError(f"explanation {value} needs a 'composite' key (e.g. composite: epsilon)")
            name = value.pop("name", None)
            composite = value.pop("composite")
            params = value.pop("params", {}) or {}
            if not isinstance(params, dict):
                raise ConfigError(f"explanation {given}: 'params' must be a mapping, got {params!r}")
            params = dict(params)
            params.update(value)
            return cls(composite, params, name)
        raise ConfigError(f"explanation {value!r} must be a mapping or 'composite:key=value,...'")


@dataclass
class RunConfig:
    """A whole explain run. Defaults make a laptop run: local Ray, CPU actors, label targets."""

    dataset: DatasetSpec
    model: ModelSpec
    store: str
    explanations: list[ExplanationSetting] = field(default_factory=lambda: [ExplanationSetting("epsilon_plus")])
    preprocess: PreprocessSpec = field(default_factory=lambda: PreprocessSpec(resize=[224, 224]))
    preprocess_from_weights: bool = False
    targets: str = "auto"
    classes: list[int | str] = field(default_factory=list)
    per_channel: bool = False
    tf32: bool = False  # CUDA: TF32 convolutions (faster, ~1e-3 relative error); default full float32
    autocast: str | None = None  # bfloat16 / float16: forward in reduced precision, relevance in float32
    decode: str = "cpu"  # auto: JPEGs decoded + preprocessed on the GPU (GPU actors only); see docs/pipeline.md
    batch_size: int = 32
    num_actors: int | None = None
    decode_workers: int = 0  # processes per actor that decode and preprocess (CPU decode); 0: threads in the actor
    actors_per_gpu: int = 1  # processes sharing a GPU: one process is GIL-bound (benchmarks/RESULTS.md)
    cpus_per_actor: int = 1
    rows_per_shard: int = 256
    max_attempts: int = 3
    retry_failed: bool = False
    address: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    progress: bool = True

    def __post_init__(self):
        if self.targets not in TARGET_MODES:
            raise ConfigError(f"targets {self.targets!r} unknown: use one of {', '.join(TARGET_MODES)}")
        if self.autocast not in AUTOCAST_DTYPES:
            raise ConfigError(f"autocast {self.autocast!r} unknown: use bfloat16, float16 or leave it unset")
        if self.decode not in DECODE_MODES:
            raise ConfigError(f"decode {self.decode!r} unknown: use one of {', '.join(DECODE_MODES)}")
        if int(self.decode_workers) < 0:
            raise ConfigError(f"decode_workers must be 0 (decode in the actor) or more, got {self.decode_workers}")
        if self.decode_workers and self.decode != "cpu":
            raise ConfigError(f"decode_workers decode on the CPU: use them with decode: cpu, not {self.decode!r}")
        if self.decode_workers and int(self.decode_workers) >= int(self.cpus_per_actor):
            raise ConfigError(f"decode_workers ({self.decode_workers}) run on the actor's own CPUs and leave it one: "
                              f"raise cpus_per_actor (now {self.cpus_per_actor}) above it")
        if self.targets == "classes" and not self.classes:
            raise ConfigError("targets: classes needs a 'classes' list (class indices or names)")
        if self.classes and self.targets != "classes":
            raise ConfigError(f"'classes' is only used with targets: classes (targets is {self.targets!r})")
        for key in ("batch_size", "actors_per_gpu", "cpus_per_actor", "rows_per_shard", "max_attempts"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.num_actors is not None and int(self.num_actors) < 1:
            raise ConfigError(f"num_actors must be at least 1 (or unset for one per GPU/CPU), got {self.num_actors}")
        if not self.explanations:
            raise ConfigError("explanations is empty: give at least one composite, e.g. {composite: epsilon}")
        names = [setting.name for setting in self.explanations]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ConfigError(f"explanations {duplicates} appear twice: give each setting a distinct 'name'")

    def identity(self) -> dict[str, Any]:
        """The part of the config that defines the store's content (not how fast it is computed)."""
        from .secrets import redact  # storage options are left out; URLs are recorded without their credentials

        weights = redact(self.model.weights) if self.model.weights else self.model.weights
        return {
            "dataset": {"source": redact(str(self.dataset.source)), "kind": self.dataset.kind,
                        "split": self.dataset.split},
            "model": {"name": self.model.name, "factory": self.model.factory, "weights": weights,
                      "kwargs": self.model.kwargs, "seed": self.model.seed},
            "explanations": {s.name: s.to_dict() for s in self.explanations},
            "preprocess": self.preprocess.to_dict(),
            "targets": self.targets,
            "classes": list(self.classes),
            "per_channel": self.per_channel,
            "tf32": self.tf32,
            **({"decode": self.decode} if self.decode != "cpu" else {}),  # GPU resampling differs slightly
            **({"autocast": self.autocast} if self.autocast else {}),  # reduced-precision activations: other maps
        }


def _build(cls, values: dict, where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; known keys: {sorted(known)}")
    values = _without_nulls(cls, values)
    try:
        values = check_types(cls, values)
        return cls(**values)
    except (ModelError, ValueError, TypeError) as error:
        raise ConfigError(f"{where}: {error}") from error


def config_from_dict(values: dict[str, Any]) -> RunConfig:
    """A RunConfig from plain values (parsed YAML merged with CLI flags, or a dict built in Python: paths may be
    ``pathlib.Path``)."""
    values = paths_as_text(dict(values))
    for key in ("dataset", "model", "store"):
        if not values.get(key):
            raise ConfigError(f"the config needs '{key}' (see docs/pipeline.md for an example)")
    dataset, model = values["dataset"], values["model"]
    values["dataset"] = _build(DatasetSpec, _section(dataset, "dataset", "source"), "dataset")
    values["model"] = _build(ModelSpec, _section(model, "model", "name"), "model")
    preprocess = _section(values.get("preprocess") or {}, "preprocess")
    from_weights = preprocess.pop("from_weights", values.get("preprocess_from_weights", False))
    from_weights = False if from_weights is None else from_weights
    if not isinstance(from_weights, bool):
        raise ConfigError(f"preprocess.from_weights must be true or false, got {from_weights!r}")
    values["preprocess_from_weights"] = from_weights
    if values["preprocess_from_weights"]:
        from .models import weights_enum

        enum = weights_enum(values["model"])
        if enum is None:
            raise ConfigError("preprocess.from_weights needs model.name with torchvision weights "
                              "(e.g. weights: DEFAULT)")
        preprocess = _without_nulls(PreprocessSpec, preprocess)
        try:
            preprocess = check_types(PreprocessSpec, preprocess)
            values["preprocess"] = PreprocessSpec.from_weights(enum, **preprocess)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"preprocess: {error}") from error
    elif preprocess:
        values["preprocess"] = _build(PreprocessSpec, preprocess, "preprocess")
    else:
        values.pop("preprocess", None)
    if "explanations" in values:
        settings = values["explanations"]
        settings = [settings] if isinstance(settings, (str, dict)) else settings
        if not isinstance(settings, (list, tuple)):
            raise ConfigError(f"explanations must be a list of settings (e.g. [{{composite: epsilon}}]), "
                              f"got {settings!r}")
        values["explanations"] = [ExplanationSetting.parse(s) for s in settings]
    values["classes"] = _classes(values.get("classes"))
    config = _build(RunConfig, values, "config")
    try:
        config.preprocess.output_size()
    except ValueError as error:
        raise ConfigError(f"preprocess: {error}") from error
    return config


def _without_nulls(cls, values: dict) -> dict:
    """YAML ``key: null`` (or ``key:`` with nothing after it) of a key with a default means that default."""
    defaults = {f.name for f in dataclasses.fields(cls)
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    return {key: value for key, value in values.items() if value is not None or key not in defaults}


def _section(value, key: str, shorthand: str | None = None) -> dict:
    """A config section as a mapping; ``dataset: data/voc`` and ``model: resnet50`` are shorthand for one key."""
    if shorthand and isinstance(value, str):
        return {shorthand: value}
    if not isinstance(value, dict):
        example = f"a string ({shorthand}) or " if shorthand else ""
        raise ConfigError(f"{key} must be {example}a mapping of keys, got {value!r}")
    return dict(value)


def _classes(value) -> list[int | str]:
    """``targets: classes`` as indices or names: ``"3,dog"``, ``[3, "dog"]``; digit strings are indices."""
    if value is None:
        return []
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        value = [c.strip() for c in str(value).split(",")]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"classes must be a list of class indices or names, got {value!r}")
    classes = []
    for c in value:
        if isinstance(c, bool) or not isinstance(c, (int, str)):
            raise ConfigError(f"classes: {c!r} is neither a class index (an integer) nor a class name (a string)")
        classes.append(int(c) if str(c).lstrip("-").isdigit() else c)
    return classes


def load_yaml(path: str) -> dict[str, Any]:
    """Values of a YAML config file (local or fsspec URL)."""
    import fsspec

    try:
        with fsspec.open(path, "rt") as file:
            values = yaml.safe_load(file) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path!r} is not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of keys (dataset, model, store, ...)")
    return values

"""Models to explain: a torchvision architecture by name or a custom ``package.module:factory``, with weights
from a torchvision weights enum (``DEFAULT``, ``IMAGENET1K_V1``: downloaded by torchvision), a local or
fsspec state_dict file (loaded with ``weights_only=True``: a checkpoint cannot run code), or none
(random init from a fixed seed, so every actor builds the same model).
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
import inspect
import io
import json
import re
import typing
from dataclasses import dataclass, field
from typing import Any

import fsspec
import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum


class ModelError(ValueError):
    """The model cannot be built as configured; the message says what to fix."""


@dataclass
class ModelSpec:
    """``name`` (torchvision) or ``factory`` (``package.module:callable``); ``weights`` is an enum name of
    that torchvision model, a state_dict path/URL, or None; ``kwargs`` go to the constructor
    (e.g. ``num_classes``); ``class_names`` is a file (one name per line, or a JSON list) or a list."""

    name: str | None = None
    factory: str | None = None
    weights: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    class_names: str | list[str | int] | None = None  # a file, or the names (numbers are names too)
    seed: int = 0

    def __post_init__(self):
        if bool(self.name) == bool(self.factory):
            raise ModelError("set exactly one of model.name (a torchvision model, e.g. resnet50) "
                             "and model.factory ('package.module:function')")
        if self.name and self.name not in torchvision.models.list_models():
            close = difflib.get_close_matches(self.name.lower(), torchvision.models.list_models(), n=8, cutoff=0.6)
            raise ModelError(f"unknown torchvision model {self.name!r}" + (f"; did you mean one of {close}?" if close
                             else "; see torchvision.models.list_models()"))
        if self.factory and ":" not in self.factory:
            raise ModelError(f"model.factory {self.factory!r} must look like 'package.module:function'")
        self.kwargs = dict(self.kwargs or {})


def weights_enum(spec: ModelSpec) -> WeightsEnum | None:
    """The torchvision weights named by ``spec.weights`` (``DEFAULT`` included), or None for a file/none."""
    if not spec.name or not spec.weights:
        return None
    try:
        enum = torchvision.models.get_model_weights(spec.name)
    except (ValueError, KeyError):
        return None
    names = [member.name for member in enum]
    if spec.weights in names or spec.weights == "DEFAULT":
        return enum[spec.weights] if spec.weights != "DEFAULT" else enum.DEFAULT
    if spec.weights.split(".")[-1] in names and spec.weights.startswith(enum.__name__):
        return enum[spec.weights.split(".")[-1]]
    return None


def _weights_file(spec: ModelSpec) -> str | None:
    if not spec.weights or weights_enum(spec) is not None:
        return None
    fs, path = fsspec.core.url_to_fs(spec.weights)
    if not fs.exists(path):
        hint = ""
        if spec.name:
            try:
                known = ["DEFAULT"] + [m.name for m in torchvision.models.get_model_weights(spec.name)]
                hint = f" nor a weights name of {spec.name} ({', '.join(known)})"
            except (ValueError, KeyError):
                hint = f" ({spec.name} has no torchvision weights)"
        raise ModelError(f"model.weights {spec.weights!r} is not an existing file{hint}: fix the path or the name")
    return spec.weights


def weights_digest(spec: ModelSpec) -> str:
    """What identifies the weights in the store config: the file's sha256, or the enum and its URL."""
    enum = weights_enum(spec)
    if enum is not None:
        return f"torchvision:{type(enum).__name__}.{enum.name}:{enum.url}"
    path = _weights_file(spec)
    if path is None:
        return f"random-init:seed={spec.seed}"
    digest = hashlib.sha256()
    fs, local = fsspec.core.url_to_fs(path)
    # a local file through open(): fsspec's local opener seeks to the end first, which a FIFO or a device refuses
    with (open(local, "rb") if "file" in fs.protocol else fs.open(local, "rb")) as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state_dict from a local or fsspec file; ``weights_only=True`` so a checkpoint cannot run code."""
    with fsspec.open(path, "rb") as file:
        data = file.read()
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # torch's message carries terminal colour codes
        if "Unsupported global" in text and "torch.nn.modules" in text:
            raise ModelError(f"{path!r} holds a whole pickled model (torch.save(model)), not a state_dict: save "
                             "torch.save(model.state_dict(), path) and give the architecture with model.name or "
                             "model.factory") from None
        raise ModelError(f"cannot load state_dict {path!r} with weights_only=True: {text}") from error
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelError(f"{path!r} holds a {type(state).__name__}, not a state_dict")
    return state


def _factory(spec: ModelSpec):
    module_name, _, attribute = spec.factory.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ModelError(f"cannot import {module_name!r} for model.factory {spec.factory!r}: {error}") from error
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ModelError(f"module {module_name!r} has no {attribute!r} (model.factory {spec.factory!r})") from None


def build_model(spec: ModelSpec, device: str | torch.device = "cpu", download: bool = True) -> nn.Module:
    """The model in eval mode on ``device``. With ``download=False`` torchvision weights are not fetched
    (the architecture is built with the weights' class count), for validating a config on the driver."""
    enum = weights_enum(spec)
    kwargs = dict(spec.kwargs)
    torch.manual_seed(spec.seed)  # random init (no weights) is the same in every actor
    if spec.name:
        if enum is None or not download:
            if enum is not None:
                kwargs.setdefault("num_classes", len(enum.meta["categories"]))
            enum = None
        try:
            model = torchvision.models.get_model(spec.name, weights=enum, **kwargs)
        except (TypeError, ValueError) as error:  # an unknown keyword; a num_classes the weights do not have
            raise ModelError(_kwargs_message(spec, kwargs, error)) from error
    else:
        factory = _factory(spec)
        try:
            model = factory(**kwargs)
        except TypeError as error:
            raise ModelError(f"model.factory {spec.factory!r} rejected kwargs {kwargs}: {error}") from error
        except Exception as error:  # the user's code: whatever it raises is a configuration error, named
            raise ModelError(f"model.factory {spec.factory!r} raised {type(error).__name__}: {error}") from error
        if not isinstance(model, nn.Module):
            raise ModelError(f"model.factory {spec.factory!r} returned a {type(model).__name__}, not a torch.nn.Module")
    path = _weights_file(spec)
    if path is not None:
        try:
            model.load_state_dict(load_state_dict(path))
        except RuntimeError as error:
            raise ModelError(f"the state_dict {path!r} does not fit the model: {error}") from error
    return model.eval().to(device)


def _accepted_kwargs(name: str) -> tuple[str, list[str]] | None:
    """The model class a torchvision builder returns (its annotation) and the keyword names its constructor takes,
    or None when they cannot be found cheaply."""
    try:
        builder = torchvision.models.get_model_builder(name)
        cls = typing.get_type_hints(builder).get("return")
        if not isinstance(cls, type):
            return None
        names = [p.name for p in list(inspect.signature(cls.__init__).parameters.values())[1:]
                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        return cls.__name__, names
    except Exception:  # only a hint: never the reason a message is not given
        return None


def _kwargs_message(spec: ModelSpec, kwargs: dict, error: Exception) -> str:
    accepted = _accepted_kwargs(spec.name)
    unknown = [key for key in kwargs if accepted and key not in accepted[1]] or \
        re.findall(r"keyword argument '(\w+)'", str(error))
    message = f"torchvision model {spec.name!r} rejected model.kwargs {spec.kwargs}"
    if unknown:
        message += f": it takes no keyword {', '.join(map(repr, unknown))}"
    message += f" ({type(error).__name__}: {error})"
    if accepted and unknown:
        message += f"; {accepted[0]} takes {', '.join(accepted[1])} (some are set by the {spec.name} builder)"
    return message


def _read_class_names(path: str) -> list[str]:
    """A class names file: UTF-8 text, a JSON list of names, or one name a line."""
    try:
        with fsspec.open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        raise ModelError(f"class names file {path!r} does not exist") from None
    except IsADirectoryError:
        raise ModelError(f"class names file {path!r} is a directory: give a file (a JSON list or one name a line)") \
            from None
    except OSError as error:
        raise ModelError(f"cannot read class names file {path!r}: {type(error).__name__}: {error}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ModelError(f"class names file {path!r} is not UTF-8 text ({error}): save it as UTF-8") from None
    if text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as error:
            raise ModelError(f"class names file {path!r} starts with '[' but is not a JSON list: {error}") from None
        if not isinstance(names, list) or not all(isinstance(n, (str, int)) and not isinstance(n, bool)
                                                  for n in names):
            raise ModelError(f"class names file {path!r} must be a JSON list of names (strings)")
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ModelError(f"class names file {path!r} lists no class names")
    return [str(name) for name in names]


def model_class_names(spec: ModelSpec) -> list[str] | None:
    """Class names from ``spec.class_names`` (a list or a file), else the torchvision weights' meta."""
    if isinstance(spec.class_names, (list, tuple)):
        return [str(name) for name in spec.class_names]
    if isinstance(spec.class_names, str):
        return _read_class_names(spec.class_names)
    enum = weights_enum(spec)
    if enum is not None and "categories" in enum.meta:
        return list(enum.meta["categories"])
    return None


def count_classes(model: nn.Module, channels: int, size: tuple[int, int]) -> int:
    """The model's number of outputs, from one forward pass on a blank image of the configured size."""
    param = next(model.parameters(), None)
    x = torch.zeros(1, channels, *size, device=param.device if param is not None else "cpu",
                    dtype=param.dtype if param is not None else torch.float32)
    with torch.no_grad():
        logits = model(x)
    if logits.dim() != 2:
        raise ModelError(f"the model returns shape {tuple(logits.shape)}; "
                         "an explained model must return (batch, classes) logits")
    return int(logits.shape[1])


def best_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")

"""Runs of the explain pipeline the end-to-end tests share: generated images and manifests, the tiny CNN's weights,
a config, the bare engine's answer for one image, and the FIFO trick that holds an actor at a known row.

Test modules import it as ``helpers.runs``; the Ray actors import the model by ``FACTORY`` (the repository root is
on their path).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import lrp
from pipeline.datasets import read_image
from pipeline.preprocess import Preprocess, PreprocessSpec

from .models import tiny_cnn

REPO = Path(__file__).resolve().parents[2]
# Ray puts the driver's working directory (the repository root under pytest) on the workers' path
FACTORY = "tests.helpers.models:tiny_cnn"


def save_image(path: Path, seed: int, height: int = 20, width: int = 28) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def save_weights(path: Path, num_classes: int = 3, nan_class: int | None = None) -> str:
    torch.manual_seed(1)
    state = tiny_cnn(num_classes).state_dict()
    if nan_class is not None:
        state["7.weight"][nan_class] = float("nan")
    torch.save(state, path)
    return str(path)


def manifest(tmp_path: Path, n: int = 8, extra: list[tuple[str, str]] = (), header="path,label,box") -> str:
    lines = [header]
    for i in range(n):
        lines.append(f'{save_image(tmp_path / "img" / f"{i}.png", i)},{i % 3},"2,2,10,9"')
    lines += [f"{path},{label}," for path, label in extra]
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "manifest.csv")


def values(tmp_path: Path, dataset: str, **overrides) -> dict:
    base = {
        "dataset": {"source": dataset},
        "model": {"factory": FACTORY, "weights": save_weights(tmp_path / "w.pt")},
        "preprocess": {"resize": 16, "pad_to_square": True},
        "explanations": [{"composite": "epsilon", "epsilon": 0.01}, {"name": "ab", "composite": "alpha_beta",
                                                                     "alpha": 1, "beta": 0}],
        "store": str(tmp_path / "run.zarr"),
        "batch_size": 2, "rows_per_shard": 3, "num_actors": 1, "progress": False,
    }
    base.update(overrides)
    return base


def engine_relevance(tmp_path: Path, path: str, target: int, **setting) -> tuple[np.ndarray, float]:
    """What the bare engine gives for one image, in this process."""
    model = tiny_cnn()
    model.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    x, _, _ = Preprocess(PreprocessSpec(resize=16, pad_to_square=True))(read_image(path))
    result = lrp.Explainer(model.eval(), **setting)(x[None], target)
    return result.relevance.sum(1)[0].numpy(), float(result.output[0])


# ---- failures of processes: a FIFO in the dataset holds an actor at a known row --------------------------
def holders(path: Path) -> list[int]:
    """Processes (other than this one) reading ``path``: holding it open read-only.

    Only readers count: a child this process forks to spawn a worker holds a copy of the test's own read-write
    descriptor of the FIFO until its exec, and killing that child would break a pool the row did not break."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path) and _read_only(f"/proc/{pid}/fdinfo/{fd}"):
                    found.append(int(pid))
                    break
        except OSError:
            continue
    return found


def _read_only(fdinfo: str) -> bool:
    with open(fdinfo) as info:
        flags = next(line for line in info if line.startswith("flags:"))
    return int(flags.split()[1], 8) & os.O_ACCMODE == os.O_RDONLY


def wait_for(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.05)
    raise TimeoutError("condition not reached")


def fifo_dataset(tmp_path: Path, n: int, blocked_row: int) -> tuple[str, Path]:
    """A manifest whose image ``blocked_row`` is a FIFO: reading it blocks until the test swaps in a PNG."""
    source = manifest(tmp_path, n)
    fifo = tmp_path / "img" / f"{blocked_row}.png"
    fifo.unlink()
    os.mkfifo(fifo)
    return source, fifo

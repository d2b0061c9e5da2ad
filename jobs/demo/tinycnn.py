"""A tiny CNN for the demo audit, and an in-process CPU training loop of about a minute.

The network uses only layers the LRP engine has rules for (Conv2d, BatchNorm2d, ReLU, MaxPool2d,
AdaptiveAvgPool2d, Flatten, Linear), so it can be explained as it is. Load it in the pipeline as
``jobs.demo.tinycnn:tiny_cnn`` with ``{"num_classes": 5}`` and the state_dict file that :func:`train` saved.

Training reads the same manifest the pipeline explains, with the same preprocessing (pixels scaled to
[0, 1], then normalised by :data:`MEAN` / :data:`STD`), and uses no augmentation: a flip would move the
planted stamp, and the point of the demo is a model that learns the shortcut the data offers.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch import nn

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def tiny_cnn(num_classes: int = 5, width: int = 16, in_channels: int = 3) -> nn.Sequential:
    """Four conv blocks (width, 2, 4, 4 x width channels) with three 2x2 max-pools, global average pooling
    and one linear layer. The last block sees about 40 px, enough to tell a square's corners from a disc."""
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(in_channels, width), nn.MaxPool2d(2),
        *block(width, 2 * width), nn.MaxPool2d(2),
        *block(2 * width, 4 * width), nn.MaxPool2d(2),
        *block(4 * width, 4 * width),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4 * width, num_classes),
    )


def select_device(device: str | torch.device | None = None) -> torch.device:
    """The given device, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_images(paths: Sequence[str]) -> torch.Tensor:
    """Read RGB images into one normalised float tensor (N,3,H,W): the pipeline's preprocessing."""
    arrays = np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0 for p in paths])
    x = torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def load_manifest(manifest: str | Path, class_names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and integer labels of a manifest (Parquet or CSV with ``path`` and ``label`` columns)."""
    manifest = Path(manifest)
    if manifest.suffix == ".parquet":
        table = pq.read_table(manifest, columns=["path", "label"]).to_pydict()
    else:
        import csv
        with open(manifest, newline="") as handle:
            rows = list(csv.DictReader(handle))
        table = {"path": [r["path"] for r in rows], "label": [r["label"] for r in rows]}
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted({str(label) for label in table["label"]} - set(index))
    if unknown:
        raise ValueError(f"{manifest}: labels {unknown[:5]} are not among the class names {list(class_names)}")
    labels = torch.tensor([index[str(label)] for label in table["label"]], dtype=torch.long)
    return load_images(table["path"]), labels


def train(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 5e-3,
    width: int = 16,
    seed: int = 0,
    device: str | torch.device | None = None,
    threads: int | None = 1,
    log: Callable[[str], None] | None = print,
) -> nn.Sequential:
    """Train :func:`tiny_cnn` with Adam and cross-entropy; returns the model in eval mode on the CPU.

    Deterministic for a given seed on one machine (same initialisation and batch order). ``threads``:
    CPU threads for the training (None: torch's default). One is the default because convolutions
    this small barely gain from a second thread, and on a busy machine extra threads spin and make
    training several times slower. The keywords are the training's hyperparameters, one each.
    """
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _train(images, labels, num_classes, epochs, batch_size, lr, width, seed, device, log)
    finally:
        torch.set_num_threads(previous_threads)


def _train(images, labels, num_classes, epochs, batch_size, lr, width, seed, device, log) -> nn.Sequential:
    """The loop of :func:`train`, which passes its hyperparameters through one to one (hence their number)."""
    torch.manual_seed(seed)
    device = select_device(device)
    model = tiny_cnn(num_classes, width=width).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * -(-len(labels) // batch_size))
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(labels), generator=generator)
        total, correct, loss_sum = 0, 0, 0.0
        for batch in order.split(batch_size):
            x, y = images[batch].to(device), labels[batch].to(device)
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach()) * len(batch)
            correct += int((logits.argmax(1) == y).sum())
            total += len(batch)
        if log:
            log(f"epoch {epoch + 1}/{epochs}: loss {loss_sum / total:.3f}, train accuracy {correct / total:.3f} "
                f"({time.perf_counter() - start:.0f} s)")
    return model.cpu().eval()


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted class of every image."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model(x.to(device)).argmax(1).cpu() for x in images.split(batch_size)])


def accuracy_report(predictions: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]) -> dict:
    """Overall and per-class accuracy, and how often each class is predicted (the shortcut's pull)."""
    per_class = {}
    for index, name in enumerate(class_names):
        chosen = labels == index
        per_class[name] = float((predictions[chosen] == index).float().mean()) if chosen.any() else float("nan")
    predicted_as = {name: float((predictions == i).float().mean()) for i, name in enumerate(class_names)}
    return {"accuracy": float((predictions == labels).float().mean()), "per_class": per_class,
            "predicted_as": predicted_as, "images": int(len(labels))}

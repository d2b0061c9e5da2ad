"""JPEG decoding of a whole batch on the GPU (nvJPEG), with a CPU fallback per image that is recorded, not failed.

On a GPU actor the CPU is what bounds throughput (decoding and torchvision's per-image transforms hold the GIL,
docs/pipeline.md). With ``decode: auto`` a GPU actor's reader threads only read the files' bytes; each batch's
JPEGs are decoded in one batched ``torchvision.io.decode_jpeg(list, device="cuda")`` call and preprocessed on the
device. A file nvJPEG refuses (not a JPEG, CMYK, a JPEG variant it does not support) is decoded by the CPU path
(Pillow, as without GPU decoding) and reported in the run summary; only a file no decoder reads is a failed row.
On a CPU actor nothing here runs: :func:`decode_on_device` is False there.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from .batches import Batch, Sample

# torchvision 0.29 deprecates its decoders for TorchCodec; decode_jpeg(device="cuda") is still the batched nvJPEG path
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


def decode_on_device(option: str, device: torch.device | str) -> bool:
    """Whether an actor on ``device`` decodes JPEGs on it: only with ``decode: auto`` on a CUDA device."""
    return option == "auto" and torch.device(device).type == "cuda"


def is_jpeg(data: bytes) -> bool:
    """A JPEG starts with the SOI marker and a second marker; anything else goes straight to the CPU decoder."""
    return data[:3] == b"\xff\xd8\xff"


class Decoded(NamedTuple):
    """One file's image on the device, or None when no decoder could read it; ``note`` says why the CPU decoded it
    (or, with no image, why it failed); empty when the GPU decoder did."""

    image: torch.Tensor | None
    note: str = ""


def _cpu(fallback: Callable[[int], torch.Tensor], i: int, device, why: str) -> Decoded:
    try:
        return Decoded(fallback(i).to(device), why)
    except Exception as error:  # no decoder reads it: a failed row
        return Decoded(None, f"{type(error).__name__}: {error}")


def decode_batch(datas: list[bytes], device: torch.device | str,
                 fallback: Callable[[int], torch.Tensor]) -> list[Decoded]:
    """Decode file contents to (3, H, W) uint8 RGB on ``device``: the JPEGs in one batched call, then one by one if
    that call refuses (it returns nothing when any image fails), and ``fallback(i)`` (a CPU decode) for the rest."""
    jpegs = [i for i, data in enumerate(datas) if is_jpeg(data)]
    tensors = {i: torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in jpegs}
    out: dict[int, Decoded] = {}
    try:
        images = decode_jpeg(list(tensors.values()), mode=ImageReadMode.RGB, device=device) if jpegs else []
        out.update({i: Decoded(image) for i, image in zip(jpegs, images)})
    except RuntimeError:
        for i, tensor in tensors.items():
            try:
                out[i] = Decoded(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
            except RuntimeError as error:
                out[i] = _cpu(fallback, i, device, f"GPU decoder refused it ({str(error).splitlines()[-1]})")
    for i in range(len(datas)):
        if i not in out:
            out[i] = _cpu(fallback, i, device, "not a JPEG")
    return [out[i] for i in range(len(datas))]


class Encoded(NamedTuple):
    """A row's image still as file bytes (decoded later with its batch), with its source boxes and mask."""

    data: bytes
    path: str
    boxes: list | None
    box_classes: np.ndarray
    mask: torch.Tensor | None


class DecodedBatch(NamedTuple):
    batch: Batch  # the rows whose image decoded, with their samples on the device
    failures: dict[int, str]  # shard row -> why no decoder (or the preprocessing) could read its image
    fallbacks: list[tuple[str, str]]  # (path, why the CPU decoded it)


def decode_encoded_batch(batch: Batch, preprocess: Callable, device: torch.device | str,
                         fallback: Callable[[str], torch.Tensor]) -> DecodedBatch:
    """A batch of :class:`Encoded` samples decoded and preprocessed on ``device``; rows of one image (several
    targets) share one sample object, which is decoded once."""
    unique = list({id(sample): sample for sample in batch.samples}.values())
    decoded = decode_batch([s.data for s in unique], device, lambda i: fallback(unique[i].path))
    samples, reasons, fallbacks = {}, {}, []
    for source, result in zip(unique, decoded):
        if result.image is None:
            reasons[id(source)] = result.note
            continue
        if result.note:
            fallbacks.append((source.path, result.note))
        try:
            x, boxes, mask = preprocess(result.image, source.boxes, source.mask)
        except Exception as error:  # e.g. a mask of another size: a failed row, as on the CPU path
            reasons[id(source)] = f"{type(error).__name__}: {error}"
            continue
        samples[id(source)] = Sample(x, boxes, source.box_classes, mask)
    rows, kept, failures = [], [], {}
    for row, source in zip(batch.rows, batch.samples):
        if id(source) in samples:
            rows.append(int(row))
            kept.append(samples[id(source)])
        else:
            failures[int(row)] = reasons[id(source)]
    return DecodedBatch(Batch(np.asarray(rows, np.int64), kept), failures, fallbacks)

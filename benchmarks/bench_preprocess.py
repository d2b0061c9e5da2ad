"""Per-image preprocessing in the explain actor: ``pipeline.preprocess.Preprocess`` against one ``transforms.v2``
Compose over the same image (what it ran before its image took torchvision's kernels directly), side by side.

The actor decodes and preprocesses on threads that share one interpreter with the engine, so what matters is the
Python time a row holds the GIL for: the table shows images/s on 1 and on all cores' threads (a GIL-bound step does
not scale with threads).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_preprocess.py --images 400
"""
from __future__ import annotations

import argparse
import io
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.io import decode_jpeg
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from pipeline.preprocess import Preprocess, PreprocessSpec


class ComposeReference:
    """Image, boxes and mask through one v2.Compose: the values ``Preprocess`` must (and does) give."""

    def __init__(self, spec: PreprocessSpec):
        self.spec = spec
        steps = []
        if spec.resize:
            steps.append(v2.Resize(spec.resize if len(spec.resize) == 2 else spec.resize[0],
                                   interpolation=InterpolationMode(spec.interpolation), antialias=True))
        if spec.center_crop:
            steps.append(v2.CenterCrop(spec.center_crop))
        self.geometry = v2.Compose(steps)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        image = tv_tensors.Image(image)
        boxes = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(height, width))
        if self.spec.pad_to_square and height != width:
            side = max(height, width)
            left, top = (side - width) // 2, (side - height) // 2
            padding = [left, top, side - width - left, side - height - top]
            image, boxes = F.pad(image, padding, padding_mode="edge"), F.pad(boxes, padding)
        image, boxes, _ = self.geometry(image, boxes, None)
        return F.normalize(F.to_dtype(image, torch.float32, scale=True), self.spec.mean, self.spec.std)


class Ours(Preprocess):
    def image_only(self, image: torch.Tensor) -> torch.Tensor:
        return self(image)[0]


def _jpegs(n: int, width: int, height: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        pixels = (rng.random((height // 8, width // 8, 3)) * 255).astype(np.uint8)  # blocks: compresses like a photo
        buffer = io.BytesIO()
        Image.fromarray(pixels).resize((width, height)).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def _rate(step, datas: list[bytes], threads: int) -> float:
    def one(data: bytes):
        return step(decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8)))

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, datas[:8]))
        began = time.perf_counter()
        list(pool.map(one, datas))
        return len(datas) / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one intra-op thread per decoding thread, as in a GPU actor
    cores = os.cpu_count() or 1
    print(f"{args.images} JPEGs decoded (torchvision, libjpeg-turbo) and preprocessed, best of {args.repeats}, "
          f"torch 1 thread per decoding thread\n")
    print("| images | preprocess | reference (v2.Compose) img/s, 1 thread | ours, 1 thread | "
          f"reference, {cores} threads | ours, {cores} threads | ours / reference, {cores} threads |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for width, height in ((280, 224), (500, 375)):
        datas = _jpegs(args.images, width, height)
        for spec in (PreprocessSpec(resize=224, pad_to_square=True), PreprocessSpec(resize=256, center_crop=224)):
            ours, reference = Ours(spec), ComposeReference(spec)
            image = decode_jpeg(torch.frombuffer(bytearray(datas[0]), dtype=torch.uint8))
            assert torch.equal(ours.image_only(image), reference(image))
            rates = {}
            for threads in (1, cores):
                for name, step in (("reference", reference), ("ours", ours.image_only)):
                    rates[name, threads] = max(_rate(step, datas, threads) for _ in range(args.repeats))
            what = "pad to square, resize 224" if spec.pad_to_square else "resize 256, crop 224"
            print(f"| {width}x{height} | {what} | {rates['reference', 1]:.0f} | {rates['ours', 1]:.0f} | "
                  f"{rates['reference', cores]:.0f} | {rates['ours', cores]:.0f} | "
                  f"{rates['ours', cores] / rates['reference', cores]:.2f}x |")


if __name__ == "__main__":
    main()

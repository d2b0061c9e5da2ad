"""Image preprocessing with boxes and masks carried through the same geometry.

Built on torchvision's ``transforms.v2``, which moves ``BoundingBoxes`` and ``Mask`` along with the
image, so a box drawn on the source image still frames the object on the relevance map. Two
geometries: resize + center-crop (torchvision's classification presets), or pad to square with the
nearest pixel (edge padding) then resize, as Binder et al. 2016 §4 do for non-square images, so no
part of the image is cropped away and the padding adds no new edges.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _size(value, key: str) -> list[int] | None:
    """An int or [h, w] as a list of one or two positive ints; anything else (a string, 2.5, [[2]]) is refused."""
    if value is None:
        return None
    sizes = [value] if isinstance(value, (int, np.integer)) else value
    if (not isinstance(sizes, (list, tuple)) or len(sizes) not in (1, 2)
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in sizes)):
        raise ValueError(f"preprocess.{key} must be a positive integer or [height, width], got {value!r}")
    return [int(v) for v in sizes]


@dataclass
class PreprocessSpec:
    """What to do to a decoded uint8 image before the model sees it.

    ``resize``: one int (shorter side, aspect kept) or [h, w]; ``center_crop``: int or [h, w];
    ``pad_to_square``: edge-pad to a square before resizing instead of cropping;
    ``mean``/``std``: normalization after scaling to [0, 1].
    """

    resize: int | list[int] | None = None  # an int is kept as [int]
    center_crop: int | list[int] | None = None
    pad_to_square: bool = False
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    interpolation: str = "bilinear"

    def __post_init__(self):
        self.resize, self.center_crop = _size(self.resize, "resize"), _size(self.center_crop, "center_crop")
        self.mean, self.std = [float(v) for v in self.mean], [float(v) for v in self.std]
        self.pad_to_square = bool(self.pad_to_square)
        try:
            InterpolationMode(self.interpolation)
        except ValueError:
            options = [mode.value for mode in InterpolationMode]
            raise ValueError(f"preprocess.interpolation {self.interpolation!r} unknown: use one of {options}") from None
        if len(self.mean) != len(self.std) or not all(0 < s < float("inf") for s in self.std) \
                or not all(abs(m) < float("inf") for m in self.mean):
            raise ValueError(f"preprocess.mean {self.mean} and std {self.std} need equal lengths, finite values and "
                             "std > 0")
        if self.resize and self.center_crop:  # a crop beyond the resized image pads it with black, new hard edges
            crop = (self.center_crop[0], self.center_crop[-1])
            smallest = (self.resize[0], self.resize[-1]) if len(self.resize) == 2 else (self.resize[0],) * 2
            if crop[0] > smallest[0] or crop[1] > smallest[1]:
                raise ValueError(f"preprocess.center_crop {self.center_crop} is larger than the resized image "
                                 f"(resize {self.resize}: at least {smallest[0]}x{smallest[1]}): the crop would pad "
                                 "it with black; crop at most the resize")

    @classmethod
    def from_weights(cls, weights, **overrides) -> PreprocessSpec:
        """The geometry of a torchvision weights' own ``transforms()`` (ImageClassification preset)."""
        preset = weights.transforms()
        spec = dict(resize=list(preset.resize_size), center_crop=list(preset.crop_size),
                    mean=list(preset.mean), std=list(preset.std), interpolation=preset.interpolation.value)
        spec.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**spec)

    def output_size(self) -> tuple[int, int]:
        """(H, W) of every preprocessed image: fixed, because the store's arrays are."""
        if self.center_crop:
            crop = self.center_crop
            return (crop[0], crop[-1])
        if self.resize and (len(self.resize) == 2 or self.pad_to_square):
            return (self.resize[0], self.resize[-1])
        raise ValueError(
            "preprocess must give every image the same size: set center_crop, or pad_to_square with resize, "
            "or resize as [height, width]"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Preprocess:
    """Callable: (uint8 image (3,H,W), source boxes (K,4), mask (H,W)) -> (float input, boxes, mask).

    The image goes through torchvision's image kernels directly (``F.resize_image`` and so on); boxes and masks, when
    a row has them, through the same geometry as ``transforms.v2`` objects. The values are those of one ``v2.Compose``
    over all three (tests/test_preprocess.py), with about half the Python a row: this runs once per image in the
    explain actors, whose decoding threads share one interpreter with the engine."""

    def __init__(self, spec: PreprocessSpec):
        self.spec = spec
        self.size = spec.output_size()
        self.interpolation = InterpolationMode(spec.interpolation)
        self.resize = (spec.resize if len(spec.resize) == 2 else spec.resize[:1]) if spec.resize else None
        geometry = []
        if spec.resize:
            geometry.append(v2.Resize(spec.resize if len(spec.resize) == 2 else spec.resize[0],
                                      interpolation=self.interpolation, antialias=True))
        if spec.center_crop:
            geometry.append(v2.CenterCrop(spec.center_crop))
        self.geometry = v2.Compose(geometry)

    def _padding(self, height: int, width: int) -> list[int] | None:
        if not self.spec.pad_to_square or height == width:
            return None
        side = max(height, width)
        left, top = (side - width) // 2, (side - height) // 2
        return [left, top, side - width - left, side - height - top]

    def pixels(self, image: torch.Tensor, padding: list[int] | None) -> torch.Tensor:
        """The uint8 image in model geometry (padded, resized, cropped), not yet scaled."""
        if padding:
            image = F.pad_image(image, padding, padding_mode="edge")  # nearest pixel: no new edges
        if self.resize:
            image = F.resize_image(image, self.resize, interpolation=self.interpolation, antialias=True)
        if self.spec.center_crop:
            image = F.center_crop_image(image, self.spec.center_crop)
        if tuple(image.shape[-2:]) != self.size:
            raise ValueError(f"preprocessed size {tuple(image.shape[-2:])} is not the configured {self.size}")
        return image

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels, one image (C, H, W) or a batch (B, C, H, W) on any device, scaled to [0, 1] and normalised:
        the same elementwise operations either way, so a batch normalised on the device equals its images normalised
        one by one on the host (tests/test_decode_workers.py)."""
        return F.normalize_image(F.to_dtype_image(pixels, torch.float32, scale=True), self.spec.mean, self.spec.std)

    def __call__(self, image: torch.Tensor, boxes=None, mask: torch.Tensor | None = None, normalize: bool = True):
        """``normalize=False``: the input is left as uint8 pixels in model geometry (:meth:`pixels`), for a decode
        worker whose batch the actor normalises on its device (:mod:`pipeline.decode_workers`)."""
        height, width = image.shape[-2:]
        box_array = np.asarray(boxes if boxes is not None else np.zeros((0, 4)), dtype=np.float32).reshape(-1, 4)
        if mask is not None and mask.shape[-2:] != (height, width):
            raise ValueError(f"mask size {tuple(mask.shape[-2:])} differs from the image size {(height, width)}")
        padding = self._padding(height, width)
        x = self.pixels(image.as_subclass(torch.Tensor), padding)
        x = self.normalize(x) if normalize else x
        out_boxes, out_mask = np.zeros((0, 4), np.float32), None
        if len(box_array) or mask is not None:
            box_tensor = tv_tensors.BoundingBoxes(torch.from_numpy(box_array), format="XYXY",
                                                  canvas_size=(height, width))
            mask = tv_tensors.Mask(mask.to(torch.uint8)) if mask is not None else None
            if padding:
                box_tensor = F.pad(box_tensor, padding)
                if mask is not None:
                    mask = F.pad(mask, padding, fill=0)  # the padding is not the object
            box_tensor, mask = self.geometry(box_tensor, mask)
            out_boxes = box_tensor.as_subclass(torch.Tensor).numpy().astype(np.float32)
            out_mask = mask.as_subclass(torch.Tensor).bool() if mask is not None else None
        h, w = self.size
        out_boxes[:, 0::2] = out_boxes[:, 0::2].clip(0, w)
        out_boxes[:, 1::2] = out_boxes[:, 1::2].clip(0, h)
        empty = (out_boxes[:, 2] <= out_boxes[:, 0]) | (out_boxes[:, 3] <= out_boxes[:, 1])
        out_boxes[empty] = np.nan  # cropped away entirely
        return x, out_boxes, out_mask

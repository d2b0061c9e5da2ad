"""Preprocessing geometry: edge padding to square, resize/crop, and boxes and masks following the image."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.models import ResNet18_Weights

from pipeline.preprocess import Preprocess, PreprocessSpec

IDENTITY = dict(mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])


def test_pad_to_square_repeats_the_nearest_pixel():
    image = torch.randint(0, 256, (3, 4, 10), dtype=torch.uint8)
    x, boxes, mask = Preprocess(PreprocessSpec(resize=10, pad_to_square=True, **IDENTITY))(
        image, [[2, 1, 5, 3]], torch.ones(4, 10, dtype=torch.bool))
    expected = image.float() / 255
    assert x.shape == (3, 10, 10)
    torch.testing.assert_close(x[:, 3:7], expected)  # the image sits in the middle, unscaled
    for row in range(3):  # three rows above copy the first row, three below copy the last
        torch.testing.assert_close(x[:, row], expected[:, 0])
        torch.testing.assert_close(x[:, 9 - row], expected[:, -1])
    np.testing.assert_allclose(boxes, [[2, 4, 5, 6]])
    assert mask[3:7].all() and not mask[:3].any() and not mask[7:].any()  # padding is not the object


def test_resize_and_center_crop_clip_boxes():
    image = torch.zeros(3, 20, 40, dtype=torch.uint8)
    pre = Preprocess(PreprocessSpec(resize=10, center_crop=10))  # 20x40 -> 10x20 -> crop x in [5, 15)
    x, boxes, _ = pre(image, [[0, 0, 4, 4], [8, 2, 20, 12], [30, 0, 40, 20]])
    assert x.shape == (3, 10, 10)
    assert np.isnan(boxes[0]).all()  # cropped away entirely
    np.testing.assert_allclose(boxes[1], [0, 1, 5, 6])  # (4, 1, 10, 6) shifted by 5, clipped at 0
    assert np.isnan(boxes[2]).all()  # x from 15 to 20 lies right of the crop


def test_same_pixels_as_the_weights_own_transforms():
    image = torch.randint(0, 256, (3, 300, 260), dtype=torch.uint8)
    ours, _, _ = Preprocess(PreprocessSpec.from_weights(ResNet18_Weights.DEFAULT))(image)
    theirs = ResNet18_Weights.DEFAULT.transforms()(image)
    one_level = 1 / 255 / min(ResNet18_Weights.DEFAULT.transforms().std)  # uint8 rounding of the resize
    torch.testing.assert_close(ours, theirs, atol=one_level * 1.01, rtol=0)
    assert (ours - theirs).abs().mean() < one_level / 4
    spec = PreprocessSpec.from_weights(ResNet18_Weights.DEFAULT, pad_to_square=True)
    assert spec.pad_to_square and spec.output_size() == (224, 224)


def test_output_size_must_be_fixed_and_options_checked():
    with pytest.raises(ValueError, match="same size"):
        PreprocessSpec(resize=32).output_size()
    assert PreprocessSpec(resize=[16, 24]).output_size() == (16, 24)
    assert PreprocessSpec(resize=16, pad_to_square=True).output_size() == (16, 16)
    with pytest.raises(ValueError, match="interpolation 'cubic' unknown"):
        PreprocessSpec(resize=16, interpolation="cubic")
    with pytest.raises(ValueError, match="std > 0"):
        PreprocessSpec(resize=16, std=[0, 1, 1])


@settings(max_examples=25, deadline=None)
@given(height=st.integers(6, 40), width=st.integers(6, 40), data=st.data())
def test_box_and_mask_stay_together(height, width, data):
    """A box drawn as a mask maps to (about) the same pixels as the transformed box, whatever the aspect."""
    x0 = data.draw(st.integers(0, width - 4))
    y0 = data.draw(st.integers(0, height - 4))
    x1 = data.draw(st.integers(x0 + 3, width))
    y1 = data.draw(st.integers(y0 + 3, height))
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    pre = Preprocess(PreprocessSpec(resize=16, pad_to_square=True))
    _, boxes, out_mask = pre(torch.zeros(3, height, width, dtype=torch.uint8), [[x0, y0, x1, y1]], mask)
    bx0, by0, bx1, by1 = boxes[0]
    assert 0 <= bx0 < bx1 <= 16 and 0 <= by0 < by1 <= 16
    ys, xs = np.nonzero(out_mask.numpy())
    assert len(ys), "a box of at least 3 px keeps some mask pixels at 16 px"
    assert xs.min() >= np.floor(bx0) - 1 and xs.max() + 1 <= np.ceil(bx1) + 1
    assert ys.min() >= np.floor(by0) - 1 and ys.max() + 1 <= np.ceil(by1) + 1


def _compose_reference(spec: PreprocessSpec, image, boxes, mask):
    """What ``Preprocess`` computed before its image took the kernels directly: one ``v2.Compose`` over all three."""
    from torchvision import tv_tensors
    from torchvision.transforms import InterpolationMode, v2
    from torchvision.transforms.v2 import functional as F

    height, width = image.shape[-2:]
    image = tv_tensors.Image(image)
    box_tensor = tv_tensors.BoundingBoxes(torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4), format="XYXY",
                                          canvas_size=(height, width))
    mask = tv_tensors.Mask(mask.to(torch.uint8))
    if spec.pad_to_square and height != width:
        side = max(height, width)
        left, top = (side - width) // 2, (side - height) // 2
        padding = [left, top, side - width - left, side - height - top]
        image, box_tensor = F.pad(image, padding, padding_mode="edge"), F.pad(box_tensor, padding)
        mask = F.pad(mask, padding, fill=0)
    steps = []
    if spec.resize:
        steps.append(v2.Resize(spec.resize if len(spec.resize) == 2 else spec.resize[0],
                               interpolation=InterpolationMode(spec.interpolation), antialias=True))
    if spec.center_crop:
        steps.append(v2.CenterCrop(spec.center_crop))
    image, box_tensor, mask = v2.Compose(steps)(image, box_tensor, mask)
    x = F.normalize(F.to_dtype(image, torch.float32, scale=True), spec.mean, spec.std)
    return x.as_subclass(torch.Tensor), box_tensor.as_subclass(torch.Tensor).numpy(), mask.as_subclass(torch.Tensor)


@pytest.mark.parametrize("spec", [dict(resize=224, pad_to_square=True), dict(resize=256, center_crop=224),
                                  dict(resize=[100, 120]), dict(center_crop=40),
                                  dict(resize=64, center_crop=[60, 50], interpolation="nearest"),
                                  dict(resize=50, pad_to_square=True, interpolation="bicubic")])
@pytest.mark.parametrize("shape", [(3, 224, 280), (3, 375, 500), (3, 300, 200), (3, 64, 64)])
def test_image_kernels_give_the_values_of_one_compose(spec, shape):
    spec = PreprocessSpec(**spec)
    rng = np.random.default_rng(sum(shape))
    image = torch.from_numpy(rng.integers(0, 256, shape, dtype=np.uint8))
    boxes = np.array([[10, 20, 150, 180], [0, 0, 5, 5], [190, 10, 199, 60]], np.float32)
    mask = torch.from_numpy(rng.random(shape[1:]) < 0.3)
    x_ref, boxes_ref, mask_ref = _compose_reference(spec, image, boxes, mask)
    for with_boxes, with_mask in ((False, False), (True, False), (False, True), (True, True)):
        x, got_boxes, got_mask = Preprocess(spec)(image, boxes if with_boxes else None, mask if with_mask else None)
        assert torch.equal(x, x_ref)
        if with_boxes:
            clipped = boxes_ref.copy()
            clipped[:, 0::2] = clipped[:, 0::2].clip(0, x.shape[2])
            clipped[:, 1::2] = clipped[:, 1::2].clip(0, x.shape[1])
            gone = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
            clipped[gone] = np.nan
            np.testing.assert_array_equal(got_boxes, clipped)
        else:
            assert got_boxes.shape == (0, 4)
        assert (got_mask is None) != with_mask
        if with_mask:
            assert torch.equal(got_mask, mask_ref.bool())

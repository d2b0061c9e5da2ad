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

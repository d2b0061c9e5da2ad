"""The stabilized division of relevance messages: the one-sign shortcut gives the general form's values."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lrp.stabilize import safe_divide, safe_divide_signed


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), sign=st.sampled_from([1, -1]), epsilon=st.sampled_from([1e-6, 0.25, 100.0]),
       dtype=st.sampled_from([torch.float32, torch.float64]), broadcast=st.booleans())
def test_a_denominator_of_one_sign_gives_the_values_of_the_general_stabilizer(seed, sign, epsilon, dtype, broadcast):
    g = torch.Generator().manual_seed(seed)
    shape = (3, 5, 4)
    # magnitudes across scales, some exact zeros of the denominator's own sign
    magnitude = torch.rand(shape, generator=g, dtype=dtype) * 10.0 ** torch.randint(-8, 3, shape, generator=g)
    magnitude[torch.rand(shape, generator=g) < 0.2] = 0
    denominator = sign * magnitude
    if sign < 0:
        denominator[magnitude == 0] = -0.0  # what a sum of non-positive terms gives at zero
    numerator = torch.randn((2,) + shape if broadcast else shape, generator=g, dtype=dtype)
    expected = safe_divide(numerator, denominator, epsilon)
    assert torch.equal(safe_divide_signed(numerator, denominator.clone(), epsilon, sign), expected)


def test_a_zero_of_the_other_sign_only_flips_that_message_and_epsilon_zero_is_exact_division():
    numerator = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    # -0.0 in a denominator declared non-negative: +epsilon here, -epsilon in the general form (no input has a share)
    got = safe_divide_signed(numerator, torch.tensor([-0.0, 0.5, 2.0], dtype=torch.float64), 0.1, 1)
    assert got.tolist() == pytest.approx([10.0, 2.0 / 0.6, 3.0 / 2.1])
    got = safe_divide_signed(numerator, torch.tensor([0.0, -0.5, -2.0], dtype=torch.float64), 0.1, -1)
    assert got.tolist() == pytest.approx([-10.0, -2.0 / 0.6, -3.0 / 2.1])
    exact = safe_divide_signed(numerator, torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64), 0.0, 1)
    assert exact.tolist() == [0.0, 4.0, 1.5]

"""Safe division for relevance messages.

Every LRP rule divides the relevance of an output neuron by a (modified) pre-activation z_j. Two conventions:

* ``epsilon > 0``: ``z + epsilon * sign(z)`` with ``sign(0) = +1`` (Eq. 3 of Binder et al. 2016; identical to zennit's
  stabilizer, so results can be compared with it).
* ``epsilon == 0``: exact division; a neuron with ``z == 0`` passes no relevance on. This is the form in which the naive
  rule (Eq. 2) and alpha-beta (Eq. 4) conserve relevance exactly.

Where every entry of the denominator has one known sign (z+ and alpha-beta's halves sum contributions of one sign),
:func:`safe_divide_signed` shifts it by a constant instead: one elementwise pass fewer, the same values.
"""
from __future__ import annotations

import torch


def safe_divide(numerator: torch.Tensor, denominator: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``numerator / stabilized(denominator)``, see the module docstring for the two conventions."""
    if epsilon > 0:
        # three elementwise passes and no host-to-device copy (a tensor built from a Python float on a GPU would
        # synchronise the stream at every layer); copysign gives sign(+0) = +1 like zennit. It gives -epsilon at an
        # exact -0.0, which only arises when every contribution is a signed zero, so no input gets relevance either way.
        stabilized = torch.copysign(denominator.new_full((), epsilon), denominator).add_(denominator)
        if stabilized.shape != torch.broadcast_shapes(numerator.shape, denominator.shape):
            return numerator / stabilized
        return torch.div(numerator, stabilized, out=stabilized)
    return (numerator / denominator).masked_fill_(denominator == 0, 0)


def safe_divide_(numerator: torch.Tensor, denominator: torch.Tensor, epsilon: float,
                 buffer: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`safe_divide` (the same values and conventions) into ``numerator``, which the caller owns and which
    must have the result's shape; ``buffer`` (a spare tensor of the denominator's shape) holds the stabilized
    denominator instead of a new one. For rules where fresh tensors are what the step's time goes to (attention)."""
    if epsilon > 0:
        stabilized = torch.copysign(denominator.new_full((), epsilon), denominator, out=buffer)
        return numerator.div_(stabilized.add_(denominator))
    return numerator.div_(denominator).masked_fill_(denominator == 0, 0)


def safe_divide_signed(numerator: torch.Tensor, denominator: torch.Tensor, epsilon: float, sign: int) -> torch.Tensor:
    """:func:`safe_divide` where every entry of ``denominator`` has the sign ``sign`` (+1: all >= 0, -1: all <= 0),
    as in z+ and in each half of alpha-beta, whose denominators sum contributions of one sign.

    ``epsilon * sign(z)`` is then the constant ``sign * epsilon``: one shift in place instead of copysign and add, so
    ``denominator`` must be a fresh tensor the caller hands over (it is overwritten). The values are those of
    :func:`safe_divide` except at a zero of the other sign (-0.0 for +1, +0.0 for -1), where every contribution is
    zero, so no input gets relevance either way."""
    if epsilon <= 0:
        return safe_divide(numerator, denominator, epsilon)
    stabilized = denominator.add_(epsilon if sign > 0 else -epsilon)
    if stabilized.shape != torch.broadcast_shapes(numerator.shape, stabilized.shape):
        return numerator / stabilized
    return torch.div(numerator, stabilized, out=stabilized)

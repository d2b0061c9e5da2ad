"""Safe division for relevance messages.

Every LRP rule divides the relevance of an output neuron by a (modified) pre-activation z_j. Two conventions:

* ``epsilon > 0``: ``z + epsilon * sign(z)`` with ``sign(0) = +1`` (Eq. 3 of Binder et al. 2016; identical to zennit's
  stabilizer, so results can be compared with it).
* ``epsilon == 0``: exact division; a neuron with ``z == 0`` passes no relevance on. This is the form in which the naive
  rule (Eq. 2) and alpha-beta (Eq. 4) conserve relevance exactly.
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

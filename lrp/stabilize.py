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
        # four elementwise passes, one temporary reused for the quotient (this runs once per layer on every activation)
        eps = denominator.new_tensor(epsilon)
        stabilized = torch.where(denominator >= 0, eps, -eps).add_(denominator)
        if stabilized.shape != torch.broadcast_shapes(numerator.shape, denominator.shape):
            return numerator / stabilized
        return torch.div(numerator, stabilized, out=stabilized)
    zero = denominator == 0
    return torch.where(zero, torch.zeros_like(numerator), numerator / torch.where(zero, torch.ones_like(denominator), denominator))

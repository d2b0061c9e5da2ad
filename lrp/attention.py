r"""Self-attention (``nn.MultiheadAttention``) as one step: its inference forward and its LRP rule.

The module is a leaf of the trace: its forward is written out here (inference semantics: no dropout, whatever the
module's training flag) so that the rule can see the intermediate values. With ``x`` the step input (query = key =
value), per head :math:`q, k, v = x W_{q,k,v}^T + b`, :math:`S = q k^T / \sqrt{d}`, :math:`A = \mathrm{softmax}(S)`,
:math:`O = A v`, output :math:`O W_o^T + b_o`.

AttnLRP (Achtibat et al. 2024) rules, read backwards:

* the two projections (in, out): epsilon rule, :math:`R_x = x \odot W^T (R_z / z)`;
* :math:`O = A v` and :math:`S = q k^T`: bilinear products, the uniform rule: each factor gets half of the epsilon
  rule's share, :math:`R_A = A \odot (m v^T)`, :math:`R_v = v \odot (A^T m)`, :math:`m = R_O / (2 O)`;
* softmax: :math:`R_S = S \odot (R_A - A \sum_s R_A)` (Proposition 3.1, Taylor at the input with its bias term;
  not conserving: the bias term absorbs relevance).

CP-LRP (Ali et al. 2022, ``mode="cp"``) takes the attention weights :math:`A` as constants: all of :math:`R_O` goes
to :math:`v` and the query/key path gets nothing, so only the value third of the in-projection is transposed.
Both equal lxt's Gradient*Input implementation when the stabilizer is 0 (lxt's ``cp_multi_head_attention_forward``
for CP-LRP).

The forward pass keeps its in-projection ``z`` (q, k and v are views of it) for the rule (:class:`Saved`, on the step's
output tensor), the one product of the forward that costs a quarter of the layer to compute again; the rule computes
the scores ``S = q k^T``, the weights ``A = softmax(S)`` and the heads' output ``A v`` from it with the forward's own
code (:func:`_attend`), so they are the same values bit for bit, for 2 T^2 d of the layer's multiply-adds per head and
without keeping the (B, H, T, T) scores through the forward (on ViT-B/16 S and ``A v`` were 57% of what the step kept).
Under autograd (the baselines' vector-Jacobian product) nothing is kept; where the kept ``z`` does not fit the rule's
input (another dtype or shape, as after an autocast forward) the rule computes it again from its input.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .stabilize import safe_divide, safe_divide_

_SAVED = "_lrp_attention"  # the attribute of the step's output that holds its Saved products


class AttentionError(TypeError):
    """Raised (as the engine's UnsupportedLayerError) for attention configurations without a rule."""


def check(name: str, module: nn.MultiheadAttention, same_inputs: bool, kwargs: dict) -> None:
    """Refuse what the rule does not cover, naming the module: cross-attention, masks, bias_kv, separate q/k/v."""
    problems = []
    if not same_inputs:
        problems.append("query, key and value are not the same tensor (only self-attention is supported)")
    if not module._qkv_same_embed_dim or module.in_proj_weight is None:
        problems.append("separate query/key/value projection weights")
    if module.bias_k is not None or module.add_zero_attn:
        problems.append("add_bias_kv or add_zero_attn")
    for key in ("key_padding_mask", "attn_mask"):
        if kwargs.get(key) is not None:
            problems.append(f"{key}")
    if kwargs.get("is_causal"):
        problems.append("is_causal")
    if problems:
        raise AttentionError(f"attention {name!r}: no LRP rule for " + "; ".join(problems))


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    batch, tokens, width = t.shape
    return t.reshape(batch, tokens, heads, width // heads).transpose(1, 2)


def _merge(t: torch.Tensor) -> torch.Tensor:
    batch, heads, tokens, dim = t.shape
    return t.transpose(1, 2).reshape(batch, tokens, heads * dim)


@dataclass(frozen=True, eq=False)
class Saved:
    """The forward's in-projection ``z`` (B, T, 3E), batch first. The step's input is not held: the explainer may drop
    and recompute it (a LayerNorm output), bit for bit the same."""

    z: torch.Tensor


def _in_projection(module: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, module.in_proj_weight, module.in_proj_bias)


def _attend(module: nn.MultiheadAttention, z: torch.Tensor) -> tuple:
    """(S, A, merged) from the in-projection: the scores, the weights and the heads' merged output, computed by the
    same code in the forward and in the rule."""
    q, k, v = (_heads(t, module.num_heads) for t in z.chunk(3, dim=-1))
    scores = (q @ k.transpose(-2, -1)).mul_(q.shape[-1] ** -0.5)
    weights = scores.softmax(-1)
    return scores, weights, _merge(weights @ v)


def forward(module: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """The attention output (the first element of ``module(x, x, x)``) at inference, its products kept for the rule
    when no autograd graph is being built."""
    if not module.batch_first:
        x = x.transpose(0, 1)
    z = _in_projection(module, x)
    out = F.linear(_attend(module, z)[2], module.out_proj.weight, module.out_proj.bias)
    if not module.batch_first:
        out = out.transpose(0, 1)
    if not torch.is_grad_enabled():
        setattr(out, _SAVED, Saved(z))
    return out


def _saved(output: torch.Tensor | None, x: torch.Tensor) -> Saved | None:
    """The products the forward kept on ``output``, if they fit the batch-first input ``x`` (dtype, device, shape)."""
    saved = getattr(output, _SAVED, None)
    if saved is None or saved.z.dtype != x.dtype or saved.z.device != x.device or saved.z.shape[:-1] != x.shape[:-1]:
        return None
    return saved


def _without_bias(z: torch.Tensor, bias: torch.Tensor | None, include_bias: bool) -> torch.Tensor:
    return z if include_bias or bias is None else z - bias


def relevance(module: nn.MultiheadAttention, x: torch.Tensor, r_out: torch.Tensor, epsilon: float,
              include_bias: bool, cp: bool, output: torch.Tensor | None = None) -> torch.Tensor:
    """The input relevance of one self-attention step (AttnLRP, or CP-LRP when ``cp``), see the module docstring.

    Many parameters because: the rule's three settings, and ``output`` (the step's value from the forward pass,
    which holds the forward's products) beside the module, its input and the relevance."""
    if not module.batch_first:
        r_out = r_out.transpose(0, 1)
        x = x.transpose(0, 1)
    saved = _saved(output, x)
    if not module.batch_first and output is not None:
        output = output.transpose(0, 1)
    z = _in_projection(module, x) if saved is None else saved.z
    scores, weights, merged = _attend(module, z)
    if output is None:
        output = F.linear(merged, module.out_proj.weight, module.out_proj.bias)
    heads, width = module.num_heads, module.embed_dim
    q, k, v = (_heads(t, heads) for t in z.chunk(3, dim=-1))
    heads_out = _heads(merged, heads)
    # out-projection, epsilon rule
    out_weight, out_bias = module.out_proj.weight, module.out_proj.bias
    message = safe_divide(r_out, _without_bias(output, out_bias, include_bias), epsilon)
    r_heads = _heads((message @ out_weight).mul_(merged), heads)
    in_weight, in_bias = module.in_proj_weight, module.in_proj_bias
    batch, tokens = x.shape[:2]
    if cp:
        r_v = torch.empty_like(merged)  # (B, T, E), written through its heads view
        m = safe_divide_(r_heads, heads_out, epsilon)
        torch.mul(v, weights.transpose(-2, -1) @ m, out=_heads(r_v, heads))
        # q and k get no relevance: only the value third of the in-projection carries any
        z_v = _without_bias(z[..., 2 * width:], None if in_bias is None else in_bias[2 * width:], include_bias)
        return _batch_order(module, (safe_divide_(r_v, z_v, epsilon) @ in_weight[2 * width:]).mul_(x))
    r_z = z.new_empty(z.shape)  # (B, T, 3E); its (3, B, H, T, d) view holds r_q, r_k, r_v
    r_qkv = r_z.view(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    # m = r_O / (2 O) as (r_O / O) / 2, and below m_s = r_s / (2 S) as (r_s / S) / 2: the factor 2 taken out of the
    # stabilized denominator is exact (2 S + eps sign(S) = 2 (S + eps/2 sign(S)) in binary floating point), and the
    # division goes into a tensor the rule owns instead of a new one (fresh tensors are what this step's time went to)
    m = safe_divide_(r_heads, heads_out, epsilon / 2).mul_(0.5)
    torch.mul(v, weights.transpose(-2, -1) @ m, out=r_qkv[2])
    # the (B, H, T, T) part in two buffers, r_s = S (r_A - A sum r_A) then m_s, in place
    r_s = (m @ v.transpose(-2, -1)).mul_(weights)
    r_s.sub_(weights.mul_(r_s.sum(-1, keepdim=True))).mul_(scores)
    m_s = safe_divide_(r_s, scores, epsilon / 2, buffer=weights).mul_(q.shape[-1] ** -0.5 / 2)
    torch.mul(q, m_s @ k, out=r_qkv[0])
    torch.mul(k, m_s.transpose(-2, -1) @ q, out=r_qkv[1])
    r_z = safe_divide_(r_z, _without_bias(z, in_bias, include_bias), epsilon)
    return _batch_order(module, (r_z @ in_weight).mul_(x))


def _batch_order(module: nn.MultiheadAttention, r_x: torch.Tensor) -> torch.Tensor:
    return r_x if module.batch_first else r_x.transpose(0, 1)

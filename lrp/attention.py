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
to :math:`v` and the query/key path gets nothing. Both equal lxt's Gradient*Input implementation when the
stabilizer is 0 (lxt's ``cp_multi_head_attention_forward`` for CP-LRP).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .stabilize import safe_divide


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


def intermediates(module: nn.MultiheadAttention, x: torch.Tensor, out: torch.Tensor | None = None) -> dict:
    """Every value of the forward pass, batch first: x, z (in-projection), q, k, v, S, A, O, out.

    ``out``: the step's output when it is known (the rule has it from the forward pass), so that the out-projection
    is not computed again."""
    if not module.batch_first:
        x = x.transpose(0, 1)
        out = None if out is None else out.transpose(0, 1)
    z = F.linear(x, module.in_proj_weight, module.in_proj_bias)
    q, k, v = (_heads(t, module.num_heads) for t in z.chunk(3, dim=-1))
    scores = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5)
    weights = scores.softmax(-1)
    heads_out = weights @ v
    if out is None:
        out = F.linear(_merge(heads_out), module.out_proj.weight, module.out_proj.bias)
    return {"x": x, "z": z, "q": q, "k": k, "v": v, "S": scores, "A": weights, "O": heads_out, "out": out}


def forward(module: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """The attention output (the first element of ``module(x, x, x)``) at inference."""
    out = intermediates(module, x)["out"]
    return out if module.batch_first else out.transpose(0, 1)


def _linear_epsilon(relevance, x, z, projection: tuple, epsilon, include_bias):
    weight, bias = projection
    if not include_bias and bias is not None:
        z = z - bias
    return x * (safe_divide(relevance, z, epsilon) @ weight)


def relevance(module: nn.MultiheadAttention, x: torch.Tensor, r_out: torch.Tensor, epsilon: float,
              include_bias: bool, cp: bool, output: torch.Tensor | None = None) -> torch.Tensor:
    """The input relevance of one self-attention step (AttnLRP, or CP-LRP when ``cp``), see the module docstring.

    Many parameters because: the rule's three settings, and ``output`` (the step's value from the forward pass,
    which saves recomputing the out-projection) beside the module, its input and the relevance."""
    if not module.batch_first:
        r_out = r_out.transpose(0, 1)
    t = intermediates(module, x, output)
    merged = _merge(t["O"])
    out_proj = module.out_proj.weight, module.out_proj.bias
    r_heads = _linear_epsilon(r_out, merged, t["out"], out_proj, epsilon, include_bias)
    r_heads = _heads(r_heads, module.num_heads)
    if cp:
        r_q = r_k = torch.zeros_like(t["q"])
        r_v = t["v"] * (t["A"].transpose(-2, -1) @ safe_divide(r_heads, t["O"], epsilon))
    else:
        m = safe_divide(r_heads, 2 * t["O"], epsilon)
        r_v = t["v"] * (t["A"].transpose(-2, -1) @ m)
        r_a = t["A"] * (m @ t["v"].transpose(-2, -1))
        r_s = t["S"] * (r_a - t["A"] * r_a.sum(-1, keepdim=True))
        m_s = safe_divide(r_s, 2 * t["S"], epsilon) * (t["q"].shape[-1] ** -0.5)
        r_q = t["q"] * (m_s @ t["k"])
        r_k = t["k"] * (m_s.transpose(-2, -1) @ t["q"])
    r_z = torch.cat([_merge(r) for r in (r_q, r_k, r_v)], dim=-1)
    in_proj = module.in_proj_weight, module.in_proj_bias
    r_x = _linear_epsilon(r_z, t["x"], t["z"], in_proj, epsilon, include_bias)
    return r_x if module.batch_first else r_x.transpose(0, 1)

"""The lxt (LRP-eXplains-Transformers 2.1) oracle for torchvision's ViT: its efficient rules, applied per module.

lxt's efficient mode computes LRP as Gradient x Input of a forward pass whose gradients are modified: the identity
rule on GELU (``non_linear_forward``), the standard deviation of LayerNorm as a constant (``layer_norm_forward``),
CP-LRP in attention by stopping the gradient of query and key (``cp_multi_head_attention_forward``, its torchvision
ViT map ``lxt.efficient.models.vit_torch.cp_LRP``), and AttnLRP's uniform rule by dividing the gradient of query and key
by 4 and of value by 2 (``wrap_attention_forward``, its recipe for attention functions), the softmax keeping its plain
gradient (the paper's softmax rule in that framework).

Two things are done differently from ``lxt.efficient.monkey_patch``, neither changing a rule: the patches are bound to
the module instances of one copy of the model (monkey_patch rewrites the classes, ``nn.LayerNorm`` for every test in
the process), and ``lxt.efficient``'s package ``__init__`` is skipped: it imports lxt's BERT patches, which need a
``transformers`` module (``modeling_attn_mask_utils``) and names (``find_pruneable_heads_and_indices``) that
transformers 5 no longer has. The modules that hold the
rules, ``lxt.efficient.rules`` and ``lxt.efficient.patches``, import and are used unchanged.
"""
from __future__ import annotations

import copy
import importlib
import os
import sys
import types

import torch
from torch import nn

from helpers.lxt_recipe import bind, gradient_x_input


def lxt_efficient():
    """``(lxt.efficient.patches, lxt.efficient.rules)``, importable whatever lxt's BERT patches need."""
    import lxt  # noqa: F401 (the caller importorskips it)
    try:
        importlib.import_module("lxt.efficient")
    except ImportError:  # ModuleNotFoundError without transformers; a missing name with transformers 5
        package = types.ModuleType("lxt.efficient")
        package.__path__ = [os.path.join(os.path.dirname(sys.modules["lxt"].__file__), "efficient")]
        sys.modules["lxt.efficient"] = package
    return importlib.import_module("lxt.efficient.patches"), importlib.import_module("lxt.efficient.rules")


def lxt_model(model: nn.Module, cp: bool) -> nn.Module:
    """A copy of a torchvision ViT with lxt's rules: CP-LRP (``cp``) or AttnLRP in its attention."""
    patches, rules = lxt_efficient()

    def attn_lrp_attention(self, query, key, value, *args, **kwargs):  # lxt's wrap_attention_forward, on the module
        query, key = rules.divide_gradient(query, 4), rules.divide_gradient(key, 4)
        return self.original_forward(query, key, rules.divide_gradient(value, 2), *args, **kwargs)

    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, nn.GELU):
            bind(module, patches.non_linear_forward, keep_original=True)
        elif isinstance(module, nn.LayerNorm):
            bind(module, patches.layer_norm_forward, keep_original=False)
        elif isinstance(module, nn.MultiheadAttention):
            attention = patches.cp_multi_head_attention_forward if cp else attn_lrp_attention
            bind(module, attention, keep_original=True)
    return twin


def lxt_relevance(model: nn.Module, x: torch.Tensor, target: torch.Tensor, cp: bool) -> torch.Tensor:
    """lxt's relevance: Gradient x Input of the target logit through the patched copy."""
    return gradient_x_input(lxt_model(model, cp), x, target)

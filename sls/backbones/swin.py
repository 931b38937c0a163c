"""The timm Swin Transformer (v1) family: per-block pooled features and tail truncation.

timm's current layout: ``model.layers[s]`` is stage s; it runs its ``downsample``
(patch merging; an identity in stage 0) first, then its ``blocks``. Tokens are NHWC
``(B, H, W, C)`` between blocks. Blocks are numbered 1..N bottom-up across the
stages (N = 24 for Swin-B, whose depths are 2, 2, 18, 2).

Pooled feature of block i: the mean over all tokens of block i's output (after its
residual adds, before the model's final norm). It is taken *before* the next
stage's patch merging. The paper's code pooled the last block of a stage *after*
the merging (the old Swin layout put the merging at the end of a stage), which
makes that one block's feature depend on a layer of the next stage: a 4C -> 2C
linear map of a LayerNorm of 2x2 neighbours that truncation at that block removes.
Pooling before it keeps the rule "the feature of block i is what the pruned model
ending at block i feeds its final norm", the same for every block, and the same as
for the ViT family.

Truncation at a stage boundary leaves a narrower last stage than the final norm and
the head were built for; see :func:`truncate`.
"""

from __future__ import annotations

import torch
from torch import nn


def is_swin(model: nn.Module) -> bool:
    """Whether ``model`` is a timm SwinTransformer (v1; V2 and V2-Cr are other classes)."""
    from timm.models.swin_transformer import SwinTransformer

    return isinstance(model, SwinTransformer)


def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks, bottom-up across all stages (a flat list)."""
    return [block for stage in model.layers for block in stage.blocks]


def pool_tokens(model: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) block output -> (B, C): the mean over all tokens."""
    return out.flatten(1, -2).mean(dim=1)


def truncate(model: nn.Module, depth: int) -> nn.Module:
    """Keep blocks 1..depth in place and drop the rest (their parameters are freed).

    Stages after the one holding block ``depth`` go entirely (their patch merging
    included), and so do the later blocks of that stage. The truncated model is
    embedding -> blocks 1..depth -> norm -> head, pooled by the head as before.

    When the kept blocks end narrower than the model's ``num_features`` (a cut
    before the last stage), the final norm and the head cannot read them: both are
    replaced by fresh ones of the kept width (a LayerNorm with unit scale and zero
    shift; timm's default head init), and ``num_features`` follows. Those fresh
    modules are trainable and belong to the task's parameters, like the head; a
    model pruned there has no trained head until it is retrained. A cut inside the
    last stage, and full depth, keep the trained norm and head; full depth leaves
    the model unchanged.
    """
    kept_stages, remaining = 0, depth
    for stage in model.layers:
        if remaining <= 0:
            break
        if remaining < len(stage.blocks):
            stage.blocks = stage.blocks[:remaining]
        remaining -= len(stage.blocks)
        kept_stages += 1
    if kept_stages < len(model.layers):
        model.layers = model.layers[:kept_stages]
        model.feature_info = model.feature_info[:kept_stages]
        if hasattr(model, "_ref_window_sizes"):  # per stage, read by set_input_size() in recent timm
            model._ref_window_sizes = model._ref_window_sizes[:kept_stages]
    last_block = blocks(model)[-1]
    width = last_block.dim
    if width != model.num_features:
        old_norm, reference = model.norm, last_block.norm1.weight
        model.norm = nn.LayerNorm(
            width, eps=getattr(old_norm, "eps", 1e-5), device=reference.device, dtype=reference.dtype
        )
        model.norm.train(old_norm.training)
        model.num_features = width
        # timm's head reads its input width from in_features (1.0.20-1.0.24 do not pass
        # num_features on to it): set it first, so every version builds a width-wide head.
        model.head.in_features = width
        model.reset_classifier(model.num_classes)
    return model

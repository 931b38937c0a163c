"""The timm VisionTransformer family: per-block pooled features and tail truncation.

Pooled feature of block i: the CLS token of block i's output (after its residual
adds, before the model's final norm), as in the paper. Models whose head reads the mean
of the patch tokens (no class token, or ``global_pool="avg"``) use that mean instead
(prefix tokens such as registers excluded).
"""

from __future__ import annotations

import torch
from torch import nn


def is_vit(model: nn.Module) -> bool:
    """Whether ``model`` is a timm VisionTransformer (or subclass)."""
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def blocks(model: nn.Module) -> nn.Sequential:
    """The model's transformer blocks, bottom-up."""
    return model.blocks


def pool_tokens(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(B, L, D) block output -> (B, D), pooled the way the model's head reads it: the
    CLS token for token pooling (the paper's case), else the mean of the patch tokens
    (prefix tokens such as registers excluded)."""
    if getattr(model, "cls_token", None) is not None and getattr(model, "global_pool", "token") == "token":
        return tokens[:, 0]
    return tokens[:, model.num_prefix_tokens :].mean(dim=1)


def truncate(model: nn.Module, depth: int) -> nn.Module:
    """Keep blocks 1..depth in place and drop the rest (their parameters are freed).

    The final norm and head stay, so the truncated model is
    embedding -> blocks 1..depth -> norm -> head.
    """
    model.blocks = model.blocks[:depth]
    return model

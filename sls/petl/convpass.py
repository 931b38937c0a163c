"""Convpass (Jie & Deng, 2022): convolutional bypasses beside attention and MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import QuickGELU
from timm.models.swin_transformer import SwinTransformerBlock
from torch import nn

from sls.backbones import all_blocks, swin, vit
from sls.errors import ConfigError
from sls.petl import PETLMethod, register_petl


class ConvBypass(nn.Module):
    """Tokens -> down -> QuickGELU -> 3x3 conv over the patch grid -> QuickGELU ->
    dropout -> up, times ``scale``.

    Prefix tokens (class and register tokens) have no neighbours: each is a 1x1 map
    for the same conv, so only the conv's centre tap (and its bias) acts on them.

    Init: ``down`` xavier-uniform; the conv, by ``conv_init``, an identity centre tap
    (``"identity"``: it starts as a per-token pass-through and learns its spatial
    mixing) or xavier-uniform (``"xavier"``), the two inits of the authors' code, which
    picks one per VTAB-1k task; zero biases; ``up`` zero, so the adapted model starts
    equal to the backbone.

    Args:
        dim: token width.
        bottleneck: hidden width (the conv's channels).
        grid_size: the patch-token grid (rows, columns), from the patch embedding, or
            None when every call gives its own.
        num_prefix_tokens: tokens before the patch tokens.
        scale: output factor s.
        dropout: dropout before ``up``.
        conv_init: ``"identity"`` or ``"xavier"``.
    """

    def __init__(
        self,
        dim: int,
        bottleneck: int,
        grid_size: tuple[int, int] | None,
        num_prefix_tokens: int,
        scale: float,
        dropout: float,
        conv_init: str = "identity",
    ) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = QuickGELU()
        self.conv = nn.Conv2d(bottleneck, bottleneck, kernel_size=3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, dim)
        self.grid_size = None if grid_size is None else tuple(int(side) for side in grid_size)
        self.num_prefix_tokens = num_prefix_tokens
        self.scale = scale
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        if conv_init == "xavier":
            nn.init.xavier_uniform_(self.conv.weight)
        elif conv_init == "identity":
            with torch.no_grad():
                self.conv.weight.zero_()
                self.conv.weight[:, :, 1, 1] = torch.eye(bottleneck)
        else:
            raise ConfigError(f"convpass conv_init must be 'identity' or 'xavier', got {conv_init!r}")
        nn.init.zeros_(self.conv.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, grid_size: tuple[int, int] | None = None) -> torch.Tensor:
        """``x``: (B, tokens, dim), prefix tokens first, then the grid in raster order;
        ``grid_size`` replaces the one given at construction (Swin: each call's H, W)."""
        batch, tokens, _ = x.shape
        rows, cols = self.grid_size if grid_size is None else grid_size
        # The prefix count follows from the token count; it must be the model's.
        prefix = tokens - rows * cols
        if prefix != self.num_prefix_tokens:
            raise ConfigError(
                f"convpass was built for a {rows}x{cols} token grid plus {self.num_prefix_tokens} prefix "
                f"tokens, got {tokens} tokens; feed images of the size the model was created with"
            )
        hidden = self.act(self.down(x))
        grid = hidden[:, prefix:].reshape(batch, rows, cols, -1).permute(0, 3, 1, 2)
        patches = self.conv(grid).flatten(2).transpose(1, 2)
        # A 1x1 map under a padded 3x3 conv only meets the centre tap.
        prefix_tokens = F.linear(hidden[:, :prefix], self.conv.weight[:, :, 1, 1], self.conv.bias)
        hidden = self.dropout(self.act(torch.cat([prefix_tokens, patches], dim=1)))
        return self.up(hidden) * self.scale


class WithConvBypass(nn.Module):
    """A block's attention or MLP plus a parallel :class:`ConvBypass` fed by the same
    (norm1 or norm2) input.

    It sits where the branch sat, so on models with LayerScale (DINOv2) the bypass
    output is multiplied by the block's ``ls1`` / ``ls2`` gamma, and dropped with the
    branch by drop-path, like the branch's own output (the authors add it after both;
    they have neither LayerScale nor drop-path at inference).
    """

    def __init__(self, branch: nn.Module, convpass: ConvBypass) -> None:
        super().__init__()
        self.branch = branch
        self.convpass = convpass

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        # kwargs: the attention's mask arguments, passed through untouched.
        return self.branch(x, **kwargs) + self.convpass(x)


class SwinBlockWithConvpass(SwinTransformerBlock):
    """timm's Swin (v1) block with a :class:`ConvBypass` beside attention and one beside
    the MLP, in ``self.convpass["attn"]`` / ``["mlp"]``.

    Each bypass reads the block's normalised (B, H, W, C) tokens *before* the cyclic
    shift, padding and window partition, so its 3x3 conv mixes true grid neighbours
    across window borders; its output is added to the branch's, and drop-path drops
    the sum (as in the SLS authors' Swin code, which adds the bypass beside the
    un-windowed tokens the same way). The forward is timm's, with the two additions;
    with the bypasses zero it is exactly timm's (tested). :meth:`Convpass.insert` sets
    an existing block's class to this one; the block's own modules stay.
    """

    convpass: nn.ModuleDict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, rows, cols, dim = x.shape
        hidden = self.norm1(x)
        bypass = self.convpass["attn"](hidden.reshape(batch, -1, dim), (rows, cols)).reshape(hidden.shape)
        x = x + self.drop_path1(self._attn(hidden) + bypass)
        x = x.reshape(batch, -1, dim)
        hidden = self.norm2(x)
        x = x + self.drop_path2(self.mlp(hidden) + self.convpass["mlp"](hidden, (rows, cols)))
        return x.reshape(batch, rows, cols, dim)


@register_petl
class Convpass(PETLMethod):
    """Two convolutional bypasses per block: beside attention and beside the MLP.

    Works for any token width and patch grid. ViT: each bypass sits beside the branch
    (:class:`WithConvBypass`) on the patch embedding's ``grid_size``, so inputs must
    have the size the model was created with. Swin (v1): each block becomes a
    :class:`SwinBlockWithConvpass`, whose bypasses see the stage's (H, W) token grid
    before the shifted windows. Other families are refused.

    Hyper-parameters: ``bottleneck`` (hidden width), ``scale`` (output factor s),
    ``dropout``, ``conv_init`` (``identity`` or ``xavier``, see :class:`ConvBypass`).
    """

    name = "convpass"
    defaults = {"bottleneck": 8, "scale": 1.0, "dropout": 0.1, "conv_init": "identity"}
    counts = ("bottleneck",)
    param_markers = (".convpass.",)

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        if self.hparams["conv_init"] not in ("identity", "xavier"):
            raise ConfigError(f"convpass conv_init must be 'identity' or 'xavier', got {self.hparams['conv_init']!r}")

    def insert(self, model: nn.Module) -> None:
        options = dict(
            bottleneck=self.hparams["bottleneck"],
            scale=self.hparams["scale"],
            dropout=self.hparams["dropout"],
            conv_init=self.hparams["conv_init"],
        )
        if swin.is_swin(model):
            blocks = all_blocks(model)
            odd = sorted({type(block).__name__ for block in blocks if type(block) is not SwinTransformerBlock})
            if odd:
                raise ConfigError(f"convpass knows timm's SwinTransformerBlock, not {', '.join(odd)}")
            for block in blocks:
                dim = block.norm1.normalized_shape[0]
                block.convpass = nn.ModuleDict(
                    {key: ConvBypass(dim, grid_size=None, num_prefix_tokens=0, **options) for key in ("attn", "mlp")}
                )
                block.__class__ = SwinBlockWithConvpass
            return
        if not vit.is_vit(model):
            raise ConfigError(f"convpass supports ViT and Swin backbones, not {type(model).__name__}")
        options.update(grid_size=model.patch_embed.grid_size, num_prefix_tokens=model.num_prefix_tokens)
        for block in all_blocks(model):
            dim = block.norm1.normalized_shape[0]
            block.attn = WithConvBypass(block.attn, ConvBypass(dim, **options))
            block.mlp = WithConvBypass(block.mlp, ConvBypass(dim, **options))

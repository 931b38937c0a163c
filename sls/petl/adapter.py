"""AdaptFormer (Chen et al., NeurIPS 2022): a bottleneck adapter parallel to each block's MLP.

AdaptFormer's ``AdaptMLP`` reads the block's residual stream (the tokens after the
attention's residual add, *before* the MLP's norm), runs ``down -> ReLU -> dropout ->
up``, scales the result by s = 0.1 and adds it beside the MLP branch: outside the
MLP's drop-path (and, on LayerScale models such as DINOv2, outside its LayerScale).
Its video recipe uses a 64-wide bottleneck, dropout 0.1 and the "lora" init (``down``
Kaiming-uniform, ``up`` and both biases zero, so the adapted model starts equal to the
backbone). Those are the defaults here (``placement="parallel"``), as the authors'
released code runs them (``adapter_layernorm_option="none"``: no norm of its own before
``down``; the paper's equation writes a LayerNorm there).

``placement="mlp"`` is the variant sls shipped before (records that predate the option
load as it): the bottleneck reads the MLP's normalised input and its output joins the
MLP's inside LayerScale and drop-path, with GELU.
"""

from __future__ import annotations

import math

import torch
from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.vision_transformer import Block
from torch import nn

from sls.backbones import all_blocks
from sls.errors import ConfigError
from sls.petl import PETLMethod, register_petl

PLACEMENTS = ("parallel", "mlp")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


class Bottleneck(nn.Module):
    """x -> up(dropout(act(down(x)))) * scale, with ``up`` zero-initialised so the
    adapted model starts equal to the backbone."""

    def __init__(self, dim: int, bottleneck: int, scale: float, dropout: float, activation: str = "relu") -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, dim)
        self.scale = scale
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(x)))) * self.scale


class MlpWithAdapter(nn.Module):
    """``placement="mlp"``: the block's MLP plus a parallel bottleneck fed by the same
    (norm2) input; its output is scaled by the block's LayerScale and dropped by its
    drop-path like the MLP's."""

    def __init__(self, mlp: nn.Module, adapter: Bottleneck) -> None:
        super().__init__()
        self.mlp = mlp
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x) + self.adapter(x)


class ViTBlockWithAdapter(Block):
    """timm's ViT block with AdaptFormer's parallel adapter in ``self.adapter``: it reads
    the residual stream between attention and MLP and is added beside the MLP branch.
    The forward is timm's with that one addition; with ``adapter.up`` zero it is exactly
    timm's (tested). :meth:`Adapter.insert` sets an existing block's class to this one."""

    adapter: Bottleneck

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)))) + self.adapter(x)


class SwinBlockWithAdapter(SwinTransformerBlock):
    """timm's Swin (v1) block with AdaptFormer's parallel adapter, as :class:`ViTBlockWithAdapter`."""

    adapter: Bottleneck

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, rows, cols, dim = x.shape
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        x = x.reshape(batch, -1, dim)
        x = x + self.drop_path2(self.mlp(self.norm2(x))) + self.adapter(x)
        return x.reshape(batch, rows, cols, dim)


_PARALLEL_BLOCKS = {Block: ViTBlockWithAdapter, SwinTransformerBlock: SwinBlockWithAdapter}


@register_petl
class Adapter(PETLMethod):
    """AdaptFormer's parallel bottleneck adapter beside every block's MLP.

    Hyper-parameters: ``bottleneck`` (hidden width, 64), ``scale`` (output factor s,
    0.1), ``dropout`` (0.1), ``activation`` (``relu`` or ``gelu``) and ``placement``
    (``parallel``: AdaptFormer's; ``mlp``: inside the MLP branch, see the module docstring).
    """

    name = "adapter"
    defaults = {"bottleneck": 64, "scale": 0.1, "dropout": 0.1, "activation": "relu", "placement": "parallel"}
    legacy_defaults = {"bottleneck": 8, "scale": 1.0, "dropout": 0.0, "activation": "gelu", "placement": "mlp"}
    counts = ("bottleneck",)
    param_markers = (".adapter.",)

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        if self.hparams["placement"] not in PLACEMENTS:
            raise ConfigError(f"adapter placement must be one of {', '.join(PLACEMENTS)}, got {self.hparams['placement']!r}")
        if self.hparams["activation"] not in ACTIVATIONS:
            raise ConfigError(f"adapter activation must be one of {', '.join(ACTIVATIONS)}, "
                              f"got {self.hparams['activation']!r}")  # fmt: skip

    def insert(self, model: nn.Module) -> None:
        options = {key: self.hparams[key] for key in ("bottleneck", "scale", "dropout", "activation")}
        blocks = all_blocks(model)
        if self.hparams["placement"] == "mlp":
            for block in blocks:
                block.mlp = MlpWithAdapter(block.mlp, Bottleneck(block.norm2.normalized_shape[0], **options))
            return
        odd = sorted({type(block).__name__ for block in blocks if type(block) not in _PARALLEL_BLOCKS})
        if odd:
            raise ConfigError(f"the parallel adapter knows timm's Block and SwinTransformerBlock, not {', '.join(odd)}; "
                              "use --petl-option placement=mlp")  # fmt: skip
        for block in blocks:
            block.adapter = Bottleneck(block.norm2.normalized_shape[0], **options)
            block.__class__ = _PARALLEL_BLOCKS[type(block)]

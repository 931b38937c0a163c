"""AdaptFormer-style bottleneck adapter, parallel to each block's MLP."""

from __future__ import annotations

import torch
from torch import nn

from sls.backbones import all_blocks
from sls.petl import PETLMethod, register_petl


class Bottleneck(nn.Module):
    """x -> up(dropout(GELU(down(x)))) * scale, with ``up`` zero-initialised so the
    adapted model starts equal to the backbone."""

    def __init__(self, dim: int, bottleneck: int, scale: float, dropout: float) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, dim)
        self.scale = scale
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(x)))) * self.scale


class MlpWithAdapter(nn.Module):
    """The block's MLP plus a parallel bottleneck fed by the same (norm2) input.

    It sits where the MLP sat, so on models with LayerScale (DINOv2) its output is
    multiplied by the block's ``ls2`` gamma like the MLP's.
    """

    def __init__(self, mlp: nn.Module, adapter: Bottleneck) -> None:
        super().__init__()
        self.mlp = mlp
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x) + self.adapter(x)


@register_petl
class Adapter(PETLMethod):
    """Parallel bottleneck adapter (AdaptFormer) beside every block's MLP.

    Hyper-parameters: ``bottleneck`` (hidden width), ``scale`` (output factor s),
    ``dropout``.
    """

    name = "adapter"
    defaults = {"bottleneck": 8, "scale": 1.0, "dropout": 0.0}
    counts = ("bottleneck",)
    param_markers = (".adapter.",)

    def insert(self, model: nn.Module) -> None:
        for block in all_blocks(model):
            dim = block.norm2.normalized_shape[0]
            bottleneck = Bottleneck(dim, self.hparams["bottleneck"], self.hparams["scale"], self.hparams["dropout"])
            block.mlp = MlpWithAdapter(block.mlp, bottleneck)

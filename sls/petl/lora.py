"""LoRA (Hu et al., ICLR 2022), injected into the timm model itself (no wrapper class).

The LoRA paper adapts the query and value projections, each with its own pair of
low-rank factors. timm fuses q, k and v into one ``qkv`` linear, so adapting ``qkv``
with peft would give q, k and v one shared ``A`` and update k as well. The target
names ``q``, ``k`` and ``v`` therefore mean the rows of every fused ``qkv`` layer:
:class:`QKVLoRA` gives each named part its own ``A`` and ``B`` (the default, ``q,v``,
is the paper's). Any other target name (``qkv``, ``proj``, ``fc1``, ...) is a whole
linear layer adapted through peft, as in peft's own timm examples.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sls.errors import ConfigError
from sls.petl import PETLMethod, register_petl

QKV_PARTS = ("q", "k", "v")


class QKVLoRA(nn.Module):
    """A fused ``qkv`` linear plus a low-rank update of some of its thirds.

    ``y = base(x) + scaling * [B_q A_q x ; B_k A_k x ; B_v A_v x]`` with the update of a
    part not in ``parts`` zero. peft's init: ``A`` Kaiming-uniform, ``B`` zero (the
    adapted model starts equal to the backbone); ``scaling = alpha / r``; dropout on
    the update's input. The base layer is kept as ``base_layer`` (peft's name).
    """

    def __init__(self, base: nn.Linear, parts: tuple[str, ...], r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        if base.out_features % 3:
            raise ConfigError(f"a qkv layer must have 3 x width outputs, got {base.out_features}")
        self.base_layer = base
        self.parts = tuple(part for part in QKV_PARTS if part in parts)
        width = base.out_features // 3
        self.lora_A = nn.ModuleDict({part: nn.Linear(base.in_features, r, bias=False) for part in self.parts})
        self.lora_B = nn.ModuleDict({part: nn.Linear(r, width, bias=False) for part in self.parts})
        self.dropout = nn.Dropout(dropout)
        self.scaling = alpha / r
        for part in self.parts:
            nn.init.kaiming_uniform_(self.lora_A[part].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[part].weight)

    def delta_weight(self) -> torch.Tensor:
        """The update of the base weight, ``(3 * width, in_features)``."""
        base = self.base_layer.weight
        rows = [
            self.lora_B[part].weight @ self.lora_A[part].weight * self.scaling
            if part in self.parts
            else base.new_zeros(base.shape[0] // 3, base.shape[1])
            for part in QKV_PARTS
        ]
        return torch.cat(rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        hidden = self.dropout(x)
        width = out.shape[-1] // 3
        updates = [
            self.lora_B[part](self.lora_A[part](hidden)) * self.scaling if part in self.parts
            else out.new_zeros(*out.shape[:-1], width)  # fmt: skip
            for part in QKV_PARTS
        ]
        return out + torch.cat(updates, dim=-1)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base linear with the update folded in (a new layer; this one is untouched)."""
        base = self.base_layer
        linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=base.weight.device, dtype=base.weight.dtype)  # fmt: skip
        linear.weight.copy_(base.weight + self.delta_weight().to(base.weight.dtype))
        if base.bias is not None:
            linear.bias.copy_(base.bias)
        linear.requires_grad_(base.weight.requires_grad)
        return linear


@register_petl
class LoRA(PETLMethod):
    """Low-rank updates of the target layers (default: the query and value projections).

    Hyper-parameters: ``r`` (rank), ``alpha`` (the update is scaled by alpha / r),
    ``dropout`` and ``target_modules``: ``q``, ``k``, ``v`` (thirds of the fused
    ``qkv`` layers, each with its own factors) and / or linear-layer name suffixes
    adapted through peft (``qkv`` whole, with one shared ``A``, is sls's earlier default).
    """

    name = "lora"
    defaults = {"r": 8, "alpha": 8, "dropout": 0.0, "target_modules": ["q", "v"]}
    legacy_defaults = {"target_modules": ["qkv"]}
    counts = ("r",)
    param_markers = ("lora_A", "lora_B")

    def insert(self, model: nn.Module) -> None:
        targets = list(self.hparams["target_modules"])
        parts = tuple(name for name in targets if name in QKV_PARTS)
        others = [name for name in targets if name not in QKV_PARTS]
        if parts and "qkv" in others:
            raise ConfigError("lora target_modules: name either qkv (the whole layer) or its thirds q, k, v, not both")
        if parts:
            self._insert_qkv(model, parts)
        if others:
            self._insert_peft(model, others)

    def _insert_qkv(self, model: nn.Module, parts: tuple[str, ...]) -> None:
        layers = [(name, module) for name, module in model.named_modules()
                  if name.rsplit(".", 1)[-1] == "qkv" and isinstance(module, nn.Linear)]  # fmt: skip
        if not layers:
            raise ConfigError(f"lora target_modules {', '.join(parts)} name thirds of fused qkv layers, and "
                              f"{type(model).__name__} has none; name its linear layers instead (e.g. qkv)")  # fmt: skip
        for name, linear in layers:
            parent, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent), attribute,
                    QKVLoRA(linear, parts, self.hparams["r"], self.hparams["alpha"], self.hparams["dropout"]))  # fmt: skip

    def _insert_peft(self, model: nn.Module, targets: list[str]) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(
            r=self.hparams["r"],
            lora_alpha=self.hparams["alpha"],
            lora_dropout=self.hparams["dropout"],
            target_modules=targets,
            bias="none",
        )
        try:
            inject_adapter_in_model(config, model)
        except ValueError as err:  # peft's NoMatchingPeftModuleError, among others
            linears = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise ConfigError(f"lora cannot adapt target_modules={targets} in "
                              f"{type(model).__name__} ({err}); its linear layers are named: "
                              f"{', '.join(linears)}") from None  # fmt: skip

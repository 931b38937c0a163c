"""LoRA through peft, injected into the timm model itself (no wrapper class)."""

from __future__ import annotations

from torch import nn

from sls.errors import ConfigError
from sls.petl import PETLMethod, register_petl


@register_petl
class LoRA(PETLMethod):
    """Low-rank updates of the target linear layers (default: the attention ``qkv``).

    Hyper-parameters: ``r`` (rank), ``alpha`` (peft's ``lora_alpha``; the update is
    scaled by alpha / r), ``dropout`` and ``target_modules`` (module name suffixes).
    """

    name = "lora"
    defaults = {"r": 8, "alpha": 8, "dropout": 0.0, "target_modules": ["qkv"]}
    counts = ("r",)
    param_markers = ("lora_A", "lora_B")

    def insert(self, model: nn.Module) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(
            r=self.hparams["r"],
            lora_alpha=self.hparams["alpha"],
            lora_dropout=self.hparams["dropout"],
            target_modules=list(self.hparams["target_modules"]),
            bias="none",
        )
        try:
            inject_adapter_in_model(config, model)
        except ValueError as err:  # peft's NoMatchingPeftModuleError, among others
            linears = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise ConfigError(f"lora cannot adapt target_modules={self.hparams['target_modules']} in "
                              f"{type(model).__name__} ({err}); its linear layers are named: "
                              f"{', '.join(linears)}") from None  # fmt: skip

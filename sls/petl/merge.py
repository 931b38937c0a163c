"""Folding PETL modules into the backbone for inference: LoRA into its linears,
RepAdapter into the layer after it. What is timed, compared and exported."""

from __future__ import annotations

import copy

from torch import nn

from sls.petl import PETLMethod, create_petl, list_petl


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer (sls's :class:`~sls.petl.lora.QKVLoRA` and peft's) into its
    base linear and put that linear in its place.

    In place. The fold is ``W + (alpha / r) * B @ A``, exact up to float rounding; LoRA
    dropout is an identity at inference, so nothing else is lost. Returns ``model``.
    """
    from sls.petl.lora import QKVLoRA

    for name, layer in [(name, m) for name, m in model.named_modules() if isinstance(m, QKVLoRA)]:
        parent_name, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attribute, layer.merged())
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # without peft there is no LoRA layer to fold
        return model
    lora_layers = [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    for name, layer in lora_layers:
        layer.merge()
        parent_name, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attribute, layer.get_base_layer())
    if lora_layers and "peft_config" in vars(model):
        # peft's record of the injected adapters: stale now, and a later injection
        # (retraining with LoRA) would otherwise take the model for a multi-adapter one.
        del model.peft_config
    return model


def merge_for_inference(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with LoRA folded into its base linears.

    Any other PETL module (adapters, ...) is left as it is. ``model`` is untouched.
    """
    merged = merge_lora(copy.deepcopy(model))
    return merged.eval()


def deployable_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` as it is deployed: eval mode, LoRA folded into its base
    linears and every re-parameterisable PETL module (RepAdapter) folded into the
    layer after it.

    Modules that cannot fold (adapter, Convpass) stay. This is the model to time and
    to export: a merged RepAdapter costs nothing at inference. ``model`` is untouched.
    """
    deployable = merge_for_inference(model)
    for method in petl_left(deployable):
        petl = create_petl(method)
        if type(petl).merge is not PETLMethod.merge:  # the method can fold its modules away
            petl.merge(deployable)
    return deployable.eval()


def petl_left(model: nn.Module) -> list[str]:
    """Names of the PETL methods whose parameters are still in ``model``."""
    names = [name for name, _ in model.named_parameters()]
    return [method for method in list_petl() if any(create_petl(method).is_petl_param(n) for n in names)]

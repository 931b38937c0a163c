"""Standalone deployment of a task's model, with no sls or peft needed to run it.

:func:`merge_for_inference` folds LoRA into the linear layers it adapts, so the model
is a plain timm ViT again (other PETL modules stay, as modules); :func:`deployable_model`
also folds RepAdapter away. :func:`export_model` writes that model in one of three formats:

- ``safetensors``: the full state dict plus a JSON metadata string (``timm_name``,
  ``timm_kwargs``, ``depth``, ``num_classes``, ``img_size``, and the PETL modules left
  in it). With none left, it loads into ``timm.create_model(timm_name, **timm_kwargs)``:
  the kwargs are the run's ``model_kwargs`` plus the kept depth (ViT: ``depth``; Swin:
  ``depths`` and ``num_heads`` of the kept stages, the final norm and head at the kept
  width), ``num_classes`` and ``img_size``.
- ``torchscript``: ``torch.jit.trace`` of the model on one image of the model's size.
- ``onnx``: opset 17, the batch axis dynamic, checked to load in onnxruntime when that
  is installed.

The traced formats fix the image side: feed images of the size the model was built for.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from sls._io import atomic_write
from sls.backbones import num_blocks, swin, vit
from sls.errors import ConfigError
from sls.petl.merge import deployable_model, merge_for_inference, merge_lora, petl_left
from sls.runtime import Runtime

__all__ = ["deployable_model", "export_model", "merge_for_inference", "merge_lora", "predict", "read_export_metadata"]

FORMATS = ("safetensors", "torchscript", "onnx")
METADATA_KEY = "sls_export"
"""Key of the JSON metadata string in an exported ``.safetensors`` file's header."""
EXPORT_FORMAT_VERSION = 2
ONNX_OPSET = 17


def _image_side(model: nn.Module, img_size: int | None) -> tuple[int, int]:
    if img_size is not None:
        if img_size < 1:
            raise ConfigError(f"img_size must be a positive number of pixels, got {img_size}")
        return img_size, img_size
    patch_embed = getattr(model, "patch_embed", None)
    side = getattr(patch_embed, "img_size", None)
    if side is None:
        raise ConfigError(f"cannot tell the input size of {type(model).__name__}; pass img_size")
    return int(side[0]), int(side[1])


def _attention_heads(block: nn.Module) -> int:
    """Heads of a Swin block's window attention (wrapped by a PETL module or not)."""
    from timm.models.swin_transformer import WindowAttention

    return next(m for m in block.modules() if isinstance(m, WindowAttention)).num_heads


def export_metadata(model: nn.Module, img_size: tuple[int, int], model_kwargs: dict | None = None) -> dict:
    """What a reader needs to rebuild ``model`` (a merged, truncated timm ViT or Swin)
    from its state dict; ``model_kwargs``: the extra ``timm.create_model`` arguments it
    was built with (the record's ``backbone.model_kwargs``)."""
    timm_name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if timm_name is None:
        raise ConfigError(f"{type(model).__name__} is not a timm model (no pretrained_cfg architecture)")
    height, width = img_size
    side = height if height == width else [height, width]
    kwargs = dict(model_kwargs or {})
    if swin.is_swin(model):
        kwargs["depths"] = [len(stage.blocks) for stage in model.layers]
        kwargs["num_heads"] = [_attention_heads(stage.blocks[0]) for stage in model.layers]
    elif vit.is_vit(model):
        kwargs["depth"] = len(model.blocks)
    else:
        raise ConfigError(f"sls exports timm ViT and Swin models, not {type(model).__name__}")
    kwargs.update(num_classes=int(model.num_classes), img_size=side)
    return {
        "format": EXPORT_FORMAT_VERSION,
        "timm_name": timm_name,
        "timm_kwargs": kwargs,
        "depth": num_blocks(model),
        "num_classes": int(model.num_classes),
        "img_size": side,
        "petl": petl_left(model),
    }


def _write_safetensors(model: nn.Module, path: Path, example: torch.Tensor, metadata: dict) -> None:
    from safetensors.torch import save_file

    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    # "format": "pt" is the header tag other safetensors readers use to pick torch.
    save_file(state, str(path), metadata={"format": "pt", METADATA_KEY: json.dumps(metadata)})


def _write_torchscript(model: nn.Module, path: Path, example: torch.Tensor, metadata: dict) -> None:
    with warnings.catch_warnings():
        # timm's input-size checks freeze into the trace; the fixed size is intended.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # Newer torch deprecates TorchScript; the format was asked for by name, so no warning.
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, str(path))


def _write_onnx(model: nn.Module, path: Path, example: torch.Tensor, metadata: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # The TorchScript-based exporter, deprecated but chosen: the torch.export-based
        # default needs onnxscript, which sls does not depend on.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        )
    import onnx

    onnx.checker.check_model(str(path))
    try:
        import onnxruntime
    except ImportError:
        return
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": example.cpu().numpy()})
    if logits.shape != (example.shape[0], metadata["num_classes"]):
        raise RuntimeError(f"the ONNX model at {path} gives logits of shape {logits.shape}")


_WRITERS = {"safetensors": _write_safetensors, "torchscript": _write_torchscript, "onnx": _write_onnx}


def export_model(
    model: nn.Module,
    path: str | Path,
    format: str,
    *,
    img_size: int | None = None,
    model_kwargs: dict | None = None,
) -> Path:
    """Write ``model`` with LoRA folded in as a standalone file, atomically.

    Args:
        model: a task's model (a truncated timm ViT or Swin with PETL modules, as
            :func:`sls.experiment.load_task` returns it); left untouched.
        path: the file to write.
        format: ``"safetensors"``, ``"torchscript"`` or ``"onnx"``.
        img_size: input side in pixels; default: the model's patch embedding size.
        model_kwargs: the extra ``timm.create_model`` arguments the backbone was built
            with, stored in the safetensors metadata to rebuild it.

    Returns:
        ``path``.

    Raises:
        ConfigError: an unknown format, or a model whose input size or timm name
            cannot be told.
    """
    if format not in _WRITERS:
        raise ConfigError(f"unknown export format {format!r}; choose one of: {', '.join(FORMATS)}")
    merged = merge_for_inference(model)
    side = _image_side(merged, img_size)
    metadata = export_metadata(merged, side, model_kwargs)
    device = next(merged.parameters()).device
    # Values only matter for data-dependent branches, of which a ViT has none.
    example = torch.randn(1, 3, *side, generator=torch.Generator().manual_seed(0)).to(device)
    write = _WRITERS[format]
    return atomic_write(path, lambda tmp: write(merged, tmp, example, metadata))


def read_export_metadata(path: str | Path) -> dict:
    """The metadata :func:`export_model` stored in a ``.safetensors`` export."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"{path} is not a readable .safetensors export ({' '.join(str(err).split())[:120]})") from None
    if METADATA_KEY not in header:
        raise ConfigError(f"{path} was not exported by sls (no {METADATA_KEY!r} metadata)")
    try:
        return json.loads(header[METADATA_KEY])
    except ValueError:
        raise ConfigError(f"{path}: its {METADATA_KEY!r} metadata is not JSON; the export is damaged") from None


@torch.inference_mode()
def predict(model: nn.Module, images: torch.Tensor, *, runtime: Runtime | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Class predictions for a batch of preprocessed images.

    Args:
        model: a classifier (a task's model, merged or not); put in eval mode.
        images: ``(n, 3, H, W)`` images, normalised as the model expects.
        runtime: precision and layout (:mod:`sls.runtime`); the images go to the model's device.

    Returns:
        ``labels``: the ``(n,)`` most probable classes, and ``probabilities``: the
        ``(n, num_classes)`` softmax over classes.
    """
    if images.dim() != 4:
        raise ConfigError(f"predict takes a batch of images (n, 3, H, W), got shape {tuple(images.shape)}")
    model.eval()
    runtime, device = runtime or Runtime(), next(model.parameters()).device
    with torch.inference_mode(), runtime.autocast(device):
        probabilities = model(runtime.inputs(images, device)).float().softmax(dim=-1).cpu()
    return probabilities.argmax(dim=-1), probabilities

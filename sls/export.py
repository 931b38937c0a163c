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

:func:`export_peft` writes a LoRA task unmerged, as a peft adapter folder
(``adapter_model.safetensors``, ``adapter_config.json`` and a ``README.md`` on how to
load it) that ``peft.PeftModel.from_pretrained`` puts on the timm model cut to k blocks.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from sls._io import atomic_write, write_json, write_text
from sls.backbones import num_blocks, swin, vit
from sls.errors import ConfigError
from sls.petl import head_parameter_names, trainable_state
from sls.petl.merge import deployable_model, merge_for_inference, merge_lora, petl_left
from sls.runtime import Runtime

__all__ = ["deployable_model", "export_model", "export_peft", "merge_for_inference", "merge_lora", "predict",
           "read_export_metadata"]

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
    expected = (example.shape[0], metadata["num_classes"])
    if metadata.get("task") == "segmentation":
        expected = (*expected, *example.shape[-2:])
    if logits.shape != expected:
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
    dense = getattr(merged, "is_dense_model", False)
    if dense and format != "safetensors" and getattr(merged, "detector", None):
        raise ConfigError(f"a detection task exports as safetensors only: torchvision's {merged.detector} "
                          "post-processing (score filter, NMS) does not trace to a fixed graph")  # fmt: skip
    side = _image_side(merged.encoder if dense else merged, img_size)
    metadata = export_metadata(merged.encoder if dense else merged, side, model_kwargs)
    if dense:  # the encoder's timm architecture plus the task's head, which only sls builds
        task = "detection" if getattr(merged, "detector", None) else "segmentation"
        metadata.update(task=task, num_classes=int(merged.num_classes), loader="sls",
                        outputs="logits (batch, classes, height, width)" if task == "segmentation" else
                        "per image {boxes, scores, labels}")  # fmt: skip
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


PEFT_WEIGHTS, PEFT_CONFIG, PEFT_README = "adapter_model.safetensors", "adapter_config.json", "README.md"
_PEFT_PREFIX = "base_model.model."
"""What peft's saved keys start with: the path of the wrapped model inside a ``PeftModel``."""


def check_peft_exportable(methods: list[str]) -> None:
    """Refuse a task whose PETL method is not LoRA (``methods``: the methods it uses)."""
    others = [method for method in methods if method != "lora"]
    if others or not methods:
        used = ", ".join(others) or "no PETL module"
        raise ConfigError(f"the peft format holds LoRA adapters, and this task uses {used}; export it as "
                          f"{', '.join(FORMATS)} instead (--format)")  # fmt: skip


@torch.no_grad()
def _lora_layers(model: nn.Module) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, float]], float]:
    """Every LoRA layer of ``model`` as peft holds it, ``{module path: (lora_A weight,
    lora_B weight, lora_alpha)}`` with peft's ``lora_alpha / r`` the layer's scaling;
    and the layers' dropout probability.

    sls's :class:`~sls.petl.lora.QKVLoRA` with parts P becomes one LoRA of rank
    ``len(P) * r`` on the fused ``qkv``: ``A`` the parts' ``A`` stacked, ``B`` block
    structured (the rows of a part read only its own ``r`` columns; the rows of a part
    not adapted are zero), which gives the same update ``[B_q A_q x; 0; B_v A_v x]``.
    """
    from peft.tuners.lora import LoraLayer

    from sls.petl.lora import QKV_PARTS, QKVLoRA

    layers, dropout = {}, 0.0
    for name, module in model.named_modules():
        if isinstance(module, QKVLoRA):
            rank, width = module.lora_A[module.parts[0]].out_features, module.base_layer.out_features // 3
            lora_a = torch.cat([module.lora_A[part].weight for part in module.parts])
            lora_b = lora_a.new_zeros(3 * width, len(module.parts) * rank)
            for column, part in enumerate(module.parts):
                row = QKV_PARTS.index(part) * width
                lora_b[row : row + width, column * rank : (column + 1) * rank] = module.lora_B[part].weight
            layers[name] = (lora_a, lora_b, module.scaling * lora_b.shape[1])
            dropout = module.dropout.p
        elif isinstance(module, LoraLayer):
            (adapter,) = module.lora_A.keys()  # sls injects one adapter, peft's "default"
            lora_a, lora_b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            layers[name] = (lora_a, lora_b, module.scaling[adapter] * lora_a.shape[0])
            dropout = getattr(module.lora_dropout[adapter], "p", 0.0)  # an Identity at 0
    tensors = {name: (a.detach().cpu().contiguous(), b.detach().cpu().contiguous(), alpha)
               for name, (a, b, alpha) in layers.items()}  # fmt: skip
    return tensors, dropout


def _peft_matches(name: str, target: str) -> bool:
    # peft's rule for a list of target_modules: the whole path, or its end after a dot.
    return name == target or name.endswith(f".{target}")


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _lora_config(model: nn.Module, layers: dict, modules_to_save: list[str], dropout: float, base_model: str) -> dict:
    """``adapter_config.json``: peft's own ``LoraConfig`` fields, targeting exactly ``layers``."""
    from peft import LoraConfig

    # The layers' own names (qkv, fc1, ...) when they pick out exactly the adapted
    # layers, as in peft's examples; their full paths otherwise.
    paths = set(layers)
    short = sorted({path.rpartition(".")[2] for path in paths})
    matched = {name for name, _ in model.named_modules() if any(_peft_matches(name, t) for t in short)}
    targets = short if matched == paths else sorted(paths)
    shape = {t: {(layers[p][0].shape[0], layers[p][2]) for p in paths if _peft_matches(p, t)} for t in targets}
    if any(len(kinds) > 1 for kinds in shape.values()):  # one name, several ranks: name each layer
        targets = sorted(paths)
        shape = {t: {(layers[t][0].shape[0], layers[t][2])} for t in targets}
    (rank, alpha), *_ = shape[targets[0]]
    config = LoraConfig(
        r=rank,
        lora_alpha=_number(alpha),
        lora_dropout=dropout,
        target_modules=targets,
        rank_pattern={t: r for t in targets for r, _ in shape[t] if r != rank},
        alpha_pattern={t: _number(a) for t in targets for _, a in shape[t] if a != alpha},
        modules_to_save=modules_to_save or None,
        bias="none",
        use_rslora=False,  # peft's scaling is then lora_alpha / r, as above
        inference_mode=True,
        base_model_name_or_path=base_model,
    ).to_dict()
    # As PeftModel.save_pretrained writes it: sets as lists, and the model's class.
    config = {key: sorted(value) if isinstance(value, set) else value for key, value in config.items()}
    config["auto_mapping"] = {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}
    return dict(sorted(config.items()))


def _peft_readme(metadata: dict, backbone: dict, modules_to_save: list[str], out_dir: Path) -> str:
    """How a peft user rebuilds the model: the backbone as sls built it, its first k
    blocks copied into the pruned timm architecture, then the adapter. Both models are
    built from the name sls built the backbone from (an ``hf-hub:`` name brings its
    config's architecture arguments)."""
    name, size = backbone.get("timm_name", metadata["timm_name"]), backbone.get("img_size", metadata["img_size"])
    model_kwargs, weights = backbone.get("model_kwargs") or {}, backbone.get("weights", "timm")
    if weights == "random":
        build = ["from sls.backbones import create_backbone  # sls's seeded random weights",
                 f"backbone, _ = create_backbone({backbone.get('model', name)!r}, num_classes=0, weights='random', "
                 f"img_size={size}, model_kwargs={model_kwargs!r})"]  # fmt: skip
    else:
        options = "".join(f", {key}={value!r}" for key, value in model_kwargs.items())
        overlay = "" if weights == "timm" else f", pretrained_cfg_overlay=dict(file={weights!r})"
        build = [f"backbone = timm.create_model({name!r}, pretrained=True, num_classes=0, "
                 f"img_size={size}{options}{overlay})"]
    inputs = f"{size} px images"
    if "mean" in backbone and "std" in backbone:
        inputs += f" normalised with mean {tuple(backbone['mean'])} and std {tuple(backbone['std'])}"
    return "\n".join([
        f"# LoRA adapter for {name}, cut to its first {metadata['depth']} blocks by sls",
        "",
        "peft loads it onto the timm model of the kept blocks, holding the backbone's weights:",
        "",
        "```python",
        "import timm",
        "from peft import PeftModel",
        "",
        *build,
        f"model = timm.create_model({name!r}, **{metadata['timm_kwargs']!r})",
        "own = model.state_dict()  # the head (and a norm of another width) come from the adapter",
        "model.load_state_dict({key: value for key, value in backbone.state_dict().items()",
        "                       if key in own and value.shape == own[key].shape}, strict=False)",
        f"model = PeftModel.from_pretrained(model, {str(out_dir)!r}).eval()",
        "```",
        "",
        f"The adapter holds the LoRA layers and, as peft's `modules_to_save`, "
        f"{', '.join(f'`{module}`' for module in modules_to_save)}.",
        f"Inputs: {inputs}. `model.merge_and_unload()` folds LoRA in for deployment.",
        "",
    ])  # fmt: skip


def export_peft(model: nn.Module, out_dir: str | Path, *, backbone: dict | None = None) -> Path:
    """Write a LoRA task as a peft adapter folder, each file atomically.

    ``adapter_model.safetensors`` holds the LoRA factors under peft's key names
    (``base_model.model.<layer>.lora_A.weight`` / ``lora_B.weight``) and the task's other
    tensors (the head; a Swin's fresh final norm) as peft's ``modules_to_save``
    (``base_model.model.<module>.<tensor>``), with the export metadata of the
    safetensors format (:func:`read_export_metadata` reads it). ``adapter_config.json``
    is peft's ``LoraConfig``. ``PeftModel.from_pretrained`` then loads the folder onto
    ``timm.create_model(timm_name, **timm_kwargs)`` holding the backbone's weights,
    which gives this model's outputs (``README.md`` in the folder shows how).

    Args:
        model: a LoRA task's model (as :func:`sls.experiment.load_task` returns it); left untouched.
        out_dir: the folder to write (created if need be).
        backbone: the record's backbone entry (``timm_name``, ``weights``, ``img_size``,
            ``model_kwargs``, ``mean``, ``std``), for the config and the README.

    Returns:
        ``out_dir``.

    Raises:
        ConfigError: the model has PETL modules other than LoRA, or none.
    """
    from safetensors.torch import save_file

    check_peft_exportable(petl_left(model))
    backbone, out_dir = backbone or {}, Path(out_dir)
    layers, dropout = _lora_layers(model)
    inside_lora = tuple(f"{path}." for path in layers)
    task_tensors = set(trainable_state(model)) | head_parameter_names(model)
    owners = sorted({name.rpartition(".")[0] for name in task_tensors if not name.startswith(inside_lora)})
    if "" in owners:  # peft saves whole modules, and the model itself is not one
        own = ", ".join(name for name in sorted(task_tensors) if "." not in name)
        raise ConfigError(f"the peft format cannot hold task tensors of the model itself ({own}); "
                          "export it as safetensors")
    # peft wraps every module whose path ends with a modules_to_save name (no dot
    # needed), and loading needs the tensors of each: write them all.
    wrapped = [name for name, _ in model.named_modules() if name and any(name.endswith(o) for o in owners)]
    state = {}
    for path, (lora_a, lora_b, _) in layers.items():
        state[f"{_PEFT_PREFIX}{path}.lora_A.weight"], state[f"{_PEFT_PREFIX}{path}.lora_B.weight"] = lora_a, lora_b
    for module in wrapped:
        for key, tensor in model.get_submodule(module).state_dict().items():
            state[f"{_PEFT_PREFIX}{module}.{key}"] = tensor.detach().cpu().contiguous()
    metadata = export_metadata(model, _image_side(model, backbone.get("img_size")), backbone.get("model_kwargs"))
    config = _lora_config(model, layers, owners, dropout, backbone.get("timm_name", metadata["timm_name"]))
    header = {"format": "pt", METADATA_KEY: json.dumps(metadata)}
    atomic_write(out_dir / PEFT_WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata=header))
    write_text(out_dir / PEFT_README, _peft_readme(metadata, backbone, owners, out_dir))
    write_json(out_dir / PEFT_CONFIG, config)  # last: a folder with a config is a whole adapter
    return out_dir


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

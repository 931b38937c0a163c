"""Backbones: creating a timm model from a name and weights, per-block features, truncation.

Two families, one interface: timm's VisionTransformer and its subclasses
(:mod:`sls.backbones.vit`: DINOv2, DeiT, augreg / in21k ViTs, with or without a class
token) and timm's SwinTransformer v1 (:mod:`sls.backbones.swin`). The generic
functions here dispatch on the family; blocks are numbered 1..N bottom-up (across
the stages for Swin).

Every ``.safetensors`` / ``.pth`` weight source is read by sls itself
(:func:`read_checkpoint`: safetensors, or ``torch.load(weights_only=True)``, never a
code-running pickle whatever the installed timm does), passed through the model
family's own timm ``checkpoint_filter_fn`` (position-embedding resampling, layout
conversion), and loaded with its keys checked from ``load_state_dict``'s answer:
the embedded model's converted checkpoint exactly like a user's ``--weights FILE``. A
JAX ``.npz`` checkpoint (the original ``ViT-B_16.npz`` or a big_vision one) goes
through timm's ViT loader ``model.load_pretrained``; see :func:`create_backbone`.

A model may also be a Hugging Face hub repository, ``hf-hub:ORG/NAME[@REVISION]`` (or a
local folder of the same files, ``local-dir:PATH``): timm reads the architecture and its
arguments from the repository's ``config.json``, through huggingface_hub's cache, so a
populated cache with ``HF_HUB_OFFLINE=1`` works without a network.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import pickle
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors import SafetensorError
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from sls import distributed
from sls.backbones import swin, vit
from sls.errors import ConfigError, SLSError, UnknownModelError

RANDOM_WEIGHTS = "random"
"""``weights`` value that builds the architecture with random weights, always the same
ones (seed 0): for tests and smoke runs."""

HEAD_PREFIXES = ("head.", "head_dist.")
"""State-dict prefixes of the classifier (a distilled DeiT has a second head): task
parameters, never part of the backbone's fingerprint."""

_FAMILIES = {"vit": vit, "swin": swin}


@dataclass(frozen=True)
class BackboneInfo:
    """What a task record needs to rebuild the same backbone.

    Attributes:
        model: the name the user gave (an embedded name or a timm name).
        timm_name: the name given to ``timm.create_model``: the timm architecture, or
            the ``hf-hub:`` / ``local-dir:`` name itself, whose config.json holds the
            architecture and its arguments.
        weights: the weights file loaded, ``"random"``, or ``"timm"`` (timm's own source).
        fingerprint: sha256 of the backbone tensors (names, shapes, dtypes and values;
            the classifier head excluded), independent of the file format.
        family: ``"vit"`` or ``"swin"``.
        num_blocks: N.
        img_size: input side in pixels.
        mean, std, interpolation: the model's preprocessing, from its pretrained config.
        model_kwargs: extra architecture arguments given to ``timm.create_model``.
    """

    model: str
    timm_name: str
    weights: str
    fingerprint: str
    family: str
    num_blocks: int
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    model_kwargs: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def _model_options_checked(timm_name: str, model_kwargs: dict):
    """Turn timm's failure to build a model with the user's ``--model-option`` values
    (a TypeError deep in a constructor, say) into a one-line ConfigError."""
    try:
        yield
    except (TypeError, ValueError, AssertionError) as err:
        if not model_kwargs:
            raise
        shown = ", ".join(f"{key}={value!r}" for key, value in model_kwargs.items())
        raise ConfigError(f"timm could not build {timm_name} with the model options {shown}: "
                          f"{type(err).__name__}: {err}") from None  # fmt: skip


def _load_failure(path: Path, timm_name: str, err: Exception) -> str:
    """One line saying why a weights file did not load, and what to do."""
    text = " ".join(str(err).split())
    needs = re.search(r"GLOBAL ([\w.]+)", text) if isinstance(err, pickle.UnpicklingError) else None
    if needs:  # torch.load(weights_only=True) met a global that is not a tensor type: never imported
        return (f"refused to load {path}: it is a pickle that needs {needs.group(1).rstrip('.')} to load, so loading it could "
                "run code; if you trust it, convert it once to safetensors: python -c \"import torch, safetensors.torch "
                f"as st; st.save_file(torch.load('{path}', weights_only=False), 'weights.safetensors')\"")  # fmt: skip
    return f"weights file {path} is not a readable checkpoint ({text[:160]})"


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file, or from a ``.pth`` / ``.pt`` / ``.bin``
    file through ``torch.load(weights_only=True)`` (tensors and plain containers only:
    a pickle that needs anything else is refused, never run). A checkpoint that wraps
    its state dict (``state_dict``, ``model``, ``module``) is unwrapped, and a
    ``module.`` prefix (DataParallel) dropped."""
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("it holds no state dict of tensors")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def _load_checkpoint(net: nn.Module, path: Path, timm_name: str) -> None:
    """Load a weights file into ``net``'s backbone; the head stays the fresh one.

    A file that does not fit as it is goes through the family's timm filter, which adapts it to the model (position embeddings to its
    grid, older layouts to the current one). Shape mismatches, and backbone keys
    missing from the file or unknown to the model, are named in the error.
    """
    try:
        state = read_checkpoint(path)
    except (pickle.UnpicklingError, SafetensorError, RuntimeError, ValueError, EOFError, OSError) as err:
        raise ConfigError(_load_failure(path, timm_name, err)) from None
    own = net.state_dict()
    backbone = {k for k in own if not k.startswith(HEAD_PREFIXES)}
    fits = backbone <= set(state) and all(k in own and own[k].shape == v.shape for k, v in state.items()
                                          if not k.startswith(HEAD_PREFIXES))  # fmt: skip
    filter_fn = getattr(sys.modules[type(net).__module__], "checkpoint_filter_fn", None)
    # A file that fits as it is is loaded as it is: timm's filters guess an older layout
    # from the keys present (some versions from the head's), and convert what needs none.
    if filter_fn is not None and not fits:
        try:
            state = filter_fn(state, net)
        except (KeyError, RuntimeError, ValueError, AssertionError) as err:
            raise ConfigError(f"weights file {path} does not fit {timm_name}: {type(err).__name__}: {err}") from None
    state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}
    mismatched = [f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and v.shape != own[k].shape]  # fmt: skip
    result = net.load_state_dict({k: v for k, v in state.items() if k in own and v.shape == own[k].shape}, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(HEAD_PREFIXES)]
    unexpected = [k for k in state if k not in own]
    for kind, keys in (("shape-mismatched", mismatched), ("missing", missing), ("unexpected", unexpected)):
        if keys:
            shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
            raise ConfigError(f"weights file {path} does not fit {timm_name}: {len(keys)} {kind} keys ({shown})")


def fingerprint(model: nn.Module, exclude_prefixes: tuple[str, ...] = HEAD_PREFIXES) -> str:
    """sha256 over a model's tensors, sorted by name, the head excluded."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith(exclude_prefixes):
            continue
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _family(model: nn.Module) -> str:
    if vit.is_vit(model):
        return "vit"
    if swin.is_swin(model):
        return "swin"
    raise ConfigError(
        f"{type(model).__name__} is not supported yet; sls prunes timm VisionTransformer and "
        "SwinTransformer (v1) models"
    )


def _check_patch_grid(model: nn.Module, timm_name: str) -> None:
    """Refuse an input size the patch embedding cannot cut into whole patches (timm
    would only assert so at the first forward pass), naming the nearest sizes that work."""
    embed = model.patch_embed
    if getattr(embed, "dynamic_img_pad", False):
        return
    for side, patch in zip(embed.img_size, embed.patch_size):
        if side % patch:
            lower, upper = side - side % patch, side - side % patch + patch
            sizes = f"{lower} or {upper}" if lower else str(upper)
            raise ConfigError(f"an input of {side} px is not a whole number of {timm_name}'s {patch}-px patches; "
                              f"use --img-size {sizes}")  # fmt: skip


def all_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks, bottom-up (across the stages for Swin)."""
    model = encoder_of(model)
    return list(_FAMILIES[_family(model)].blocks(model))


def _create_from_npz(timm_name: str, path: Path, kwargs: dict) -> nn.Module:
    """A timm model with the backbone weights of a JAX ``.npz`` checkpoint.

    timm's ``load_pretrained`` reads the original ViT layout (``ViT-B_16.npz``) and
    big_vision's, and silently skips what it has no entry for (register tokens,
    LayerScale, ...). So every backbone tensor is set to NaN first: one that is still
    NaN after loading was not in the file, and the file is refused. The head stays
    the fresh one even when the file's head has the same shape.
    """
    import timm

    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist")
    net = timm.create_model(timm_name, pretrained=False, **kwargs)
    if not hasattr(net, "load_pretrained"):
        raise ConfigError(
            f"weights file {path}: timm reads .npz (JAX) checkpoints for ViT models only; "
            f"give {timm_name} a .safetensors or .pth state dict"
        )
    head = {n: p.detach().clone() for n, p in net.named_parameters() if n.startswith(HEAD_PREFIXES)}
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name not in head and param.is_floating_point():
                param.fill_(float("nan"))
        try:
            net.load_pretrained(str(path))
        except (KeyError, ValueError, RuntimeError, AttributeError) as err:
            # KeyError: a tensor the model needs is not in the file; the others: wrong shapes.
            raise ConfigError(f"weights file {path} does not fit {timm_name}: {err}") from None
        unloaded = [n for n, p in net.named_parameters() if n not in head and torch.isnan(p).any()]
        if unloaded:
            shown = ", ".join(unloaded[:3]) + (", ..." if len(unloaded) > 3 else "")
            raise ConfigError(
                f"weights file {path} does not fit {timm_name}: it has no values for {len(unloaded)} "
                f"tensors ({shown})"
            )
        for name, param in net.named_parameters():
            if name in head:
                param.copy_(head[name])
    return net


def _model_source(model: str) -> str | None:
    """timm's source of a model name: ``"hf-hub"`` or ``"local-dir"`` for a prefixed
    name, None for a name of timm's registry.

    Raises:
        UnknownModelError: an unknown prefix, or a bare ``ORG/NAME`` (timm does not take
            a hub repository without its ``hf-hub:`` prefix).
    """
    from timm.models import parse_model_name

    if any(sep in model for sep in "/\\") and ":" not in model:
        raise UnknownModelError(f"unknown model {model!r}: name a Hugging Face hub model 'hf-hub:{model}', "
                                f"a local folder holding a timm config.json 'local-dir:{model}'")  # fmt: skip
    try:
        return parse_model_name(model)[0]
    except (ValueError, AssertionError) as err:  # older timm asserts on an unknown prefix
        raise UnknownModelError(f"unknown model {model!r}: {' '.join(str(err).split())}") from None


def _source_failure(model: str, err: Exception, what: str) -> SLSError:
    """One line saying why ``what`` (``config.json``, the weights) of an ``hf-hub:`` or
    ``local-dir:`` model could not be read, and what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo = model.partition(":")[2]
    text = " ".join(str(err).split())[:200]
    if model.lower().startswith("local-dir:"):
        return UnknownModelError(f"could not read {what} of {model!r}: {type(err).__name__}: {text}")
    if isinstance(err, HFValidationError):
        return UnknownModelError(f"unknown model {model!r}: {repo!r} is not a Hugging Face repository id "
                                 "(ORG/NAME, optionally @REVISION)")  # fmt: skip
    if isinstance(err, GatedRepoError):
        return UnknownModelError(f"{repo} on the Hugging Face hub is gated: accept its terms on huggingface.co and "
                                 "log in (`hf auth login`, or set HF_TOKEN)")  # fmt: skip
    if isinstance(err, RepositoryNotFoundError):
        return UnknownModelError(f"unknown model {model!r}: the Hugging Face hub has no repository {repo} (a private "
                                 "one needs `hf auth login` or HF_TOKEN)")  # fmt: skip
    if isinstance(err, RevisionNotFoundError):
        return UnknownModelError(f"unknown model {model!r}: {repo.partition('@')[0]} has no revision "
                                 f"{repo.partition('@')[2]!r} on the Hugging Face hub")  # fmt: skip
    # A LocalEntryNotFoundError is the answer both offline (HF_HUB_OFFLINE=1) and when the
    # hub cannot be reached: the file is not in the cache either.
    if isinstance(err, (LocalEntryNotFoundError, ConnectionError, TimeoutError)):
        reason = "HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else "the Hugging Face hub could not be reached"
        instead = ("name its timm architecture with --weights FILE" if what == "config.json"
                   else "pass a local weights file with --weights FILE")  # fmt: skip
        return UnknownModelError(
            f"could not load {model!r}: {reason} and its {what} is not in the huggingface cache "
            f"{constants.HF_HUB_CACHE}; to work offline, fill that cache once online (or point HF_HUB_CACHE or "
            f"HF_HOME at a populated one) and set HF_HUB_OFFLINE=1, or {instead}"
        )
    if isinstance(err, EntryNotFoundError):
        return UnknownModelError(f"unknown model {model!r}: {repo} has no {what} on the Hugging Face hub; "
                                 "it is not a timm model repository")  # fmt: skip
    if isinstance(err, HfHubHTTPError):
        return UnknownModelError(f"could not load {model!r}: the Hugging Face hub answered: {text}")
    if isinstance(err, (KeyError, TypeError, ValueError)):  # a config.json that is not timm's, a bad repo id
        return UnknownModelError(f"could not load {model!r}: its {what} is not a timm model's "
                                 f"({type(err).__name__}: {text})")  # fmt: skip
    return UnknownModelError(f"could not load {what} of {model!r}: {type(err).__name__}: {text}")


def _source_config(model: str) -> tuple[dict, str, dict]:
    """The pretrained config, architecture and architecture arguments timm reads from
    the config.json of an ``hf-hub:`` model (through huggingface_hub's cache) or a
    ``local-dir:`` folder; a one-line UnknownModelError when it cannot."""
    import timm
    from timm.models import _hub, parse_model_name

    source, location = parse_model_name(model)
    try:
        if source == "hf-hub":
            pretrained_cfg, architecture, model_args = _hub.load_model_config_from_hf(location)
        else:
            pretrained_cfg, architecture, model_args = _hub.load_model_config_from_path(location)
    except Exception as err:  # huggingface_hub's and json's many types; sorted out in one line
        raise _source_failure(model, err, "config.json") from None
    if not timm.is_model(architecture):
        raise UnknownModelError(f"{model!r} names the architecture {architecture!r}, which timm {timm.__version__} "
                                "does not know; upgrade timm")  # fmt: skip
    return pretrained_cfg, architecture, model_args


def create_backbone(
    model: str,
    *,
    num_classes: int,
    weights: str | Path | None = None,
    img_size: int | None = None,
    drop_path_rate: float = 0.0,
    model_kwargs: dict | None = None,
) -> tuple[nn.Module, BackboneInfo]:
    """Build a timm model with a fresh ``num_classes`` head.

    Args:
        model: an embedded name (``embedded-dinov2-s``), any timm model name, or a
            timm repository on the Hugging Face hub, ``hf-hub:ORG/NAME[@REVISION]``
            (``local-dir:PATH`` for a folder of the same files), whose config.json
            names the architecture and its arguments.
        num_classes: classes of the new head.
        weights: a local weights file loaded by timm: a ``.safetensors`` or ``.pth``
            state dict (``torch.load`` with ``weights_only``), or for ViT models a JAX
            ``.npz`` checkpoint (the original ``ViT-B_16.npz`` layout or big_vision's;
            every backbone tensor must come from the file); ``"random"`` for random
            weights; ``None`` for the embedded model's converted checkpoint, or timm's
            own pretrained source for timm names (the repository's weights for
            ``hf-hub:`` names, through huggingface_hub's cache).
        img_size: input side; timm resamples the position embeddings.
        drop_path_rate: stochastic depth while training.
        model_kwargs: further ``timm.create_model`` architecture arguments (``depth``,
            ``embed_dim``, ``reg_tokens``, ``window_size``, ...); JSON values, since
            the record stores them to rebuild the same model.

    Returns:
        the model and the :class:`BackboneInfo` to record.

    Raises:
        UnknownModelError: an unknown name, or an ``hf-hub:`` repository (or its weights)
            neither in huggingface_hub's cache nor reachable; the message says how to
            work offline.
    """
    import timm

    from sls.backbones.embedded import EMBEDDED_MODELS, embedded_weights

    sourced = model not in EMBEDDED_MODELS and _model_source(model) is not None
    if model in EMBEDDED_MODELS:
        timm_name = EMBEDDED_MODELS[model].timm_name
        if weights is None:
            weights = embedded_weights(model)
    elif sourced:
        _source_config(model)  # read now, so that a missing or unreachable config.json is one line
        timm_name = model
    elif timm.is_model(model):
        timm_name = model
    else:
        known = ", ".join(EMBEDDED_MODELS)
        raise UnknownModelError(
            f"unknown model {model!r}: not an embedded model ({known}) nor a timm model name "
            "(see timm.list_models()) nor hf-hub:ORG/NAME"
        )
    model_kwargs = dict(model_kwargs or {})
    reserved = sorted(set(model_kwargs) & {"num_classes", "img_size", "drop_path_rate", "pretrained",
                                           "pretrained_cfg", "pretrained_cfg_overlay"})  # fmt: skip
    if reserved:
        raise ConfigError(f"model_kwargs must not set {', '.join(reserved)}; use the arguments of that name")
    try:
        json.dumps(model_kwargs)
    except TypeError as err:
        raise ConfigError(f"model_kwargs must hold JSON values, for the task record ({err})") from None
    kwargs: dict = dict(num_classes=num_classes, drop_path_rate=drop_path_rate, **model_kwargs)
    if img_size is not None:
        kwargs["img_size"] = img_size
    with _model_options_checked(timm_name, model_kwargs):
        if weights == RANDOM_WEIGHTS:
            # Seeded, so a task record made on random weights can be rebuilt and checked.
            # Built headless so the head's size does not shift the random stream.
            with torch.random.fork_rng():
                torch.manual_seed(0)
                net = timm.create_model(timm_name, pretrained=False, **(kwargs | {"num_classes": 0}))
                net.reset_classifier(num_classes)
            source = RANDOM_WEIGHTS
        elif weights is None and sourced:
            # timm reads the repository's weights itself (safetensors first, through
            # huggingface_hub's cache); its config was read above, so what fails here is them.
            try:
                net = timm.create_model(timm_name, pretrained=True, **kwargs)
            except (OSError, RuntimeError) as err:
                raise _source_failure(model, err, "weights file") from None
            source = "timm"
        elif weights is None:
            try:
                net = timm.create_model(timm_name, pretrained=True, **kwargs)
            except Exception as err:  # timm raises many types when the hub is unreachable
                raise UnknownModelError(
                    f"could not fetch pretrained weights for {timm_name!r} ({type(err).__name__}); "
                    "pass a local file with --weights FILE"
                ) from None
            source = "timm"
        elif Path(weights).suffix.lower() == ".npz":
            net = _create_from_npz(timm_name, Path(weights), kwargs)
            source = str(Path(weights).resolve())
        else:
            path = Path(weights)
            if not path.is_file():
                raise ConfigError(f"weights file {path} does not exist")
            net = timm.create_model(timm_name, pretrained=False, **kwargs)
            _load_checkpoint(net, path, timm_name)
            source = str(path.resolve())
    family = _family(net)
    _check_patch_grid(net, timm_name)
    cfg = net.pretrained_cfg
    side = img_size or cfg["input_size"][-1]
    info = BackboneInfo(
        model=model,
        timm_name=timm_name,
        weights=source,
        fingerprint=fingerprint(net),
        family=family,
        num_blocks=num_blocks(net),
        img_size=int(side),
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
        interpolation=str(cfg.get("interpolation", "bicubic")),
        model_kwargs=model_kwargs,
    )
    return net, info


def encoder_of(model: nn.Module) -> nn.Module:
    """The timm model inside a task's model (a dense task's ``encoder``), else the model itself."""
    return model.encoder if getattr(model, "is_dense_model", False) else model


def num_blocks(model: nn.Module) -> int:
    """Number of transformer blocks the model has now."""
    model = encoder_of(model)
    return len(_FAMILIES[_family(model)].blocks(model))


def pool_tokens(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """One block's output pooled the way :func:`block_features` pools it (the family's rule)."""
    return _FAMILIES[_family(model)].pool_tokens(model, tokens)


def shared_copy(model: nn.Module, *, share_trainable: bool = False) -> nn.Module:
    """A deep copy of ``model`` that shares its frozen parameters with it (and, with
    ``share_trainable``, every parameter and buffer): a second model that costs its
    modules, trainable tensors and buffers, not a second backbone.

    Only the trainable tensors ever change in place (training, :func:`load_tensors
    <sls.artifact.load_tensors>`), so a pruned copy trains and loads without touching the
    original. Folding PETL modules into their layers (:func:`sls.petl.merge.deployable_model`)
    deep-copies first, so it is safe on a shared copy too; ``share_trainable`` is for a
    copy only read (timing a truncation of a model that is not trained any more).
    """
    # New Parameter objects over the same storage: moving or casting the copy (``.to()``
    # replaces each parameter's data) leaves the original as it is.
    memo = {id(p): nn.Parameter(p.data, requires_grad=p.requires_grad) for p in model.parameters()
            if share_trainable or not p.requires_grad}  # fmt: skip
    if share_trainable:
        memo |= {id(b): b for b in model.buffers()}
    return copy.deepcopy(model, memo=memo)


def truncate(model: nn.Module, depth: int) -> nn.Module:
    """Keep blocks 1..depth (1-based) in place; raise if depth is out of range."""
    total = num_blocks(model)
    if not 1 <= depth <= total:
        raise ConfigError(f"depth k={depth} is out of range: the model has blocks 1..{total}")
    encoder = encoder_of(model)
    _FAMILIES[_family(encoder)].truncate(encoder, depth)
    if encoder is not model:
        model.after_truncate()  # a dense head reading a narrower map is rebuilt
    return model


class BlockFeatures(NamedTuple):
    """Pooled features of one pass: one ``(n, d)`` array per block (bottom-up; for Swin
    d is the block's stage width), the ``(n,)`` labels, and the pooled input of block 1."""

    features: list[np.ndarray]
    labels: np.ndarray
    block_input: np.ndarray


@torch.inference_mode()
def block_features(
    model: nn.Module,
    loader: DataLoader,
    *,
    progress: bool = True,
) -> BlockFeatures:
    """Pooled output of every block for every image, in ONE forward pass.

    Forward hooks on the blocks collect each block's pooled tokens (and the pooled
    input of block 1) while the model runs ``forward_features`` once per batch (the
    head is not run). Pooling is the family's: the CLS token for ViTs (the mean patch
    token without one); the mean over all tokens for Swin, taken before the next
    stage's patch merging, so block i's width is its stage's width. For Swin the input
    of block 1 is the patch embedding's normed output.

    Batches go to the model's device; the features are float32 on the CPU. Inside a
    process group each process runs its share of the images and every process gets
    all the features back in the loader's order (:func:`sls.distributed.ordered_shard`).
    """
    model.eval()
    device = next(model.parameters()).device
    loader, gather = distributed.ordered_shard(loader)
    family = _FAMILIES[_family(model)]
    stack = family.blocks(model)
    collected: list[list[torch.Tensor]] = [[] for _ in stack]
    first_input: list[torch.Tensor] = []

    def pooled(tokens: torch.Tensor) -> torch.Tensor:
        return family.pool_tokens(model, tokens).float().cpu()

    hooks = [stack[0].register_forward_pre_hook(lambda _m, args: first_input.append(pooled(args[0])))]
    hooks += [
        block.register_forward_hook(lambda _m, _inp, out, store=store: store.append(pooled(out)))
        for block, store in zip(stack, collected)
    ]
    labels = []
    try:
        for images, targets in tqdm(loader, desc="block features", unit="batch", disable=not progress):
            model.forward_features(images.to(device))
            labels.append(torch.as_tensor(targets))
    finally:
        for hook in hooks:
            hook.remove()
    return BlockFeatures(
        features=[gather(torch.cat(store)).numpy() for store in collected],
        labels=gather(torch.cat(labels)).numpy().astype(np.int64),
        block_input=gather(torch.cat(first_input)).numpy(),
    )


def pretrained_input_size(model: str) -> int:
    """The input side of an embedded, timm or ``hf-hub:`` model's pretrained config (224
    when it has none).

    Raises:
        UnknownModelError: an ``hf-hub:`` / ``local-dir:`` model whose config.json cannot be read.
    """
    import timm

    from sls.backbones.embedded import EMBEDDED_MODELS

    if model in EMBEDDED_MODELS:
        name = EMBEDDED_MODELS[model].timm_name
    else:
        try:
            sourced = _model_source(model) is not None
        except UnknownModelError:  # create_backbone says so in one line
            return 224
        if sourced:  # timm's own default, where the repository's config has no input size
            input_size = _source_config(model)[0].get("input_size")
            return int(input_size[-1]) if input_size else 224
        name = model
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # an unknown name: create_backbone says so in one line
        cfg = None
    return int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else 224

"""DepGraph width pruning (torch-pruning) of a PETL-adapted timm ViT: the baseline for SLS.

SLS removes whole tail blocks; DepGraph (Fang et al., CVPR 2023) keeps every block and
removes channels. As torch-pruning's own timm-ViT recipe does, one uniform ratio is
applied to every group of coupled channels:

- the residual width: patch embedding, class and position tokens, every norm, and
  every layer that reads or writes the residual stream (the head's inputs included);
- each block's attention head dimensions: the same dims of q, k and v and the matching
  inputs of ``proj``, the same number in every head; the number of heads is kept;
- each block's MLP hidden units.

Channels are ranked by first-order Taylor importance (|weight * gradient|, summed over
a group) from the cross-entropy gradients of a few batches (the paper's), or by weight
magnitude. Every kept width (the residual, each head's dims, the MLP hidden units) is
by default the multiple of 8 nearest to ``width * (1 - ratio)`` (tensor-core-friendly
widths; fused attention kernels such as FlashAttention's may still pad a head dim up to
their next supported size). torch-pruning's own ``round_to`` rounds a head's dims down
against the layer's whole width; here each group is given the ratio that keeps exactly
the rounded count, by design.

PETL modules:

- LoRA is merged into its base linear first (``W + (alpha / r) B A``) and the peft layer
  replaced by that linear, so the model pruned is a plain timm ViT. This is exact and
  lets torch-pruning trace the model like any other. Stored whole, the pruned backbone
  holds the update; over a frozen shared backbone the same model is the kept channels'
  indices (``return_kept``) plus the LoRA factors sliced to them (W[kept] + B[kept] A[:,
  kept] is the pruned merged weight), so storage accountings count that LoRA. To
  retrain with LoRA, apply it again to the pruned model.
- The adapter keeps its bottleneck width: its ``down`` layer is an ignored layer, so
  the group of its outputs is never pruned. Its inputs (``down``) and outputs (``up``)
  lie on the residual stream and are pruned with it, so every width stays consistent.
- The classifier head keeps its classes (ignored); its inputs follow the residual.

Other PETL methods are refused (:class:`~sls.errors.ConfigError`).

A dense task's model (:class:`~sls.tasks.dense.DenseModel`: a timm ViT ``encoder`` without
a classifier, and a task ``head``) is pruned through its encoder: torch-pruning traces
the encoder alone, the Taylor gradients come from the dense model's own loss
(``model(images, targets)``; the head's BatchNorm statistics stay as they are), and the
head's inputs are then narrowed to the residual channels the encoder kept
(``model.narrow_inputs``). The head's own widths are kept.

torch-pruning is an optional dependency: ``pip install torch-pruning``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import nn
from torch.utils.data import DataLoader

from sls.backbones import vit
from sls.errors import ConfigError, DataError
from sls.petl import create_petl, list_petl
from sls.petl.adapter import Bottleneck
from sls.petl.merge import merge_for_inference

SUPPORTED_PETL = ("lora", "adapter")
MAX_RATIO = 0.9
"""Largest ratio :func:`ratio_for_parameter_reduction` tries: a tenth of every width
left, far past any comparison with SLS."""


def _torch_pruning():
    try:
        import torch_pruning
    except ImportError:
        raise ConfigError("the DepGraph baseline needs torch-pruning: pip install torch-pruning") from None
    return torch_pruning


def _first_batches(loader: DataLoader, n_batches: int) -> list[tuple[torch.Tensor, object]]:
    if n_batches < 1:
        raise ConfigError(f"n_batches must be >= 1, got {n_batches}")
    batches = []
    for images, targets in loader:
        # A detection batch's targets are one {"boxes", "labels"} dict per image: kept as they are.
        per_image = isinstance(targets, (list, tuple)) and targets and isinstance(targets[0], dict)
        batches.append((images, targets if per_image else torch.as_tensor(targets)))
        if len(batches) == n_batches:
            break
    if not batches:
        raise DataError("the example loader yields no batch; DepGraph needs a few labelled batches")
    return batches


def _to_device(targets, device: torch.device):
    """Labels or masks (a tensor), or detection targets (a list of dicts of tensors), on ``device``."""
    if isinstance(targets, torch.Tensor):
        return targets.to(device)
    return [{key: value.to(device) for key, value in target.items()} for target in targets]


def _is_dense(model: nn.Module) -> bool:
    return bool(getattr(model, "is_dense_model", False))


def _loss_mode(model: nn.Module) -> None:
    """A dense model set to give its training loss without changing anything: its head
    in training mode (a torchvision detector computes its losses only then), every
    BatchNorm kept on its running statistics, the encoder in eval mode (no dropout)."""
    model.eval()
    model.head.train()
    for module in model.head.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def _check_ratio(ratio: float) -> None:
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"the pruning ratio must be in [0, 1), got {ratio}")


def _attentions(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if isinstance(module, Attention)]


def _check_supported(model: nn.Module) -> None:
    """Refuse what the pruning below would get wrong, before touching anything."""
    if not vit.is_vit(model):
        raise ConfigError(f"depgraph_prune prunes timm VisionTransformer models, not {type(model).__name__}")
    names = [name for name, _ in model.named_parameters()]
    for method in list_petl():
        if method not in SUPPORTED_PETL and any(create_petl(method).is_petl_param(n) for n in names):
            raise ConfigError(
                f"depgraph_prune does not support {method} models; it supports {', '.join(SUPPORTED_PETL)}"
            )
    attentions = _attentions(model)
    if len(attentions) != len(vit.blocks(model)):
        raise ConfigError("depgraph_prune needs one timm Attention per block")
    for attn in attentions:
        # A q/k norm works per head dim and a gate reads the block input: torch-pruning
        # does not follow either through the head reshape.
        if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
            raise ConfigError("depgraph_prune does not support attention with q/k normalisation")
        if getattr(attn, "gate", None) is not None:
            raise ConfigError("depgraph_prune does not support gated attention")


def _ignored_layers(model: nn.Module) -> list[nn.Module]:
    adapters = [module.down for module in model.modules() if isinstance(module, Bottleneck)]
    return [model.get_classifier(), *adapters]


def _unwrapped_parameters(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """Parameters outside linear, conv and norm layers (class and position tokens,
    LayerScale gammas): all have the residual width as their last dim."""
    known = (nn.Linear, nn.Conv2d, nn.LayerNorm)
    return [
        (param, param.dim() - 1)
        for module in model.modules()
        if not isinstance(module, known)
        for param in module.parameters(recurse=False)
    ]


@torch.no_grad()
def _finish_attention(attn: nn.Module, num_heads: int, head_dim_before: int) -> None:
    """Update a pruned timm Attention's shape attributes so its forward works.

    timm's fused path scales the logits by 1/sqrt(current head dim); the q rows of
    ``qkv`` are multiplied by sqrt(after / before), so the kept dims keep the
    1/sqrt(head dim before) scale they were trained with, in both of timm's paths.
    """
    head_dim = attn.qkv.out_features // (3 * num_heads)
    attn.num_heads = num_heads
    attn.head_dim = head_dim
    attn.attn_dim = num_heads * head_dim
    attn.scale = head_dim**-0.5
    if head_dim != head_dim_before:
        factor = math.sqrt(head_dim / head_dim_before)
        attn.qkv.weight[: attn.attn_dim] *= factor
        if attn.qkv.bias is not None:
            attn.qkv.bias[: attn.attn_dim] *= factor


IMPORTANCES = ("taylor", "magnitude")
HEAD_MODES = ("dims", "whole")
"""How attention is narrowed: ``dims`` removes the same dims from every head (all heads
kept); ``whole`` removes whole heads (each kept head keeps all its dims, the head size
fused GPU attention kernels are built for)."""
ROUND_TO = 8
"""Default width multiple: every kept width (residual, head dim, MLP hidden) is a
multiple of 8, the sizes fused attention kernels and tensor cores are built for."""


def _kept(total: int, ratio: float, round_to: int | None) -> int:
    """Channels a group of ``total`` keeps at ``ratio``: torch-pruning's own count, or
    with ``round_to`` the nearest multiple of it (at least one multiple, at most ``total``)."""
    if not round_to:
        return int(total * (1 - ratio))
    if ratio == 0:  # nothing to remove: a width that is not a multiple stays whole
        return total
    return min(total, max(round_to, round(total * (1 - ratio) / round_to) * round_to))


def _ratio_keeping(total: int, kept: int) -> float:
    # torch-pruning keeps int(total * (1 - ratio)) channels; half a channel of slack
    # makes the float product land on ``kept`` whatever its rounding.
    return max(0.0, (total - kept - 0.5) / total)


def _group_ratios(model: nn.Module, ratio: float, round_to: int | None, heads: str) -> tuple[float, dict, float]:
    """The residual ratio, per-layer ratios (head dims at each ``qkv``, MLP hidden at
    each ``fc1``) that keep :func:`_kept` channels in every group, and the head ratio."""
    width = model.patch_embed.proj.out_channels
    residual = _ratio_keeping(width, _kept(width, ratio, round_to))
    per_layer, head_ratio = {}, 0.0
    for block in vit.blocks(model):
        attn, fc1 = block.attn, block.mlp.fc1
        if heads == "dims":
            per_layer[attn.qkv] = _ratio_keeping(attn.head_dim, _kept(attn.head_dim, ratio, round_to))
        else:
            removed = attn.num_heads - max(1, round(attn.num_heads * (1 - ratio)))
            # torch-pruning removes ceil(ratio * heads) heads: half a head of slack lands on ``removed``.
            head_ratio = max(0.0, (removed - 0.5) / attn.num_heads)
        per_layer[fc1] = _ratio_keeping(fc1.out_features, _kept(fc1.out_features, ratio, round_to))
    return residual, per_layer, head_ratio


def _prune(
    model: nn.Module,
    batches: list[tuple[torch.Tensor, object]],
    *,
    ratio: float,
    round_to: int | None,
    importance: str,
    heads: str = "dims",
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Prune a merged copy of ``model``; returns it and, per pruned group, the indices
    of the channels it kept (named by the group's root layer).

    A dense model (:class:`~sls.tasks.dense.DenseModel`) is pruned through its encoder:
    the graph is traced on the encoder alone (its timm head is an Identity), the Taylor
    gradients come from the dense model's own loss, and the task head's inputs are then
    narrowed to the residual channels the encoder kept (``narrow_inputs``)."""
    if importance not in IMPORTANCES:
        raise ConfigError(f"unknown DepGraph importance {importance!r}; choose one of: {', '.join(IMPORTANCES)}")
    if heads not in HEAD_MODES:
        raise ConfigError(f"unknown DepGraph head mode {heads!r}; choose one of: {', '.join(HEAD_MODES)}")
    tp = _torch_pruning()
    dense = _is_dense(model)
    if dense and not hasattr(model, "narrow_inputs"):
        raise ConfigError(f"depgraph_prune cannot narrow the head of a {type(model).__name__}")
    pruned = merge_for_inference(model)
    net = pruned.encoder if dense else pruned  # what torch-pruning traces and prunes
    _check_supported(net)
    trainable = {name: param.requires_grad for name, param in pruned.named_parameters()}
    device = next(pruned.parameters()).device
    attentions = _attentions(net)
    head_dims = [attn.head_dim for attn in attentions]
    names = {module: name for name, module in pruned.named_modules()}
    # torch-pruning traces the graph through autograd: every parameter must require grad.
    for param in net.parameters():
        param.requires_grad_(True)
    taylor = importance == "taylor"
    residual_ratio, per_layer, head_ratio = _group_ratios(net, ratio, round_to, heads)
    embed = net.patch_embed.proj  # its output channels are the residual stream's
    width_before = embed.out_channels
    pruner = tp.pruner.MetaPruner(
        net,
        batches[0][0][:1].to(device),
        importance=tp.importance.GroupTaylorImportance() if taylor else tp.importance.GroupMagnitudeImportance(),
        pruning_ratio=residual_ratio,
        pruning_ratio_dict=per_layer,
        round_to=None,  # the widths are rounded by the ratios above, to the nearest multiple
        ignored_layers=_ignored_layers(net),
        num_heads={attn.qkv: attn.num_heads for attn in attentions},
        prune_head_dims=heads == "dims",
        prune_num_heads=heads == "whole",
        head_pruning_ratio=head_ratio,
        unwrapped_parameters=_unwrapped_parameters(net),
    )
    if taylor:
        pruned.zero_grad(set_to_none=True)
        if dense:
            _loss_mode(pruned)
        for images, targets in batches:
            images, targets = images.to(device), _to_device(targets, device)
            loss = pruned(images, targets) if dense else F.cross_entropy(pruned(images), targets)
            loss.backward()
        pruned.eval()
    kept: dict[str, torch.Tensor] = {}
    residual = torch.arange(width_before)  # the residual channels kept (all, unless a group prunes them)
    for group in pruner.step(interactive=True):
        dep, removed = group[0]
        removed = [int(getattr(index, "idx", index)) for index in removed]  # torch-pruning's _HybridIndex
        root = dep.target.module
        channels = (root.out_channels if isinstance(root, nn.Conv2d) else root.out_features) \
            if pruner.DG.is_out_channel_pruning_fn(dep.handler) else getattr(root, "in_features", None)
        if channels is not None:
            mask = torch.ones(channels, dtype=torch.bool)
            mask[torch.as_tensor(removed, dtype=torch.long)] = False
            kept[names.get(root, type(root).__name__)] = mask.nonzero().view(-1).to(torch.int32)
        for item_dep, item_removed in group:  # the residual group: the one pruning the patch embedding's outputs
            if item_dep.target.module is embed and pruner.DG.is_out_channel_pruning_fn(item_dep.handler):
                mask = torch.ones(width_before, dtype=torch.bool)
                mask[torch.as_tensor([int(getattr(i, "idx", i)) for i in item_removed], dtype=torch.long)] = False
                residual = mask.nonzero().view(-1)
        group.prune()
    for attn, head_dim_before in zip(attentions, head_dims):
        _finish_attention(attn, pruner.num_heads[attn.qkv], head_dim_before)
    width = net.patch_embed.proj.out_channels
    if len(residual) != width:
        raise RuntimeError(f"DepGraph kept {width} residual channels but {len(residual)} were found")
    net.embed_dim = net.num_features = net.head_hidden_size = width
    if dense:
        pruned.narrow_inputs(residual)
    for name, param in pruned.named_parameters():
        param.grad = None
        param.requires_grad_(trainable[name])
    return pruned.eval(), kept


def depgraph_prune(
    model: nn.Module,
    example_loader: DataLoader,
    *,
    ratio: float,
    n_batches: int = 4,
    round_to: int | None = ROUND_TO,
    importance: str = "taylor",
    heads: str = "dims",
    return_kept: bool = False,
):
    """A copy of ``model`` with a fraction ``ratio`` of its channels removed by DepGraph.

    Args:
        model: a timm ViT, plain or with LoRA or adapters applied, or a dense task's
            model around one (its encoder pruned, its head's inputs narrowed); left untouched.
        example_loader: labelled batches; the first ``n_batches`` give the Taylor
            importance (their summed cross-entropy gradients; a dense model's own loss).
        ratio: fraction of the channels removed from every group, in [0, 1).
            Layers lose inputs and outputs, so the parameters drop by about
            ``1 - (1 - ratio)**2``.
        n_batches: batches for the importance.
        round_to: every kept width (residual, each head's dims, MLP hidden) is the
            multiple of this nearest to ``width * (1 - ratio)`` (8 by default: GPU
            kernels want such widths); None keeps torch-pruning's exact count.
        importance: ``"taylor"`` (first-order Taylor, |w * grad|, the paper's) or
            ``"magnitude"`` (|w|, no gradient).
        heads: ``"dims"`` (every head loses the same dims, rounded as the other widths)
            or ``"whole"`` (the nearest whole number of heads goes, at least one kept;
            each kept head keeps its size).
        return_kept: also return the kept channels' indices per pruned group.

    Returns:
        the pruned model in eval mode, LoRA merged in (a plain timm ViT), adapters
        and the head in place. Parameters keep the trainable flags they had in
        ``model``; merged LoRA is frozen with its base layer. With ``return_kept``,
        ``(model, {root layer name: int32 indices of the kept channels})``: with the
        shared backbone, all a task needs to rebuild the pruned backbone.
    """
    _check_ratio(ratio)
    pruned, kept = _prune(model, _first_batches(example_loader, n_batches), ratio=ratio, round_to=round_to,
                          importance=importance, heads=heads)  # fmt: skip
    return (pruned, kept) if return_kept else pruned


def kept_indices_bytes(kept: dict[str, torch.Tensor]) -> int:
    """Bytes of :func:`depgraph_prune`'s kept-channel indices written as one safetensors file."""
    from safetensors.torch import save

    return len(save({name: indices.contiguous() for name, indices in kept.items()}))


def _count(model: nn.Module) -> int:
    return sum(param.numel() for param in model.parameters())


def _group_widths(model: nn.Module, heads: str) -> list[tuple[int, object]]:
    """The coupled groups a uniform ratio prunes, as (full width, ratio -> kept width):
    the residual stream, each attention's head dims (or heads) and each MLP's hidden units
    (:func:`_group_ratios`' counts; one entry per distinct width)."""
    net = model.encoder if _is_dense(model) else model
    groups = {("residual", net.patch_embed.proj.out_channels)}
    for block in vit.blocks(net):
        groups.add(("heads" if heads == "whole" else "head_dim",
                    block.attn.num_heads if heads == "whole" else block.attn.head_dim))  # fmt: skip
        groups.add(("mlp", block.mlp.fc1.out_features))
    return [(width, kind) for kind, width in sorted(groups)]


def _kept_in(kind: str, width: int, ratio: float, round_to: int | None) -> int:
    if kind == "heads":  # whole heads: torch-pruning removes H - max(1, round(H (1 - ratio))) of them
        return max(1, round(width * (1 - ratio)))
    return _kept(width, ratio, round_to)


def parameter_count_at(model: nn.Module, example_loader: DataLoader, *, round_to: int | None = ROUND_TO,
                       heads: str = "dims") -> Callable[[float], int] | None:  # fmt: skip
    """The parameters :func:`depgraph_prune` leaves at any ratio, in closed form, from ONE
    traced pruning.

    Every dimension of every parameter is either fixed or a multiple of one group's width
    (:func:`_group_widths`: the residual, head dims or heads, MLP hidden units), and each
    group keeps a known count at a ratio (:func:`_kept`). One pruning at a probe ratio
    where the groups keep distinct fractions says which group each changed dimension
    follows; the count at any ratio is then a sum of products. Returns None when no
    probe tells the groups apart (the caller then prunes at each ratio it tries).
    """
    groups = _group_widths(model, heads)
    def fractions_at(ratio: float) -> list[float]:
        return [_kept_in(kind, width, ratio, round_to) / width for width, kind in groups]

    # A probe at which every group shrinks, each to its own fraction.
    probe = next((r for r in np.arange(0.5, 0.9, 0.01).tolist() + np.arange(0.49, 0.0, -0.01).tolist()
                  if len(set(fractions_at(r))) == len(groups) and max(fractions_at(r)) < 1), None)  # fmt: skip
    if probe is None:
        return None
    full = {name: tuple(p.shape) for name, p in merge_for_inference(model).named_parameters()}
    pruned, _ = _prune(model, _first_batches(example_loader, 1), ratio=probe, round_to=round_to, importance="magnitude",
                       heads=heads)  # fmt: skip
    shapes = {name: tuple(p.shape) for name, p in pruned.named_parameters()}
    if shapes.keys() != full.keys():
        return None
    fractions = {_kept_in(kind, width, probe, round_to) / width: (width, kind) for width, kind in groups}
    terms = []  # per parameter: per dimension, a fixed size or (multiple, width, kind)
    for name, sizes in full.items():
        dims = []
        for size, after in zip(sizes, shapes[name]):
            if size == after:
                dims.append(size)
                continue
            match = [fraction for fraction in fractions if math.isclose(after / size, fraction, rel_tol=1e-9)]
            width, kind = fractions[match[0]] if len(match) == 1 else (None, None)
            if width is None or size % width:
                return None
            dims.append((size // width, width, kind))
        terms.append(dims)

    def count(ratio: float) -> int:
        kept = {(width, kind): _kept_in(kind, width, ratio, round_to) for width, kind in groups}
        return sum(math.prod(d if isinstance(d, int) else d[0] * kept[d[1:]] for d in dims) for dims in terms)

    return count


def ratio_for_parameter_reduction(
    model: nn.Module,
    example_loader: DataLoader,
    target_removed_params: int,
    *,
    round_to: int | None = ROUND_TO,
    heads: str = "dims",
    steps: int = 10,
) -> float:
    """The ratio at which :func:`depgraph_prune` removes about ``target_removed_params``.

    Bisection over the ratio in [0, MAX_RATIO] for ``steps`` halvings. The parameters
    removed grow in steps of one rounding multiple (8 channels by default; one channel
    with ``round_to=None``) per group, so the answer lies within one such step of the
    target, once ``steps`` resolves a step. The count at a ratio comes from
    :func:`parameter_count_at`: one traced pruning for the whole search (the widths at a
    ratio do not depend on which channels rank lowest); where it cannot tell the groups
    apart, each ratio tried is pruned (by weight magnitude: no gradients, one batch
    of the loader only traces the model).

    Returns:
        the ratio among those tried whose removed count is closest to the target.

    Raises:
        ConfigError: a negative target, or more than the pruning at MAX_RATIO removes.
    """
    if target_removed_params < 0:
        raise ConfigError(f"target_removed_params must be >= 0, got {target_removed_params}")
    total = _count(model)
    closed_form = parameter_count_at(model, example_loader, round_to=round_to, heads=heads)
    batches = _first_batches(example_loader, 1) if closed_form is None else None  # only to prune at each ratio

    def removed(ratio: float) -> int:
        if closed_form is not None:
            return total - closed_form(ratio)
        return total - _count(_prune(model, batches, ratio=ratio, round_to=round_to, importance="magnitude",
                                     heads=heads)[0])  # fmt: skip

    low, high = 0.0, MAX_RATIO
    removed_low, removed_high = removed(low), removed(high)
    if target_removed_params > removed_high:
        raise ConfigError(
            f"DepGraph removes at most {removed_high} of {total} parameters (ratio {MAX_RATIO}); "
            f"the target {target_removed_params} is beyond that"
        )
    if target_removed_params <= removed_low:
        return low
    for _ in range(steps):
        middle = (low + high) / 2
        removed_middle = removed(middle)
        if removed_middle < target_removed_params:
            low, removed_low = middle, removed_middle
        else:
            high, removed_high = middle, removed_middle
    if target_removed_params - removed_low <= removed_high - target_removed_params:
        return low
    return high

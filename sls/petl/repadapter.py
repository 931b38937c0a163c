"""RepAdapter (Luo et al., 2023): sequential adapters that fold into ``qkv`` and ``fc1``."""

from __future__ import annotations

import torch
from torch import nn

from sls.backbones import all_blocks
from sls.errors import ConfigError
from sls.petl import PETLMethod, head_parameter_names, register_petl

FOLD_TARGETS = {"attn": "qkv", "mlp": "fc1"}
"""Branch of a block -> the linear layer that first reads the branch's input."""


class RepAdapterLayer(nn.Module):
    """x -> x + scale * up(dropout(down(x))).

    ``down`` is a linear map to the bottleneck (xavier-uniform, zero bias); ``up`` a
    grouped linear map back (a kernel-1 ``Conv1d`` with ``groups``), zero-initialised
    so the adapted model starts equal to the backbone.

    Args:
        dim: token width.
        bottleneck: hidden width.
        groups: groups of ``up``; must divide ``bottleneck`` and ``dim``.
        scale: factor s of the update.
        dropout: dropout on the bottleneck.
    """

    def __init__(self, dim: int, bottleneck: int, groups: int, scale: float, dropout: float) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Conv1d(bottleneck, dim, kernel_size=1, groups=groups)
        self.scale = scale
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.dropout(self.down(x))
        # Each token goes through the kernel-1 conv as a sequence of length one.
        update = self.up(hidden.reshape(-1, hidden.shape[-1], 1)).reshape(x.shape)
        return x + update * self.scale

    @torch.no_grad()
    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(matrix, offset)`` in float64 with ``forward(x) == x @ matrix.T + offset``
        when dropout is off (eval mode)."""
        down_weight, down_bias = self.down.weight.double(), self.down.bias.double()
        # The grouped conv as one dense (dim, bottleneck) matrix: its groups on the diagonal.
        up_weight = torch.block_diag(*self.up.weight.double()[..., 0].chunk(self.up.groups, dim=0))
        identity = torch.eye(up_weight.shape[0], dtype=torch.float64, device=up_weight.device)
        matrix = identity + self.scale * up_weight @ down_weight
        offset = self.scale * (up_weight @ down_bias + self.up.bias.double())
        return matrix, offset


class WithRepAdapter(nn.Module):
    """A block's attention or MLP behind a :class:`RepAdapterLayer`: the branch reads
    the adapted (norm1 or norm2) output."""

    def __init__(self, repadapter: RepAdapterLayer, branch: nn.Module) -> None:
        super().__init__()
        self.repadapter = repadapter
        self.branch = branch

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        # kwargs: the attention's mask arguments, passed through untouched.
        return self.branch(self.repadapter(x), **kwargs)


@torch.no_grad()
def fold(layer: RepAdapterLayer, linear: nn.Linear) -> None:
    """Fold ``layer`` into the ``linear`` that reads its output (in place).

    With ``layer(x) = M x + c``: ``W (M x + c) + b = (W M) x + (W c + b)``.
    """
    matrix, offset = layer.affine()
    weight = linear.weight.double()
    linear.bias.copy_(weight @ offset + linear.bias.double())
    linear.weight.copy_(weight @ matrix)


@register_petl
class RepAdapter(PETLMethod):
    """Sequential adapter in front of every block's attention and MLP, mergeable.

    :meth:`merge` folds each adapter into the ``qkv`` / ``fc1`` linear that follows,
    leaving exactly the plain backbone's modules and parameter shapes (so its speed).

    On Swin the adapter sits inside the attention module too, so it reads what
    ``qkv`` reads: the norm1 output shifted, padded and cut into windows. The adapter
    is per token, so that equals adapting before the windowing everywhere except on
    the padding tokens, which here get the adapter's offset exactly as a folded
    ``qkv`` bias gives them: the merged model equals the unmerged one.

    Hyper-parameters: ``bottleneck`` (hidden width), ``groups`` (groups of the up
    projection), ``scale`` (factor s), ``dropout``.
    """

    name = "repadapter"
    defaults = {"bottleneck": 8, "groups": 2, "scale": 1.0, "dropout": 0.1}
    counts = ("bottleneck", "groups")
    param_markers = (".repadapter.",)

    def insert(self, model: nn.Module) -> None:
        bottleneck, groups = self.hparams["bottleneck"], self.hparams["groups"]
        for block in all_blocks(model):
            dim = block.norm1.normalized_shape[0]
            if bottleneck % groups or dim % groups:
                raise ConfigError(
                    f"repadapter groups={groups} must divide both bottleneck={bottleneck} and the width {dim}"
                )
            for branch_name in FOLD_TARGETS:
                layer = RepAdapterLayer(dim, bottleneck, groups, self.hparams["scale"], self.hparams["dropout"])
                setattr(block, branch_name, WithRepAdapter(layer, getattr(block, branch_name)))

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold every adapter into the ``qkv`` / ``fc1`` after it and remove it (in place).

        The fold is the eval-mode adapter (dropout off). The merged model has the
        plain backbone's module structure and state-dict keys; it is meant for
        inference and export, so everything but the head is frozen. Returns ``model``.

        Raises:
            ConfigError: the model holds no adapter, or a branch does not feed its
                input to that linear layer alone.
        """
        folds = []
        block_names = {id(module): name for name, module in model.named_modules()}
        for block in all_blocks(model):
            for branch_name, linear_name in FOLD_TARGETS.items():
                wrapper = getattr(block, branch_name)
                if not isinstance(wrapper, WithRepAdapter):
                    continue
                linear = getattr(wrapper.branch, linear_name, None)
                # A gate (newer timm attention) would also read the adapted input.
                if (
                    not isinstance(linear, nn.Linear)
                    or linear.bias is None
                    or getattr(wrapper.branch, "gate", None) is not None
                ):
                    raise ConfigError(
                        f"repadapter cannot be merged into {block_names[id(block)]}.{branch_name}: it needs a biased "
                        f"{linear_name} linear layer reading the branch input alone"
                    )
                folds.append((block, branch_name, wrapper, linear))
        if not folds:
            raise ConfigError(f"{type(model).__name__} holds no repadapter to merge; apply the method first")
        # Checked first, changed after: a refused merge leaves the model untouched.
        for block, branch_name, wrapper, linear in folds:
            fold(wrapper.repadapter, linear)
            setattr(block, branch_name, wrapper.branch)
        head = head_parameter_names(model)
        for name, param in model.named_parameters():
            param.requires_grad_(name in head)
        return model

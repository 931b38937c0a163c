"""One forward pass for the requests of several tasks over their shared backbone.

Tasks batched apart make small batches: 32 clients over 16 tasks leave about two images
per task and pass. But the tasks of one backbone differ only in their own modules (PETL
modules, head) and their k, so their images can share a pass, as S-LoRA batches the
requests of many LoRA adapters of one language model. A :class:`MuxGroup` is one copy of
the backbone (every tensor shared) in which each of the tasks' own modules (the smallest
called module whose parameters are all a task's: a LoRA factor, an adapter, a RepAdapter
branch)
is a :class:`Mux` that runs each task's own module on that task's rows only. Everything
else, the patch embedding, the qkv / proj / MLP matmuls, attention and norms, runs once
over the whole mixed batch. Rows are sorted deepest k first; after block i the rows of
the tasks with k = i leave the pass; each task's own norm and head finish its rows.

Groups are built for classification ViTs whose tasks have the same own modules (one
PETL method with the same structure); other tasks are batched per task.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field

import torch
from torch import nn

from sls.backbones import shared_copy, truncate, vit
from sls.petl import petl_from_record

HEAD_PARTS = ("head", "fc_norm", "head_drop", "attn_pool")
"""Top-level modules of a timm ViT that :meth:`forward_head` runs: each task runs its own."""


def own_modules(model: nn.Module) -> dict[str, str]:
    """The outermost called modules whose parameters are all trainable (a task's own), by
    path, with their class names."""
    found: dict[str, str] = {}
    for name, module in model.named_modules():
        if any(name.startswith(root + ".") for root in found):
            continue
        if isinstance(module, (nn.ModuleDict, nn.ModuleList)):
            continue  # a container is not called: its members are
        params = list(module.parameters())
        if name and params and all(p.requires_grad for p in params):
            found[name] = type(module).__name__
    return found


@dataclass
class RowPlan:
    """Which member task owns which rows of the pass now: ``(member, rows)`` in row order,
    and the member of every row (a tensor on the model's device)."""

    segments: list[tuple[int, int]] = field(default_factory=list)
    rows: torch.Tensor | None = None


class Mux(nn.Module):
    """Runs each member task's own module on that task's rows, in the :class:`RowPlan`'s order.

    Members that are bias-free linear layers of one shape (LoRA's factors) run as ONE batched
    matmul with each row's own weight gathered (Punica's and S-LoRA's BGMV), so a pass over
    many tasks calls as many operators as a pass over one."""

    def __init__(self, members: list[nn.Module | None], plan: RowPlan) -> None:
        super().__init__()
        # Not registered as submodules: they belong to the tasks' models (and move with them).
        object.__setattr__(self, "members", members)
        object.__setattr__(self, "plan", plan)
        present = [m for m in members if m is not None]
        shape = present[0].weight.shape if present and isinstance(present[0], nn.Linear) else None
        stackable = shape is not None and all(type(m) is nn.Linear and m.bias is None and m.weight.shape == shape
                                              for m in present)  # fmt: skip
        stacked = None
        if stackable:  # (members, out, in); a member without this block never has rows here
            stacked = torch.stack([(m if m is not None else present[0]).weight.detach() for m in members])
        object.__setattr__(self, "stacked", stacked)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stacked is not None and len(self.plan.segments) > 1:
            weights = self.stacked[self.plan.rows].to(x.dtype)  # (rows, out, in)
            flat = x.reshape(x.shape[0], -1, x.shape[-1])
            return torch.bmm(flat, weights.transpose(1, 2)).reshape(*x.shape[:-1], weights.shape[1])
        outputs, start = [], 0
        for member, rows in self.plan.segments:
            outputs.append(self.members[member](x[start : start + rows]))
            start += rows
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


class MuxGroup:
    """Classification ViT tasks of one backbone and PETL structure, batched in one pass.

    Args:
        base: the shared frozen backbone (headless, every block).
        tasks: the member tasks (:class:`~sls.serve.pool.ServedTask`), at least two.
        runtime: the pool's runtime (device, autocast).
    """

    def __init__(self, base: nn.Module, tasks: list, runtime) -> None:
        # One plan per group, read by its Muxes: passes must not overlap (one inference thread).
        self.tasks, self.runtime, self.plan = list(tasks), runtime, RowPlan()
        self.depths = [int(task.record.depth) for task in self.tasks]
        template = shared_copy(base)
        petl_from_record(self.tasks[0].record.petl).apply(template)
        self.template = truncate(template, max(self.depths)).eval()
        for path in own_modules(self.template):
            if path.split(".")[0] in HEAD_PARTS:
                continue
            block = int(path.split(".")[1])
            members = [task.model.get_submodule(path) if block < depth else None
                       for task, depth in zip(self.tasks, self.depths)]  # fmt: skip
            parent, _, attribute = path.rpartition(".")
            setattr(self.template.get_submodule(parent), attribute, Mux(members, self.plan))
        self.template.requires_grad_(False)

    @staticmethod
    def signature(task) -> tuple | None:
        """What tasks must share to be batched together (None: the task cannot be): the
        backbone, and the paths and kinds of their own modules inside the blocks."""
        if task.task_type.name != "classification" or not vit.is_vit(task.model):
            return None
        own = own_modules(task.model)
        inside = {path: kind for path, kind in own.items() if path.split(".")[0] not in HEAD_PARTS}
        if any(not path.startswith("blocks.") for path in inside):
            return None  # an own module outside the blocks (a prompt, say): not handled
        if any(type(module).__module__.startswith("peft.") for module in task.model.modules()):
            return None  # peft's layers read their factors' attributes (weight, ...): batched per task
        # Block paths up to the task's k; deeper tasks add blocks, so key on the per-block pattern.
        pattern = sorted({(path.split(".", 2)[2], kind) for path, kind in inside.items()})
        # The same hyper-parameters: the template's non-own parts (LoRA's scaling) are the first task's.
        return (task.backbone_key, json.dumps(task.record.petl, sort_keys=True), repr(pattern))

    @torch.inference_mode()
    def forward(self, images: torch.Tensor, members: list[int]) -> list[torch.Tensor]:
        """Class probabilities of each row of ``images`` (float32, CPU) for its member task
        ``members[row]``, in the rows' order."""
        order = sorted(range(len(members)), key=lambda row: (-self.depths[members[row]], members[row]))
        device = next(self.template.parameters()).device
        outputs: list[torch.Tensor | None] = [None] * len(members)
        with self.runtime.autocast(device):
            x = self.runtime.inputs(images[order], device)
            x = self.template.norm_pre(self.template.patch_drop(self.template._pos_embed(self.template.patch_embed(x))))
            # x holds the rows order[:len(x)]: the deepest tasks' first, so rows leave from the end
            for index, block in enumerate(self.template.blocks):
                active = sum(1 for row in order if self.depths[members[row]] > index)
                if active < len(x) or index == 0:
                    self._finish(x[active:], order[active : len(x)], members, outputs)
                    x = x[:active]
                    if not active:  # every row has left; the deeper blocks are not needed
                        break
                    owners = [members[row] for row in order[:active]]
                    self.plan.segments, self.plan.rows = _segments(owners), torch.tensor(owners, device=x.device)
                x = block(x)
            self._finish(x, order[: len(x)], members, outputs)
        return outputs

    def _finish(self, x: torch.Tensor, rows: list[int], members: list[int], outputs: list) -> None:
        """Each task's own norm and head on its rows."""
        start = 0
        for member, count in _segments([members[row] for row in rows]):
            model = self.tasks[member].model
            logits = model.forward_head(model.norm(x[start : start + count]))
            for row, probabilities in zip(rows[start : start + count], logits.float().softmax(dim=-1).cpu()):
                outputs[row] = probabilities
            start += count


def _segments(owners: list[int]) -> list[tuple[int, int]]:
    """Runs of equal owners: ``[(owner, count), ...]``."""
    return [(owner, len(list(run))) for owner, run in itertools.groupby(owners)]

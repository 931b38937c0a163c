"""Retraining a pruned model, and the depth search under an accuracy budget.

A retraining strategy is a :class:`RetrainStrategy` subclass registered with
:func:`register_strategy` (the same pattern as PETL methods and criteria). Every
strategy trains only the trainable tensors of the pruned model (the kept blocks' PETL
modules and the head), with AdamW, for the same number of epochs over the same
shuffled training batches: strategies are compared at an equal budget.

- ``ft``: fine-tune on, from the fine-tuned values, at a small constant learning rate
  (``lr * lr_ratio``; 0.01 is the paper's code, which sets the rate to its minimum).
- ``clr``: re-run the whole schedule (warm-up, cosine) from the fine-tuned values.
- ``tfs``: train from scratch: the PETL modules and head are reset to the values they
  had before fine-tuning (the method's own initialisation, the same seeded draw), then
  the whole schedule runs.
- ``distill``: the whole schedule, from the fine-tuned values, with the unpruned
  fine-tuned model as a frozen teacher (eval mode, no gradient): Hinton's
  ``KL(p_teacher || p_student) * T^2`` on temperature-``T`` softmaxes, plus
  ``ce_weight`` times the cross-entropy with the labels, plus ``feature_weight`` times
  the mean squared difference between the pooled output of the student's last kept
  block and of the teacher's block of the same index (the cut). The student's kept
  blocks start equal to the teacher's, so the feature term keeps their features where
  the teacher had them while the head adapts to the shorter stack. Each step also runs
  the teacher forward, so an epoch costs more time than the other strategies'.

:func:`search_depth` finds the smallest depth whose accuracy stays within a budget of
the full model's, from a callable that retrains and measures one depth.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from sls._registry import Registry
from sls.backbones import all_blocks, pool_tokens
from sls.errors import ConfigError
from sls.runtime import Runtime
from sls.train import Schedule, train


class RetrainStrategy:
    """Base class: options in, :meth:`retrain` trains a pruned model in place.

    Subclasses set ``name``, ``description`` and ``defaults`` (every option with its
    default) and implement :meth:`retrain`.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    defaults: ClassVar[dict] = {}

    def __init__(self, **options) -> None:
        unknown = set(options) - set(self.defaults)
        if unknown:
            offered = ", ".join(sorted(self.defaults)) or "none"
            raise ConfigError(f"retraining strategy {self.name} has no option {', '.join(sorted(unknown))}; "
                              f"its options: {offered}")  # fmt: skip
        self.options = {**self.defaults, **options}
        for key, value in self.options.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"retraining option {key} must be a number >= 0, got {value!r}")

    def retrain(
        self,
        model: nn.Module,
        *,
        teacher: nn.Module | None,
        loader: DataLoader,
        epochs: int,
        schedule: Schedule,
        initial_state: dict[str, torch.Tensor],
        progress: bool = True,
        runtime: Runtime | None = None,
        after_epoch: Callable[[int, float], None] | None = None,
    ) -> list[float]:
        """Train ``model``'s trainable tensors in place.

        Args:
            model: the pruned model (blocks 1..k with their PETL modules, norm, head).
            teacher: the unpruned fine-tuned model (used by ``distill`` only; never changed).
            loader: the shuffled training batches.
            epochs: the retraining budget, the same for every strategy.
            schedule: the run's optimiser settings (peak rate, weight decay, warm-up,
                final rate).
            initial_state: the trainable tensors before fine-tuning, by name (``tfs``).
            progress: show a progress bar.
            runtime: precision and layout of the training (:mod:`sls.runtime`).
            after_epoch: called with (epoch, mean loss) after each epoch (see :func:`sls.train.train`).

        Returns:
            the mean training loss of each epoch.
        """
        raise NotImplementedError


_STRATEGIES: Registry[type[RetrainStrategy]] = Registry("retraining strategy")

register_strategy = _STRATEGIES.register
"""Class decorator registering a retraining strategy under ``cls.name``."""


def create_strategy(name: str, **options) -> RetrainStrategy:
    """Instantiate the registered strategy ``name`` with ``options`` over its defaults."""
    return _STRATEGIES.get(name)(**options)


def list_strategies() -> list[str]:
    return _STRATEGIES.names()


@register_strategy
class FineTune(RetrainStrategy):
    name = "ft"
    description = "go on from the fine-tuned values at a small constant rate, lr x lr_ratio"
    defaults = {"lr_ratio": 0.01}

    def retrain(self, model, *, teacher, loader, epochs, schedule, initial_state, progress=True, runtime=None,
                after_epoch=None):
        return train(model, loader, epochs=epochs, lr=schedule.lr * self.options["lr_ratio"],
                     weight_decay=schedule.weight_decay, schedule="constant", desc="retrain (ft)",
                     progress=progress, runtime=runtime, after_epoch=after_epoch)  # fmt: skip


@register_strategy
class CyclicSchedule(RetrainStrategy):
    name = "clr"
    description = "the whole warm-up + cosine schedule again, from the fine-tuned values"

    def retrain(self, model, *, teacher, loader, epochs, schedule, initial_state, progress=True, runtime=None,
                after_epoch=None):
        return train(model, loader, epochs=epochs, **schedule.train_kwargs(), desc="retrain (clr)",
                     progress=progress, runtime=runtime, after_epoch=after_epoch)  # fmt: skip


def reinitialise(model: nn.Module, initial_state: dict[str, torch.Tensor]) -> nn.Module:
    """Reset every trainable tensor that has a value in ``initial_state`` (in place).

    A trainable tensor the unpruned model did not train (the fresh final norm of a Swin
    cut before its last stage) keeps its own fresh value.
    """
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    reset = trainable.keys() & initial_state.keys()
    if not reset:
        raise ConfigError("no trainable tensor of the pruned model has an initial value to reset to")
    with torch.no_grad():
        for name in reset:
            trainable[name].copy_(initial_state[name])
    return model


@register_strategy
class FromScratch(RetrainStrategy):
    name = "tfs"
    description = "PETL modules and head reset to their initial values, then the whole schedule"

    def retrain(self, model, *, teacher, loader, epochs, schedule, initial_state, progress=True, runtime=None,
                after_epoch=None):
        reinitialise(model, initial_state)
        return train(model, loader, epochs=epochs, **schedule.train_kwargs(), desc="retrain (tfs)",
                     progress=progress, runtime=runtime, after_epoch=after_epoch)  # fmt: skip


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KL(softmax(teacher / T) || softmax(student / T)) * T^2``, averaged over the batch.

    Exactly zero when the two logits are equal; the ``T^2`` keeps the gradient's scale
    independent of ``T`` (Hinton et al., 2015).
    """
    return (
        F.kl_div(
            F.log_softmax(student_logits / temperature, dim=1),
            F.log_softmax(teacher_logits / temperature, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        * temperature**2
    )


@register_strategy
class Distill(RetrainStrategy):
    name = "distill"
    description = "the whole schedule, the unpruned model as a frozen teacher (soft logits at temperature T)"
    defaults = {"temperature": 2.0, "ce_weight": 0.0, "feature_weight": 0.0}

    def retrain(self, model, *, teacher, loader, epochs, schedule, initial_state, progress=True, runtime=None,
                after_epoch=None):
        if teacher is None:
            raise ConfigError("the distill strategy needs the unpruned fine-tuned model as its teacher")
        temperature, ce_weight = self.options["temperature"], self.options["ce_weight"]
        feature_weight = self.options["feature_weight"]
        if temperature <= 0:
            raise ConfigError(f"distillation temperature must be > 0, got {temperature}")
        teacher.eval()
        cut = len(all_blocks(model))
        outputs: dict[str, torch.Tensor] = {}
        hooks = []
        if feature_weight > 0:
            for key, net in (("student", model), ("teacher", teacher)):
                hook = all_blocks(net)[cut - 1].register_forward_hook(
                    lambda _m, _inp, out, key=key, net=net: outputs.__setitem__(key, pool_tokens(net, out))
                )
                hooks.append(hook)

        def objective(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                teacher_logits = teacher(images)
            student_logits = model(images)
            loss = distillation_loss(student_logits, teacher_logits, temperature)
            if ce_weight > 0:
                loss = loss + ce_weight * F.cross_entropy(student_logits, targets)
            if feature_weight > 0:
                loss = loss + feature_weight * F.mse_loss(outputs["student"], outputs["teacher"])
            return loss

        try:
            return train(model, loader, epochs=epochs, **schedule.train_kwargs(), objective=objective,
                         desc="retrain (distill)", progress=progress, runtime=runtime, after_epoch=after_epoch)  # fmt: skip
        finally:
            for hook in hooks:
                hook.remove()


@dataclass(frozen=True)
class DepthSearch:
    """Outcome of :func:`search_depth`.

    Attributes:
        depth: the smallest depth found within the budget.
        tried: ``(depth, accuracy)`` of every depth evaluated, in order; the full
            depth is never evaluated (it is the reference itself).
        evaluations: how many depths were evaluated (retrained and measured).
    """

    depth: int
    tried: list[tuple[int, float]]

    @property
    def evaluations(self) -> int:
        return len(self.tried)


def within_budget(accuracy: float, full_accuracy: float, max_drop: float) -> bool:
    """Whether ``accuracy`` is at most ``max_drop`` percentage points below ``full_accuracy``
    (both in [0, 1])."""
    return 100 * (full_accuracy - accuracy) <= max_drop + 1e-9


def search_depth(
    evaluate: Callable[[int], float],
    *,
    start: int,
    n_blocks: int,
    full_accuracy: float,
    max_drop: float,
) -> DepthSearch:
    """The smallest depth k whose accuracy stays within ``max_drop`` points of the full model's.

    Starts at ``start`` (SLS's k). If it is within the budget, probes k-1, k-3, k-7, ...
    (steps doubling) until a depth fails or 1 passes; if it is not, probes k+1, k+3,
    ... up to the full depth, which passes by definition and is not evaluated. The
    depths between the last failing and the first passing probe are then bisected.
    When SLS's k is the answer or one block short of it, this costs two evaluations.

    The bracketing assumes accuracy does not fall as blocks are added back. On a
    non-monotone curve the result is still within budget and the next depth below it
    was evaluated and failed (or it is 1), but a smaller passing depth may exist below.

    Args:
        evaluate: depth -> accuracy in [0, 1] (retrain and measure that depth).
        start: the first depth tried, 1..n_blocks.
        n_blocks: N, the full depth.
        full_accuracy: the unpruned model's accuracy in [0, 1].
        max_drop: the budget in percentage points, >= 0.
    """
    if not 1 <= start <= n_blocks:
        raise ConfigError(f"the search must start within 1..{n_blocks}, got {start}")
    if not max_drop >= 0:
        raise ConfigError(f"--max-drop must be >= 0 points, got {max_drop}")
    tried: list[tuple[int, float]] = []

    def passes(depth: int) -> bool:
        if depth == n_blocks:
            return True
        accuracy = float(evaluate(depth))
        tried.append((depth, accuracy))
        return within_budget(accuracy, full_accuracy, max_drop)

    step = 1
    if passes(start):
        good, bad = start, 0  # depth 0 stands for "fails"
        while good > 1:
            probe = max(1, good - step)
            if not passes(probe):
                bad = probe
                break
            good, step = probe, 2 * step
    else:
        bad = start
        while True:
            probe = min(n_blocks, bad + step)
            if passes(probe):
                good = probe
                break
            bad, step = probe, 2 * step
    while good - bad > 1 and bad >= 1:
        middle = (good + bad) // 2
        if passes(middle):
            good = middle
        else:
            bad = middle
    return DepthSearch(depth=good, tried=tried)

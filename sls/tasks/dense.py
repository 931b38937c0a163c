"""What the dense task types share: the encoder's maps, and a model around a timm encoder.

A :class:`DenseModel` holds the PETL-adapted timm model as ``encoder`` (built without a
classifier) and its task head as ``head``; :func:`sls.backbones.truncate` cuts the
encoder in place and then lets the model rebuild what reads the encoder's width
(:meth:`DenseModel.after_truncate`: only a Swin cut before its last stage narrows it).
The model computes its own training loss, ``model(images, targets)``, so the one
training loop (:func:`sls.train.train`) trains every task, data-parallel included.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from sls.backbones import BlockFeatures, all_blocks
from sls.data import Splits
from sls.data.dense import DENSE_EMBEDDED, DenseDataset, collate_dense
from sls.tasks import TaskType


def is_swin(encoder: nn.Module) -> bool:
    return hasattr(encoder, "layers") and not hasattr(encoder, "blocks")


def token_map(encoder: nn.Module, out: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """A block's (or the final norm's) output as an NCHW map: a ViT's patch tokens
    (prefix tokens dropped) on the patch grid; a Swin's NHWC map, permuted."""
    if out.dim() == 4:  # Swin: (B, H, W, C)
        return out.permute(0, 3, 1, 2)
    patch = encoder.patch_embed.patch_size
    height, width = image_hw[0] // patch[0], image_hw[1] // patch[1]
    tokens = out[:, encoder.num_prefix_tokens :]
    return tokens.transpose(1, 2).reshape(out.shape[0], out.shape[2], height, width)


def final_map(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The last kept block's output after the final norm, as an NCHW map."""
    return token_map(encoder, encoder.forward_features(images), images.shape[-2:])


def block_maps(encoder: nn.Module, images: torch.Tensor, visit: Callable[[int, torch.Tensor], None],
               first: Callable[[torch.Tensor], None] | None = None) -> None:  # fmt: skip
    """Run ``encoder.forward_features`` once and call ``visit(i, map)`` with each kept
    block's output as an NCHW map (i from 0, bottom-up; no final norm), as it is produced,
    and ``first(map)`` with block 1's input."""
    stack, hw = all_blocks(encoder), images.shape[-2:]
    hooks = [block.register_forward_hook(lambda _m, _i, out, i=i: visit(i, token_map(encoder, out, hw)))
             for i, block in enumerate(stack)]  # fmt: skip
    if first is not None:
        hooks.append(stack[0].register_forward_pre_hook(lambda _m, args: first(token_map(encoder, args[0], hw))))
    try:
        encoder.forward_features(images)
    finally:
        for hook in hooks:
            hook.remove()


class DenseModel(nn.Module):
    """A timm encoder (``encoder``) and a dense head (``head``, built by :meth:`make_head`).

    ``forward(images)`` predicts; ``forward(images, targets)`` returns the training loss.
    The head's buffers (a BatchNorm's running statistics) are task tensors like its weights.
    """

    is_dense_model = True
    task_buffer_prefixes = ("head.",)
    head_lr_scale = 10.0
    """The head trains at this multiple of the run's learning rate (:func:`sls.train.parameter_groups`)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    @property
    def width(self) -> int:
        return int(self.encoder.num_features)

    def make_head(self) -> nn.Module:
        raise NotImplementedError

    def after_truncate(self) -> None:
        """Rebuild the head when the cut changed the encoder's width (fresh and trainable,
        like a cut Swin's classifier); otherwise the trained head stays."""
        if getattr(self, "head_width", self.width) != self.width:
            device, training = next(self.head.parameters()).device, self.head.training
            self.head = self.make_head().to(device).train(training)
            self.head_width = self.width

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        return final_map(self.encoder, images)


def gather_blocks(encoder: nn.Module, dataset, images: list[int], pick: Callable[[list[int], torch.Tensor], torch.Tensor],
                  labels: np.ndarray, *, batch_size: int, progress: bool) -> BlockFeatures:  # fmt: skip
    """One pass over ``images`` (positions in ``dataset``, in order): ``pick(batch, map)``
    turns each kept block's NCHW map (and block 1's input) into the batch's sample rows."""
    device = next(encoder.parameters()).device
    collected: list[list[torch.Tensor]] = [[] for _ in all_blocks(encoder)]
    first: list[torch.Tensor] = []
    batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    for batch in tqdm(batches, desc="block features", unit="batch", disable=not progress):
        pixels = torch.stack([dataset[i][0] for i in batch]).to(device)
        block_maps(encoder, pixels, lambda i, fmap, batch=batch: collected[i].append(pick(batch, fmap)),
                   first=lambda fmap, batch=batch: first.append(pick(batch, fmap)))  # fmt: skip
    return BlockFeatures([torch.cat(c).numpy() for c in collected], labels, torch.cat(first).numpy())


class DenseTask(TaskType):
    """What the dense task types share: their data (``mnist-scenes`` or a user's layout),
    its own splits, datasets of (image, resized target), and every training image analysed
    (the task's ``samples`` count the regions, cells or boxes scored)."""

    dense = True
    collate = staticmethod(collate_dense)

    def load_data(self, spec: str):
        if spec in DENSE_EMBEDDED:
            return DENSE_EMBEDDED[spec]()
        from sls.data.layouts import load_dense_dataset

        return load_dense_dataset(spec, self.name)

    def classes(self, data) -> list[str]:
        return list(data.classes_for(self.name))

    def splits(self, data, *, train_size, test_size) -> Splits:
        return dense_splits(data, train_size=train_size, test_size=test_size)

    def dataset(self, data, indices, transform, img_size, *, skip_bad=False, progress=False, cache=True):
        return DenseDataset(data, indices, transform, img_size, self.name)

    def analysed(self, data, train, samples):
        return np.sort(train)


def dense_splits(data, *, train_size: int | None, test_size: int | None) -> Splits:
    """The set's own splits (a seeded 70 / 10 / 20 split when it has none), the train and
    test ones cut to a seeded subset of ``train_size`` / ``test_size`` images."""
    rng = np.random.default_rng(0)
    given = data.splits
    if given is None:
        order = rng.permutation(len(data))
        n_test, n_val = round(0.2 * len(data)), round(0.1 * len(data))
        given = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}

    def cut(indices, size):
        indices = np.sort(np.asarray(indices, dtype=np.int64))
        if size is None or size >= len(indices):
            return indices
        return np.sort(np.random.default_rng(0).choice(indices, size=size, replace=False))

    return Splits(train=cut(given["train"], train_size), val=cut(given.get("val", []), None),
                  test=cut(given["test"], test_size))  # fmt: skip

"""What each of two processes runs for tests/test_distributed.py.

:func:`check` runs in two processes forked by the test with torchrun's environment
variables set. Each writes what it computed to OUT/rank<r>.*: the gathered block
features of :func:`tiny_model` on :func:`tiny_loader` (101 images: the two processes
get 51 each, one of them padding), the k chosen from them, and its trainable tensors
after one data-parallel epoch, and those of a truncated copy of the trained model after one
more (a model that was wrapped for data-parallel training trains again once copied,
as a pruned model is retrained).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

N_IMAGES = 101  # odd: the sampler pads one process's share


def tiny_model() -> torch.nn.Module:
    """A random test_vit with LoRA whose adapters are non-zero (seeded), so they matter."""
    from sls.backbones import create_backbone
    from sls.petl import create_petl

    model, _ = create_backbone("test_vit", num_classes=3, weights="random", img_size=32)
    create_petl("lora").apply(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and "lora" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    return model.eval()


def tiny_dataset() -> TensorDataset:
    """Three classes, each brightening one colour channel, under noise."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(N_IMAGES) % 3
    images = 0.5 * torch.randn(N_IMAGES, 3, 32, 32, generator=generator)
    images[torch.arange(N_IMAGES), labels] += 1.5
    return TensorDataset(images, labels)


def tiny_loader(batch_size: int = 16) -> DataLoader:
    return DataLoader(tiny_dataset(), batch_size=batch_size, shuffle=False)


def check(out: Path) -> None:
    from sls import distributed
    from sls.backbones import block_features, truncate
    from sls.petl import trainable_state
    from sls.select import DepthSelector
    from sls.train import train

    with distributed.session("cpu"):
        assert distributed.active() and distributed.world_size() == 2
        me = distributed.rank()
        model = tiny_model()
        gathered = block_features(model, tiny_loader(), progress=False)
        np.savez(out / f"rank{me}.features.npz", labels=gathered.labels, block_input=gathered.block_input,
                 **{f"block_{i}": f for i, f in enumerate(gathered.features)})  # fmt: skip
        selector = distributed.run_on_main(DepthSelector(alpha=0.3, n_jobs=1).fit, gathered.features, gathered.labels)
        shuffled = DataLoader(tiny_dataset(), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
        losses = train(model, shuffled, epochs=1, lr=1e-2, progress=False)
        save_file(trainable_state(model), str(out / f"rank{me}.trained.safetensors"))
        pruned = truncate(copy.deepcopy(model), 3)
        train(pruned, shuffled, epochs=1, lr=1e-2, progress=False)
        save_file(trainable_state(pruned), str(out / f"rank{me}.retrained.safetensors"))
        summary = {"depth": int(selector.depth_), "scores": selector.scores_.tolist(), "losses": losses,
                   "steps": len(distributed.shuffled_shard(shuffled))}  # fmt: skip
        (out / f"rank{me}.json").write_text(json.dumps(summary))

"""DepGraph and ``sls compare`` on the dense task types: the encoder pruned, the head narrowed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

pytest.importorskip("torch_pruning")

from helpers import tiny_dense_model as tiny_model  # noqa: E402
from helpers import tiny_scenes  # noqa: E402

from sls.baselines.depgraph import depgraph_prune, ratio_for_parameter_reduction  # noqa: E402
from sls.data import make_transform  # noqa: E402
from sls.petl.merge import merge_for_inference  # noqa: E402
from sls.tasks.detection import DetectionModel  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: one thread is as fast, and a second one only waits on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _setup(task: str, **options):
    kind, model, info = tiny_model(task, **options)
    dataset = kind.dataset(tiny_scenes(), np.arange(8), make_transform(64, info.mean, info.std), 64)
    return model.eval(), DataLoader(dataset, batch_size=4, collate_fn=kind.collate)


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _head_inputs(model) -> dict[str, tuple[torch.Tensor, int]]:
    """Each head tensor that reads the encoder's channels, and the dim that does."""
    head = model.head
    if isinstance(model, DetectionModel):
        pyramid = head.backbone.pyramid
        return {"up": (pyramid.up.weight, 0), "project1": (pyramid.project[1][0].weight, 1),
                "project2": (pyramid.project[2][0].weight, 1)}  # fmt: skip
    return {"norm.weight": (head.norm.weight, 0), "norm.bias": (head.norm.bias, 0),
            "norm.running_mean": (head.norm.running_mean, 0), "norm.running_var": (head.norm.running_var, 0),
            "classify": (head.classify.weight, 1)}  # fmt: skip


def _residual(original, pruned, kept: dict[str, torch.Tensor]) -> torch.Tensor:
    """The kept residual channels: the entry of ``kept`` whose indices take the original
    position embedding to the pruned one (random, so no other entry does)."""
    width = pruned.encoder.num_features
    pos = original.encoder.pos_embed.detach()
    for indices in kept.values():
        indices = indices.long()
        if len(indices) == width and torch.equal(pos[..., indices], pruned.encoder.pos_embed.detach()):
            return indices
    raise AssertionError("no kept group holds the residual channels")


@pytest.mark.parametrize("task,options", [("segmentation", {}), ("detection", {"detector": "fcos"})])
def test_depgraph_prunes_a_dense_model_and_narrows_its_head(task, options):
    model, loader = _setup(task, **options)
    with torch.no_grad():  # non-trivial BatchNorm statistics: slicing them must keep each channel's
        for name, (tensor, _) in _head_inputs(model).items():
            if name.startswith("norm.running"):
                tensor.copy_(torch.rand_like(tensor) + 0.5)
    before = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    pruned, kept = depgraph_prune(model, loader, ratio=0.3, n_batches=2, return_kept=True)
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())  # untouched

    width = pruned.encoder.num_features
    assert width < model.encoder.num_features and width % 8 == 0
    assert pruned.head_width == width and _count(pruned) < _count(model)
    assert not pruned.training and not pruned.head.training
    # trainable flags as before: the LoRA folded away, the head trainable
    assert all(p.requires_grad for n, p in pruned.named_parameters() if n.startswith("head."))
    assert not any(p.requires_grad for n, p in pruned.named_parameters() if n.startswith("encoder."))

    residual = _residual(merge_for_inference(model), pruned, kept)
    original, narrowed = _head_inputs(model), _head_inputs(pruned)
    for name, (tensor, dim) in original.items():
        mine = narrowed[name][0]
        assert mine.shape[dim] == width
        assert torch.equal(mine.detach(), tensor.detach().index_select(dim, residual)), name

    images, targets = next(iter(loader))
    with torch.no_grad():
        out = pruned(images)
    if task == "segmentation":
        assert out.shape == (4, 4, 64, 64) and torch.isfinite(out).all()
    else:
        assert len(out) == 4 and all({"boxes", "scores", "labels"} <= set(d) for d in out)
    loss = pruned.train()(images, targets)  # the pruned model still trains
    assert torch.isfinite(loss)


def test_a_pruned_dense_model_retrains_its_petl_and_whole_head():
    from types import SimpleNamespace

    from sls.compare import _make_trainable

    model, loader = _setup("segmentation")
    record = SimpleNamespace(petl={"method": "lora"})
    pruned = _make_trainable(depgraph_prune(model, loader, ratio=0.3, n_batches=1), record)
    trainable = {name for name, p in pruned.named_parameters() if p.requires_grad}
    head = {name for name, _ in pruned.named_parameters() if name.startswith("head.")}
    assert head <= trainable and any("lora" in name for name in trainable - head)  # LoRA back in the encoder
    assert all("lora" in name for name in trainable - head)
    images, masks = next(iter(loader))
    pruned.train()(images, masks).backward()
    assert all(pruned.get_parameter(name).grad is not None for name in head)


def test_taylor_importance_comes_from_the_dense_loss(monkeypatch):
    model, loader = _setup("detection", detector="fcos")
    calls = []
    real = DetectionModel.forward

    def counted(self, images, targets=None):
        calls.append(targets is not None)
        return real(self, images, targets)

    monkeypatch.setattr(DetectionModel, "forward", counted)
    taylor, kept_taylor = depgraph_prune(model, loader, ratio=0.3, n_batches=2, return_kept=True)
    assert calls == [True, True]  # the loss of each importance batch, with its boxes
    calls.clear()
    magnitude, kept_magnitude = depgraph_prune(model, loader, ratio=0.3, importance="magnitude", return_kept=True)
    assert calls == []  # no gradient needed
    assert {k: len(v) for k, v in kept_taylor.items()} == {k: len(v) for k, v in kept_magnitude.items()}
    assert any(not torch.equal(kept_taylor[k], kept_magnitude[k]) for k in kept_taylor)
    assert _count(taylor) == _count(magnitude)


def test_the_parameter_search_counts_the_whole_dense_model():
    model, loader = _setup("segmentation")
    full = _count(model)
    pruned = depgraph_prune(model, loader, ratio=0.3, importance="magnitude")
    removed = full - _count(pruned)
    ratio = ratio_for_parameter_reduction(model, loader, removed)
    assert _count(depgraph_prune(model, loader, ratio=ratio, importance="magnitude")) == _count(pruned)


@pytest.mark.slow
def test_compare_runs_on_a_segmentation_task(tmp_path):
    from helpers import write_mask_folder

    from sls.compare import compare
    from sls.config import RunConfig
    from sls.stages import run

    data = tiny_scenes(n=16)
    data.splits = {"train": np.arange(10), "val": np.arange(10, 12), "test": np.arange(12, 16)}
    folder = tmp_path / "data"
    write_mask_folder(folder, data)
    task = tmp_path / "task"
    run(RunConfig(task="segmentation", data=str(folder), model="test_vit", weights="random", img_size=64, epochs=1,
                  retrain_epochs=1, batch_size=4, analysis_samples=60, perplexity=5.0, depth=3, throughput_batch=2,
                  progress=False, out=str(task)))  # fmt: skip
    result = compare(task, ratios=[0.3], depths=[2], retrain_epochs=None, progress=False)
    assert result["settings"]["metric"] == "mIoU"
    rows = result["rows"]
    assert {row["method"] for row in rows} == {"full", "sls", "depgraph"}
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in rows)
    depgraph = [row for row in rows if row["method"] == "depgraph"]
    assert all(row["parameters"] < rows[0]["parameters"] for row in depgraph if row["ratio"] > 0)
    assert (task / "compare" / "compare.png").is_file() and (task / "compare" / "compare.csv").is_file()

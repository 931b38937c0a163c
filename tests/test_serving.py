"""TaskPool: many tasks over one shared backbone, each predicting as its own folder does."""

from __future__ import annotations

import pytest
import torch

from sls.config import RunConfig
from sls.data import load_dataset
from sls.errors import TaskRecordError
from sls.experiment import load_task
from sls.serving import TaskPool
from sls.stages import run, stage_finetune

TINY = dict(model="test_vit", weights="random", data="digits", img_size=32, train_samples=200, test_samples=60,
            analysis_samples=None, epochs=2, retrain_epochs=1, lr=3e-2, batch_size=32, throughput_batch=4,
            force=True, progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    made = {}
    for name, extra in {"lora3": dict(petl="lora", depth=3), "adapter2": dict(petl="adapter", depth=2),
                        "repadapter5": dict(petl="repadapter", depth=5, seed=1)}.items():  # fmt: skip
        made[name] = root / name
        run(RunConfig(**TINY | extra, out=str(made[name])))
    return made


def _images(n=6):
    data = load_dataset("digits")
    return [data.image(i) for i in range(n)]


def test_every_task_predicts_as_its_folder_does_over_one_shared_backbone(tasks):
    pool = TaskPool()
    for name, folder in tasks.items():
        pool.add(folder, name)
    assert len(pool.backbones) == 1  # one test_vit for all three
    base, _ = next(iter(pool.backbones.values()))
    shared = {p.data_ptr() for p in base.parameters()}
    for name, folder in tasks.items():
        served = pool.tasks[name]
        alone, record = load_task(folder)
        batch = torch.stack([served.transform(image) for image in _images()])
        with torch.inference_mode():
            expected = alone(batch).softmax(dim=-1)
        torch.testing.assert_close(pool.predict(name, batch), expected, rtol=0, atol=0)
        # The task's own tensors are its PETL modules and head; the rest is the shared backbone's storage.
        own = {p.data_ptr() for p in served.model.parameters()} - shared
        assert len(own) == sum(1 for p in alone.parameters() if p.requires_grad)
        assert len(served.model.blocks) == record.depth
        assert served.describe()["k"] == record.depth and served.describe()["task_bytes"] > 0
    assert pool.shared_bytes() == sum(p.numel() * 4 for p in base.parameters())


def test_a_folder_that_is_not_a_pruned_classification_task_is_refused(tmp_path):
    folder = tmp_path / "finetuned"
    stage_finetune(RunConfig(**TINY, out=str(folder)))
    with pytest.raises(TaskRecordError, match="not pruned yet"):
        TaskPool().add(folder)

"""TaskPool: many tasks over one shared backbone, each predicting as its own folder does."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sls.config import RunConfig
from sls.data import load_dataset
from sls.errors import TaskRecordError
from sls.experiment import load_task
from sls.serve import TaskPool
from sls.stages import stage_finetune

CLASSIFIERS = ("lora3", "adapter2", "repadapter5")


@pytest.fixture
def tasks(served_tasks):
    return {name: served_tasks[name] for name in CLASSIFIERS}


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


def test_a_folder_that_is_not_pruned_is_refused(tmp_path):
    folder = tmp_path / "finetuned"
    stage_finetune(RunConfig(model="test_vit", weights="random", data="digits", img_size=32, train_samples=100,
                             test_samples=30, epochs=1, progress=False, out=str(folder)))  # fmt: skip
    with pytest.raises(TaskRecordError, match="not pruned yet"):
        TaskPool().add(folder)


def test_dense_tasks_answer_as_sls_predict_writes(served_tasks, tmp_path):
    from helpers import tiny_scenes
    from PIL import Image

    from sls.cli import main

    pool = TaskPool()
    for name in ("seg3", "det2", "lora3"):
        pool.add(served_tasks[name], name)
    assert len(pool.backbones) == 2  # 64 px for the dense tasks, 32 px for the classifier
    image = Image.fromarray(tiny_scenes(n=16).scenes.images[14]).resize((80, 72))  # not the model's size
    image.save(tmp_path / "scene.png")
    for name in ("seg3", "det2"):
        out = tmp_path / name
        assert main(["predict", str(served_tasks[name]), str(tmp_path / "scene.png"), "--out", str(out),
                     "--threshold", "0.0"]) == 0  # fmt: skip
        answer = pool.answer(name, [image], threshold=0.0)[0]
        if name == "seg3":
            written = np.asarray(Image.open(out / "scene.png"))
            assert answer["mask"].shape == (72, 80)
            np.testing.assert_array_equal(answer["mask"], written)
        else:
            written = json.loads((out / "scene.json").read_text())["boxes"]
            assert answer["boxes"] == written and len(written) > 0
    pool.remove("seg3")
    assert len(pool.backbones) == 2  # the detection task still uses the 64 px backbone
    pool.remove("det2")
    assert len(pool.backbones) == 1 and set(pool.tasks) == {"lora3"}


def test_task_folders_are_found_in_a_folder_of_tasks(served_tasks, tmp_path):
    from sls.serve import task_folders

    root = served_tasks["lora3"].parent
    assert task_folders([root]) == sorted(served_tasks.values())
    assert task_folders([served_tasks["seg3"]]) == [served_tasks["seg3"]]
    with pytest.raises(TaskRecordError, match="no such task folder"):
        task_folders([tmp_path / "missing"])


def test_tasks_of_one_backbone_and_petl_structure_share_one_pass(served_tasks, tmp_path):
    import shutil

    from sls.serve.mux import MuxGroup

    shutil.copytree(served_tasks["lora3"], tmp_path / "lora3b")
    pool = TaskPool()
    for name in ("lora3", "lora5", "adapter2"):
        pool.add(served_tasks[name], name)
    pool.add(tmp_path / "lora3b")
    signatures = {name: MuxGroup.signature(task) for name, task in pool.tasks.items()}
    assert signatures["lora3"] == signatures["lora5"] == signatures["lora3b"] != signatures["adapter2"]
    members = ["lora3", "lora5", "lora3b"]
    group = MuxGroup(next(iter(pool.backbones.values()))[0], [pool.tasks[n] for n in members], pool.runtime)
    images = torch.stack([pool.tasks["lora3"].transform(image) for image in _images(9)])
    owners = [0, 1, 2, 1, 0, 0, 2, 1, 1]  # interleaved, as requests arrive
    mixed = group.forward(images, owners)
    for row, owner in enumerate(owners):
        alone = pool.forward(members[owner], images[row : row + 1])[0]
        torch.testing.assert_close(mixed[row], alone, rtol=0, atol=1e-6)
    # lora3b is lora3's folder: the same answers, by two separately loaded tasks.
    torch.testing.assert_close(mixed[0], group.forward(images[:1], [2])[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("targets, grouped", [(["q", "v"], True), (["qkv"], False)])
def test_only_lora_the_mux_can_batch_is_grouped(targets, grouped):
    from types import SimpleNamespace

    from sls.backbones import create_backbone
    from sls.petl import create_petl
    from sls.serve.mux import MuxGroup

    model, _ = create_backbone("test_vit", num_classes=3, weights="random", img_size=32)
    model.requires_grad_(False)
    create_petl("lora", target_modules=targets).apply(model)
    model.reset_classifier(3)
    task = SimpleNamespace(task_type=SimpleNamespace(name="classification"), model=model, backbone_key=("test_vit",),
                           record=SimpleNamespace(petl={"method": "lora", "hparams": {"target_modules": targets}}))  # fmt: skip
    # peft's layers (a whole qkv adapted through peft) read their factors' weights: not muxed
    assert (MuxGroup.signature(task) is not None) == grouped


@pytest.mark.parametrize("name", ["adapter2", "repadapter5"])
def test_tasks_of_other_petl_methods_share_a_pass_too(served_tasks, tmp_path, name):
    import shutil

    shutil.copytree(served_tasks[name], tmp_path / "twin")
    pool = TaskPool()
    pool.add(served_tasks[name], name)
    pool.add(tmp_path / "twin")
    group, _ = pool.placement[name]
    assert [t.name for t in group.tasks] == [name, "twin"]
    images = torch.stack([pool.tasks[name].transform(image) for image in _images(5)])
    mixed = group.forward(images, [1, 0, 0, 1, 0])
    torch.testing.assert_close(torch.stack(mixed), pool.forward(name, images), rtol=0, atol=1e-6)

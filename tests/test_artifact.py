"""Task folders: save, load, round trip, refusal of the wrong backbone."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import randomize_trainable
from safetensors.torch import load_file, save_file

from sls.artifact import RECORD_FILE, save_task, task_file, task_tensor_bytes
from sls.backbones import create_backbone, truncate
from sls.errors import TaskRecordError
from sls.experiment import load_task
from sls.petl import create_petl
from sls.record import read_record


def trained_task(tmp_path, petl="lora", depth=3, weights="random"):
    model, info = create_backbone("test_vit", num_classes=4, weights=weights, img_size=32)
    method = create_petl(petl)
    method.apply(model)
    truncate(model, depth)
    randomize_trainable(model, scale=1.0)
    record = {"backbone": info.to_dict(), "petl": {"method": method.name, "hparams": method.hparams},
              "depth": depth, "num_classes": 4}
    save_task(tmp_path / "task", model, record)
    return model, tmp_path / "task"


def tensor_file(task_dir):
    return task_file(read_record(task_dir), task_dir)


@pytest.mark.parametrize("petl", ["lora", "adapter"])
def test_round_trip_gives_an_identical_model(tmp_path, tiny_images, petl):
    model, task_dir = trained_task(tmp_path, petl)
    loaded, record = load_task(task_dir)
    record = record.to_dict()
    assert record["depth"] == 3 and len(loaded.blocks) == 3
    images, _ = tiny_images
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images), rtol=0, atol=0)
    assert loaded.state_dict().keys() == model.state_dict().keys()


def test_task_file_holds_only_kept_petl_and_head(tmp_path):
    model, task_dir = trained_task(tmp_path, "lora", depth=2)
    state = load_file(str(tensor_file(task_dir)))
    assert set(state) == {
        *(f"blocks.{b}.attn.qkv.lora_{ab}.{part}.weight" for b in range(2) for ab in "AB" for part in "qv"),
        "head.weight", "head.bias",
    }  # fmt: skip
    assert tensor_file(task_dir).stat().st_size == task_tensor_bytes(model)
    # r=8 LoRA on q and v of a 64-wide model: per block and part A is 8x64, B is 64x8; head 4x64 + 4.
    assert sum(t.numel() for t in state.values()) == 2 * 2 * (8 * 64 + 64 * 8) + 4 * 64 + 4


def test_wrong_backbone_is_refused(tmp_path):
    _, task_dir = trained_task(tmp_path)
    other, _ = create_backbone("test_vit", num_classes=0, weights="random")
    with torch.no_grad():
        other.blocks[0].norm1.weight.add_(0.5)
    path = tmp_path / "other.safetensors"
    save_file(other.state_dict(), str(path))
    with pytest.raises(TaskRecordError, match="differ from those task .* was trained on"):
        load_task(task_dir, weights=path)


def test_incomplete_or_inconsistent_folders(tmp_path):
    with pytest.raises(TaskRecordError, match="record.json not found"):
        load_task(tmp_path)
    _, task_dir = trained_task(tmp_path)
    tensor_file(task_dir).unlink()
    with pytest.raises(TaskRecordError, match=r"task-[0-9a-f]{16}\.safetensors not found"):
        load_task(task_dir)
    # Another task's tensors under a record that names them (hash and all) but a deeper k.
    _, other_dir = trained_task(tmp_path / "b")
    other = json.loads((other_dir / RECORD_FILE).read_text())
    record = json.loads((task_dir / RECORD_FILE).read_text())
    record["depth"], record["files"] = 4, other["files"]
    (task_dir / RECORD_FILE).write_text(json.dumps(record))
    (task_dir / other["files"]["task"]["file"]).write_bytes((other_dir / other["files"]["task"]["file"]).read_bytes())
    with pytest.raises(TaskRecordError, match="does not match its record"):
        load_task(task_dir)
    (task_dir / RECORD_FILE).write_text("{not json")
    with pytest.raises(TaskRecordError, match="not valid JSON"):
        load_task(task_dir)


def test_saving_again_leaves_no_temporary_files(tmp_path):
    model, task_dir = trained_task(tmp_path)
    save_task(task_dir, model, json.loads((task_dir / RECORD_FILE).read_text()))
    assert sorted(p.name for p in task_dir.iterdir()) == [RECORD_FILE, tensor_file(task_dir).name]


@pytest.mark.parametrize("damage", ["truncated", "one byte flipped", "not safetensors"])
def test_a_damaged_tensor_file_is_named_by_its_hash(tmp_path, damage):
    _, task_dir = trained_task(tmp_path)
    path = tensor_file(task_dir)
    data = path.read_bytes()
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "one byte flipped":
        data = data[:-1] + bytes([data[-1] ^ 1])
    else:
        data = b"\x00" * len(data)
    path.write_bytes(data)
    with pytest.raises(TaskRecordError, match=f"{path.name} is damaged: its sha256 is not the one its record names"):
        load_task(task_dir)


def test_a_record_without_hashes_still_refuses_an_unreadable_file(tmp_path):
    """A format-2 record names task.safetensors without a hash: a truncated file is one line."""
    _, task_dir = trained_task(tmp_path)
    record = json.loads((task_dir / RECORD_FILE).read_text())
    data = tensor_file(task_dir).read_bytes()
    record["format"] = 2
    del record["files"]
    (task_dir / RECORD_FILE).write_text(json.dumps(record))
    (task_dir / "task.safetensors").write_bytes(data[:100])
    with pytest.raises(TaskRecordError, match="task.safetensors is not a readable safetensors file"):
        load_task(task_dir)
    (task_dir / "task.safetensors").write_bytes(data)
    assert len(load_task(task_dir)[0].blocks) == 3


def test_a_record_cannot_name_a_file_outside_its_folder(tmp_path):
    _, task_dir = trained_task(tmp_path)
    record = json.loads((task_dir / RECORD_FILE).read_text())
    record["files"]["task"]["file"] = "../../etc/passwd"
    (task_dir / RECORD_FILE).write_text(json.dumps(record))
    with pytest.raises(TaskRecordError, match="not a file of its folder"):
        load_task(task_dir)

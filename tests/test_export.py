"""Standalone export: LoRA folding, the three file formats against the library model,
prediction, and refusal of an unknown format."""

from __future__ import annotations

import importlib.util

import pytest
import timm
import torch
from helpers import randomize_trainable
from safetensors.torch import load_file

from sls.backbones import create_backbone, truncate
from sls.errors import ConfigError
from sls.export import deployable_model, export_model, merge_for_inference, predict, read_export_metadata
from sls.petl import create_petl

DEPTH, NUM_CLASSES = 3, 4
needs_onnxruntime = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime is not installed (pip install onnxruntime)"
)


def task_model(petl="lora"):
    """A task's model as load_task returns it: test_vit at 32 px, PETL applied,
    truncated to 3 blocks; its PETL tensors non-zero (LoRA B starts at zero)."""
    model, _ = create_backbone("test_vit", num_classes=NUM_CLASSES, weights="random", img_size=32)
    create_petl(petl).apply(model)
    truncate(model, DEPTH)
    randomize_trainable(model)
    return model.eval()


@pytest.fixture
def images(tiny_images):
    return tiny_images[0][:6]


def reference(model, images):
    with torch.no_grad():
        return model(images)


def test_merging_lora_keeps_the_outputs_and_leaves_a_plain_vit(images):
    model = task_model("lora")
    merged = merge_for_inference(model)
    torch.testing.assert_close(reference(merged, images), reference(model, images), rtol=0, atol=1e-5)
    assert all(type(block.attn.qkv) is torch.nn.Linear for block in merged.blocks)
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    plain, _ = create_backbone("test_vit", num_classes=NUM_CLASSES, weights="random", img_size=32)
    truncate(plain, DEPTH)
    assert {k: v.shape for k, v in merged.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    assert not merged.training
    # The input model keeps its LoRA layers.
    assert sum("lora_" in name for name, _ in model.named_parameters()) == 4 * DEPTH  # A and B of q and v


def test_merging_leaves_an_adapter_in_place(images):
    model = task_model("adapter")
    merged = merge_for_inference(model)
    torch.testing.assert_close(reference(merged, images), reference(model, images), rtol=0, atol=0)
    assert merged.state_dict().keys() == model.state_dict().keys()


def test_torchscript_export_matches_the_library_model(tmp_path, images):
    model = task_model("lora")
    path = export_model(model, tmp_path / "model.pt", "torchscript")
    loaded = torch.jit.load(str(path))
    # Traced on one image; a batch of six runs the same graph.
    torch.testing.assert_close(reference(loaded, images), reference(model, images), rtol=0, atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temporary file left


@needs_onnxruntime
def test_onnx_export_matches_the_library_model_for_any_batch(tmp_path, images):
    import onnxruntime

    model = task_model("lora")
    path = export_model(model, tmp_path / "model.onnx", "onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (images[:1], images):
        (logits,) = session.run(None, {"images": batch.numpy()})
        torch.testing.assert_close(torch.from_numpy(logits), reference(model, batch), rtol=0, atol=1e-4)


def test_safetensors_export_loads_into_a_plain_timm_model(tmp_path, images):
    model = task_model("lora")
    path = export_model(model, tmp_path / "model.safetensors", "safetensors")
    metadata = read_export_metadata(path)
    assert metadata == {
        "format": 2, "timm_name": "test_vit", "depth": DEPTH, "num_classes": NUM_CLASSES, "img_size": 32, "petl": [],
        "timm_kwargs": {"depth": DEPTH, "num_classes": NUM_CLASSES, "img_size": 32},
    }  # fmt: skip
    plain = timm.create_model(metadata["timm_name"], **metadata["timm_kwargs"])
    plain.load_state_dict(load_file(str(path)), strict=True)
    plain.eval()
    torch.testing.assert_close(reference(plain, images), reference(model, images), rtol=0, atol=1e-5)


@pytest.mark.parametrize("depth", [3, 4, 6])  # inside stage 2, its end (narrower head), the full model
def test_a_pruned_swin_exports_and_rebuilds_from_timm_alone(tmp_path, depth):
    from helpers import images_for
    from test_swin import SWIN_KWARGS, perturb, tiny_swin

    model, _ = tiny_swin(num_classes=NUM_CLASSES)
    create_petl("repadapter").apply(model)
    truncate(model, depth)
    perturb(model)
    model.eval()
    x = images_for(model, n=3)
    path = export_model(deployable_model(model), tmp_path / "swin.safetensors", "safetensors", model_kwargs=SWIN_KWARGS)
    metadata = read_export_metadata(path)
    assert metadata["petl"] == [] and metadata["depth"] == depth  # RepAdapter folded away
    plain = timm.create_model(metadata["timm_name"], **metadata["timm_kwargs"])
    plain.load_state_dict(load_file(str(path)), strict=True)
    torch.testing.assert_close(reference(plain.eval(), x), reference(model, x), rtol=0, atol=1e-4)
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        onnx_path = export_model(model, tmp_path / "swin.onnx", "onnx")
        session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        (logits,) = session.run(None, {"images": x.numpy()})
        torch.testing.assert_close(torch.from_numpy(logits), reference(model, x), rtol=0, atol=1e-4)


def test_exporting_a_model_of_another_family_is_refused(tmp_path):
    model = timm.create_model("resnet18", num_classes=2)
    with pytest.raises(ConfigError, match="sls exports timm ViT and Swin models, not ResNet"):
        export_model(model, tmp_path / "r.safetensors", "safetensors", img_size=32)
    assert list(tmp_path.iterdir()) == []


def test_safetensors_export_of_an_adapter_model_says_so(tmp_path):
    path = export_model(task_model("adapter"), tmp_path / "model.safetensors", "safetensors")
    assert read_export_metadata(path)["petl"] == ["adapter"]
    assert any(".adapter." in name for name in load_file(str(path)))


def test_unknown_format_is_refused_and_writes_nothing(tmp_path):
    with pytest.raises(ConfigError, match="unknown export format 'tflite'"):
        export_model(task_model("lora"), tmp_path / "model.tflite", "tflite")
    assert list(tmp_path.iterdir()) == []


def test_predict_gives_labels_and_class_probabilities(images):
    model = task_model("lora")
    labels, probabilities = predict(model, images)
    assert probabilities.shape == (len(images), NUM_CLASSES)
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(len(images)))
    assert torch.equal(labels, reference(model, images).argmax(dim=1))
    with pytest.raises(ConfigError, match="batch of images"):
        predict(model, images[0])


@pytest.mark.parametrize("content", [b"", b"\x00" * 64, b"PK\x03\x04 a zip, not safetensors"])
def test_reading_an_export_of_the_wrong_format_is_one_line(tmp_path, content):
    from sls.errors import ConfigError

    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"{path} is not a readable .safetensors export"):
        read_export_metadata(path)

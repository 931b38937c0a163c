"""`sls export --format peft`: a LoRA task as a peft adapter folder that
`PeftModel.from_pretrained` loads onto the pruned timm model with the task's outputs;
the q,v LoRA as one peft LoRA on the fused qkv; other PETL methods refused in one line."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import timm
import torch
from helpers import randomize_trainable
from safetensors.torch import load_file, save_file

from sls.artifact import save_task
from sls.backbones import create_backbone, truncate
from sls.cli import main
from sls.errors import ConfigError
from sls.experiment import load_task
from sls.export import PEFT_CONFIG, PEFT_README, PEFT_WEIGHTS, export_peft, read_export_metadata
from sls.petl import create_petl

VIT = dict(model="test_vit", img_size=32, model_kwargs={})  # 6 blocks, width 64
DEPTH, NUM_CLASSES, RANK = 3, 4, 8


def trained_task(tmp_path, petl="lora", backbone=VIT, depth=DEPTH, weights="random", **hparams):
    """A pruned task folder (on random weights); every task tensor non-zero (LoRA B starts at zero)."""
    model, info = create_backbone(backbone["model"], num_classes=NUM_CLASSES, weights=weights,
                                  img_size=backbone["img_size"], model_kwargs=backbone["model_kwargs"])  # fmt: skip
    method = create_petl(petl, **hparams)
    method.apply(model)
    truncate(model, depth)
    randomize_trainable(model)
    record = {"backbone": info.to_dict(), "petl": {"method": method.name, "hparams": method.hparams},
              "depth": depth, "num_classes": NUM_CLASSES}  # fmt: skip
    return save_task(tmp_path / "task", model, record)


def peft_model(out_dir, backbone=VIT):
    """The README's recipe: the backbone's first k blocks in the timm architecture the
    export names, then the adapter. Returns the model and peft's warnings about keys."""
    metadata = read_export_metadata(out_dir / PEFT_WEIGHTS)
    full, _ = create_backbone(backbone["model"], num_classes=0, weights="random", img_size=backbone["img_size"],
                              model_kwargs=backbone["model_kwargs"])  # fmt: skip
    model = timm.create_model(metadata["timm_name"], **metadata["timm_kwargs"])
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in full.state_dict().items() if k in own and v.shape == own[k].shape},
                          strict=False)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(model, str(out_dir)).eval()
    return loaded, [str(w.message) for w in caught if "key" in str(w.message).lower()]


def images(side=32, n=5):
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(0))


def logits(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        (None, {"r": 2 * RANK, "lora_alpha": 2 * RANK, "target_modules": ["qkv"], "rank_pattern": {}}),  # q,v
        ("qkv", {"r": RANK, "lora_alpha": RANK, "target_modules": ["qkv"], "rank_pattern": {}}),  # legacy
        ("q,v,fc1", {"r": RANK, "lora_alpha": RANK, "target_modules": ["fc1", "qkv"], "rank_pattern": {"qkv": 16}}),
    ],
)
def test_peft_loads_the_adapter_onto_timm_with_the_tasks_outputs(tmp_path, targets, expected):
    hparams = {} if targets is None else {"target_modules": targets}
    task_dir = trained_task(tmp_path, **hparams)
    task_model, record = load_task(task_dir)
    out = export_peft(task_model, tmp_path / "peft", backbone=record.backbone)
    assert sorted(p.name for p in out.iterdir()) == sorted([PEFT_WEIGHTS, PEFT_CONFIG, PEFT_README])
    config = json.loads((out / PEFT_CONFIG).read_text())
    assert {key: config[key] for key in expected} == expected
    assert config["peft_type"] == "LORA" and config["use_rslora"] is False and config["use_dora"] is False
    assert config["modules_to_save"] == ["head"] and config["base_model_name_or_path"] == "test_vit"
    assert config["alpha_pattern"] == expected["rank_pattern"]  # alpha = r everywhere: sls's scaling alpha / r = 1
    model, key_warnings = peft_model(out)
    assert key_warnings == []
    x = images()
    torch.testing.assert_close(logits(model, x), logits(task_model, x), rtol=0, atol=1e-5)
    # merge_and_unload, as the README says, gives a plain timm model with the same outputs.
    merged = model.merge_and_unload()
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, x), logits(task_model, x), rtol=0, atol=1e-5)


def test_q_v_lora_is_one_qkv_lora_with_block_structured_b(tmp_path):
    task_model, record = load_task(trained_task(tmp_path))
    out = export_peft(task_model, tmp_path / "peft", backbone=record.backbone)
    state, config = load_file(str(out / PEFT_WEIGHTS)), json.loads((out / PEFT_CONFIG).read_text())
    scaling = config["lora_alpha"] / config["r"]  # peft's, without rsLoRA
    prefix = "base_model.model."
    assert set(state) == {
        *(f"{prefix}blocks.{b}.attn.qkv.lora_{ab}.weight" for b in range(DEPTH) for ab in "AB"),
        f"{prefix}head.weight", f"{prefix}head.bias",
    }  # fmt: skip
    width = 64
    for block in range(DEPTH):
        qkv = task_model.blocks[block].attn.qkv
        layer = f"{prefix}blocks.{block}.attn.qkv"
        lora_a, lora_b = state[f"{layer}.lora_A.weight"], state[f"{layer}.lora_B.weight"]
        assert lora_a.shape == (2 * RANK, width) and lora_b.shape == (3 * width, 2 * RANK)
        zeros = torch.zeros(width, RANK)
        assert torch.equal(lora_a, torch.cat([qkv.lora_A["q"].weight, qkv.lora_A["v"].weight]))
        q_rows, k_rows, v_rows = lora_b[:width], lora_b[width : 2 * width], lora_b[2 * width :]
        assert torch.count_nonzero(k_rows) == 0
        assert torch.equal(q_rows, torch.cat([qkv.lora_B["q"].weight, zeros], dim=1))
        assert torch.equal(v_rows, torch.cat([zeros, qkv.lora_B["v"].weight], dim=1))
        torch.testing.assert_close(scaling * lora_b @ lora_a, qkv.delta_weight(), rtol=0, atol=1e-6)
    torch.testing.assert_close(state[f"{prefix}head.weight"], task_model.head.weight, rtol=0, atol=0)


def test_a_swin_cut_before_its_last_stage_restores_its_fresh_norm(tmp_path):
    from test_swin import SWIN, SWIN_KWARGS

    swin = dict(model=SWIN, img_size=40, model_kwargs=SWIN_KWARGS)
    task_model, record = load_task(trained_task(tmp_path, backbone=swin, depth=3))  # stage 2 of 3: width 32
    out = export_peft(task_model, tmp_path / "peft", backbone=record.backbone)
    assert json.loads((out / PEFT_CONFIG).read_text())["modules_to_save"] == ["head.fc", "norm"]
    model, key_warnings = peft_model(out, swin)
    assert key_warnings == []
    x = images(40, n=3)
    torch.testing.assert_close(logits(model, x), logits(task_model, x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("weights", ["random", "file"])  # sls's seeded weights; a file, read by timm alone
def test_the_readme_recipe_runs_as_written(tmp_path, weights):
    if weights == "file":
        full, _ = create_backbone("test_vit", num_classes=0, weights="random", img_size=32)
        weights = tmp_path / "vit.safetensors"
        save_file({name: tensor.contiguous() for name, tensor in full.state_dict().items()}, str(weights))
    task_model, record = load_task(trained_task(tmp_path, weights=weights))
    out = export_peft(task_model, tmp_path / "peft", backbone=record.backbone)
    readme = (out / PEFT_README).read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert ("create_backbone" in code) == (weights == "random")
    namespace: dict = {}
    exec(code, namespace)  # noqa: S102 - the file sls itself wrote
    x = images()
    torch.testing.assert_close(logits(namespace["model"], x), logits(task_model, x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("petl", ["adapter", "repadapter"])
def test_other_petl_methods_are_refused_in_one_line(tmp_path, petl, capsys):
    task_dir = trained_task(tmp_path, petl)
    task_model, record = load_task(task_dir)
    with pytest.raises(ConfigError, match=f"holds LoRA adapters, and this task uses {petl}; export it as "
                                          "safetensors, torchscript, onnx"):  # fmt: skip
        export_peft(task_model, tmp_path / "peft", backbone=record.backbone)
    assert main(["export", str(task_dir), "--format", "peft", "--out", str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and petl in err and "safetensors" in err
    assert not (tmp_path / "peft").exists() and not (tmp_path / "cli").exists()


def test_export_command_writes_the_peft_folder(tmp_path, capsys):
    task_dir = trained_task(tmp_path)
    task_model, _ = load_task(task_dir)
    assert main(["export", str(task_dir), "--format", "peft", "--out", str(tmp_path / "adapter")]) == 0
    assert f"{tmp_path / 'adapter'}: peft LoRA adapter" in capsys.readouterr().out
    model, _ = peft_model(tmp_path / "adapter")
    torch.testing.assert_close(logits(model, images()), logits(task_model, images()), rtol=0, atol=1e-5)
    assert main(["export", str(task_dir), "--format", "peft"]) == 0  # default: TASK/export/peft
    assert (task_dir / "export" / "peft" / PEFT_CONFIG).is_file()
    # No temporary file left behind.
    written = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert written == sorted([PEFT_WEIGHTS, PEFT_CONFIG, PEFT_README])

"""``hf-hub:ORG/NAME`` models, read from a local Hugging Face cache: no network.

The fake cache has huggingface_hub's own layout (``models--ORG--NAME/refs/main`` holding
the commit, ``snapshots/<commit>/<file>`` links into ``blobs/``), and its files are written
by timm's ``save_for_hf``, as a repository pushed with timm holds them.
huggingface_hub reads ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` once, at import, so the
in-process tests set its constants as well as the variables; one test starts a fresh
process with the variables alone, as a user would.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import timm
import torch
from huggingface_hub import constants as hub_constants
from safetensors.torch import save_file
from timm.models import save_for_hf

from sls.backbones import HEAD_PREFIXES, create_backbone, fingerprint, pretrained_input_size
from sls.cli import main
from sls.errors import UnknownModelError
from sls.experiment import load_task

REPO = "sls-test/tiny-vit"
NAME = f"hf-hub:{REPO}"
ARCH_ARGS = dict(depth=2, embed_dim=32, num_heads=2, img_size=32)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def backbone_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith(HEAD_PREFIXES)}


def put_in_cache(cache: Path, repo: str, files: Path) -> Path:
    """The files of ``files`` as huggingface_hub caches a download of ``repo`` at main."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    (folder / "blobs").mkdir()
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for path in files.iterdir():
        data = path.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (folder / "blobs" / blob).write_bytes(data)
        (snapshot / path.name).symlink_to(Path("..", "..", "blobs", blob))
    return snapshot


def offline_env(cache: Path, home: Path) -> dict[str, str]:
    return {"HF_HOME": str(home), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A cache holding ``sls-test/tiny-vit`` (a 2-block, 32-px ViT-Tiny), offline."""
    with torch.random.fork_rng():
        torch.manual_seed(1)
        saved = timm.create_model("vit_tiny_patch16_224", **ARCH_ARGS)
    export = tmp_path / "export"
    save_for_hf(saved, export, model_args=ARCH_ARGS, safe_serialization=True)
    assert sorted(p.name for p in export.iterdir()) == ["config.json", "model.safetensors"]
    cache, home = tmp_path / "hf" / "hub", tmp_path / "hf"
    snapshot = put_in_cache(cache, REPO, export)
    for key, value in offline_env(cache, home).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    # The layout is the one huggingface_hub itself reads.
    found = huggingface_hub.try_to_load_from_cache(REPO, "config.json")
    assert found is not None and Path(found) == snapshot / "config.json"
    return SimpleNamespace(state=backbone_state(saved), cache=cache, home=home, snapshot=snapshot, export=export)


def test_hub_name_loads_the_cached_weights_and_config(hub):
    model, info = create_backbone(NAME, num_classes=3)
    state = backbone_state(model)
    assert state.keys() == hub.state.keys()
    assert all(torch.equal(state[k], hub.state[k]) for k in state)
    assert model.head.out_features == 3 and len(model.blocks) == 2 and model.embed_dim == 32
    assert (info.model, info.timm_name, info.weights) == (NAME, NAME, "timm")
    assert (info.family, info.num_blocks, info.img_size) == ("vit", 2, 32)
    assert info.mean == (0.5, 0.5, 0.5) and info.interpolation == "bicubic"  # the repository's pretrained_cfg
    assert pretrained_input_size(NAME) == 32
    # What a record keeps rebuilds the same backbone.
    _, again = create_backbone(info.model, num_classes=5, model_kwargs=info.model_kwargs)
    assert again.fingerprint == info.fingerprint == fingerprint(model)


def test_weights_file_loads_into_the_hub_architecture(hub, tmp_path):
    with torch.random.fork_rng():
        torch.manual_seed(2)
        other = backbone_state(timm.create_model("vit_tiny_patch16_224", **ARCH_ARGS))
    path = tmp_path / "mine.safetensors"
    save_file(other, str(path))
    model, info = create_backbone(NAME, num_classes=3, weights=str(path))
    state = backbone_state(model)
    assert all(torch.equal(state[k], other[k]) for k in other) and state.keys() == other.keys()
    assert not torch.equal(state["blocks.0.attn.qkv.weight"], hub.state["blocks.0.attn.qkv.weight"])
    assert info.weights == str(path.resolve()) and info.num_blocks == 2

    # Only the config is needed from the hub for it: without the cached weights the file still loads.
    (hub.snapshot / "model.safetensors").unlink()
    _, again = create_backbone(NAME, num_classes=3, weights=str(path))
    assert again.fingerprint == info.fingerprint
    with pytest.raises(UnknownModelError) as caught:
        create_backbone(NAME, num_classes=3)
    message = str(caught.value)
    assert "\n" not in message and "HF_HUB_OFFLINE=1 is set" in message and "weights file" in message
    assert "--weights FILE" in message


def test_random_weights_build_the_hub_architecture_reproducibly(hub):
    model, info = create_backbone(NAME, num_classes=3, weights="random")
    _, again = create_backbone(NAME, num_classes=3, weights="random")
    assert info.weights == "random" and info.fingerprint == again.fingerprint and len(model.blocks) == 2
    assert not torch.equal(backbone_state(model)["pos_embed"], hub.state["pos_embed"])


def test_local_dir_names_load_like_hub_names(hub):
    model, info = create_backbone(f"local-dir:{hub.export}", num_classes=3)
    state = backbone_state(model)
    assert all(torch.equal(state[k], hub.state[k]) for k in hub.state) and info.num_blocks == 2


def test_uncached_hub_name_offline_is_one_line(hub):
    for call in (lambda: create_backbone("hf-hub:sls-test/absent", num_classes=3),
                 lambda: pretrained_input_size("hf-hub:sls-test/absent")):  # fmt: skip
        with pytest.raises(UnknownModelError) as caught:
            call()
        message = str(caught.value)
        assert "\n" not in message and message.startswith("could not load 'hf-hub:sls-test/absent'")
        assert "HF_HUB_OFFLINE=1 is set and its config.json is not in the huggingface cache" in message
        assert str(hub.cache) in message and "--weights FILE" in message


def test_bare_repo_id_is_refused_with_the_prefix_to_use():
    with pytest.raises(UnknownModelError, match=f"'hf-hub:{REPO}'"):
        create_backbone(REPO, num_classes=3)


TINY = ["run", "--data", "digits", "--img-size", "32", "--train-samples", "200", "--test-samples", "100",
        "--analysis-samples", "all", "--epochs", "1", "--force", "--quiet"]  # fmt: skip


def test_run_on_a_hub_model_records_a_name_that_rebuilds_it(hub, tmp_path, capsys):
    out = tmp_path / "task"
    assert main([*TINY, "--model", NAME, "--out", str(out)]) == 0
    record = json.loads((out / "record.json").read_text())
    assert record["backbone"]["model"] == NAME and record["backbone"]["weights"] == "timm"
    assert record["backbone"]["fingerprint"] == create_backbone(NAME, num_classes=3)[1].fingerprint
    # A later command rebuilds the backbone from the record (the fingerprint is checked).
    model, _ = load_task(out, stage="finetuned")
    state = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()}  # LoRA wraps qkv
    assert all(torch.equal(state[k], hub.state[k]) for k in hub.state)


@pytest.mark.slow
def test_cli_refuses_an_uncached_hub_model_in_one_line(hub, tmp_path):
    """In a fresh process configured by the environment alone, as a user runs it."""
    out = tmp_path / "task"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env |= offline_env(hub.cache, hub.home) | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "sls.cli", *TINY, "--model", "hf-hub:sls-test/absent",
                           "--out", str(out)], capture_output=True, text=True, env=env)  # fmt: skip
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip()
    assert err.startswith("sls: error: could not load 'hf-hub:sls-test/absent'") and "\n" not in err
    assert f"not in the huggingface cache {hub.cache}" in err and "HF_HUB_OFFLINE=1" in err
    assert not out.exists()


def test_the_default_output_folder_of_a_hub_name_is_one_folder():
    from sls.config import RunConfig, default_out_dir

    out = default_out_dir(RunConfig(model="hf-hub:org/name", data="digits"))
    assert out.parent.name == "runs" and out.name.startswith("digits-hf-hub_org_name-lora-")

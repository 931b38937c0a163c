"""Backbone creation, one-pass block features and truncation on tiny random ViTs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from sls.backbones import block_features, create_backbone, fingerprint, num_blocks, truncate
from sls.bench import parameter_count
from sls.errors import ConfigError, UnknownModelError
from sls.petl import create_petl


def loader_of(images, labels, batch_size=16):
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=False)


@pytest.mark.parametrize("petl", [None, "lora", "adapter"])
def test_block_features_equal_a_manual_forward(tiny_images, petl):
    images, labels = tiny_images
    model, info = create_backbone("test_vit", num_classes=3, weights="random", img_size=32)
    if petl:
        create_petl(petl).apply(model)
    features, got_labels, block_input = block_features(model, loader_of(images, labels), progress=False)
    assert len(features) == info.num_blocks == 6
    np.testing.assert_array_equal(got_labels, labels.numpy())
    # Independent computation: run the blocks by hand and take the CLS token.
    with torch.no_grad():
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
        np.testing.assert_allclose(block_input, x[:, 0].numpy(), rtol=1e-5, atol=1e-5)
        for block, feats in zip(model.blocks, features):
            x = block(x)
            assert feats.shape == (60, 64)
            np.testing.assert_allclose(feats, x[:, 0].numpy(), rtol=1e-5, atol=1e-5)


def test_mean_pooling_without_class_token(tiny_images):
    images, labels = tiny_images
    model, _ = create_backbone("test_vit", num_classes=3, weights="random", img_size=32)
    model.cls_token = None
    model.num_prefix_tokens = 0
    model.pos_embed = torch.nn.Parameter(model.pos_embed[:, 1:].clone())
    features, _, _ = block_features(model, loader_of(images, labels), progress=False)
    tokens = model.forward_features(images[:4])  # after the final norm: compare the last block by hand
    with torch.no_grad():
        x = model._pos_embed(model.patch_embed(images[:4]))
        for block in model.blocks:
            x = block(x)
    np.testing.assert_allclose(features[-1][:4], x.mean(dim=1).numpy(), rtol=1e-5, atol=1e-5)
    assert tokens.shape[1] == 4  # 32 px / 16 px patches, no prefix token


def test_truncation_removes_parameters_and_keeps_kept_block_outputs(tiny_images):
    images, labels = tiny_images
    model, _ = create_backbone("test_vit", num_classes=3, weights="random", img_size=32)
    create_petl("lora").apply(model)
    full_features, _, _ = block_features(model, loader_of(images, labels), progress=False)
    per_block = parameter_count(model.blocks[0])

    pruned = truncate(copy.deepcopy(model), 2)
    assert num_blocks(pruned) == 2
    assert parameter_count(model) - parameter_count(pruned) == 4 * per_block
    assert not any(name.startswith("blocks.2.") for name in pruned.state_dict())
    pruned_features, _, _ = block_features(pruned, loader_of(images, labels), progress=False)
    for kept, full in zip(pruned_features, full_features[:2]):
        np.testing.assert_array_equal(kept, full)
    # The pruned model's logits are the full model's norm + head applied to block 2's tokens.
    with torch.no_grad():
        x = model._pos_embed(model.patch_embed(images))
        for block in model.blocks[:2]:
            x = block(x)
        expected = model.head(model.norm(x)[:, 0])
        np.testing.assert_allclose(pruned(images).numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("depth", [0, 7, -1])
def test_out_of_range_depth(depth):
    model, _ = create_backbone("test_vit", num_classes=3, weights="random")
    with pytest.raises(ConfigError, match=f"depth k={depth} is out of range: the model has blocks 1..6"):
        truncate(model, depth)


def test_random_weights_are_reproducible_and_fingerprinted():
    first, info = create_backbone("test_vit", num_classes=3, weights="random")
    second, again = create_backbone("test_vit", num_classes=5, weights="random")
    assert info.fingerprint == again.fingerprint == fingerprint(first)  # the head does not count
    with torch.no_grad():
        second.blocks[0].attn.qkv.weight[0, 0] += 1e-3
    assert fingerprint(second) != info.fingerprint


def test_a_weights_file_loads_into_the_backbone_with_a_fresh_head(tmp_path):
    from safetensors.torch import save_file

    source, info = create_backbone("test_vit", num_classes=3, weights="random")
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    with torch.no_grad():
        state["cls_token"] = state["cls_token"] + 1.0
    path = tmp_path / "my-weights.safetensors"
    save_file(state, str(path))
    model, loaded = create_backbone("test_vit", num_classes=7, weights=path)
    assert loaded.weights == str(path.resolve())
    torch.testing.assert_close(model.cls_token, state["cls_token"])
    assert loaded.fingerprint != info.fingerprint
    assert model.head.out_features == 7


def test_wrong_architecture_weights_and_unknown_names(tmp_path):
    from safetensors.torch import save_file

    other, _ = create_backbone("test_vit2", num_classes=3, weights="random")
    path = tmp_path / "other.safetensors"
    save_file({k: v for k, v in other.state_dict().items() if not k.startswith("head.")}, str(path))
    with pytest.raises(ConfigError, match="does not fit test_vit"):
        create_backbone("test_vit", num_classes=3, weights=path)
    with pytest.raises(ConfigError, match="does not exist"):
        create_backbone("test_vit", num_classes=3, weights=tmp_path / "missing.pth")
    with pytest.raises(UnknownModelError, match="unknown model 'vit_nonexistent'"):
        create_backbone("vit_nonexistent", num_classes=3)


def test_an_input_size_that_is_not_whole_patches_is_refused_at_creation():
    with pytest.raises(ConfigError, match="an input of 30 px is not a whole number of test_vit's 16-px patches; "
                                          "use --img-size 16 or 32"):  # fmt: skip
        create_backbone("test_vit", num_classes=3, weights="random", img_size=30)
    with pytest.raises(ConfigError, match="use --img-size 16$"):
        create_backbone("test_vit", num_classes=3, weights="random", img_size=12)


class _MakesFolder:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.mkdir, (self.marker,))


def test_a_code_running_pth_stays_inert_whatever_timm_does(tmp_path, monkeypatch):
    """timm 1.0.20-1.0.24 load with weights_only=False: make every timm loader do so, and
    the file is still refused unrun, because sls reads checkpoints itself."""
    import timm.models._builder
    import timm.models._helpers

    def unsafe(path, *args, **kwargs):
        return torch.load(path, map_location="cpu", weights_only=False)

    for module in (timm.models._helpers, timm.models._builder):
        for name in ("load_state_dict", "load_checkpoint"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, unsafe)
    model, _ = create_backbone("test_vit", num_classes=3, weights="random")
    marker = tmp_path / "code-ran"
    torch.save(model.state_dict() | {"payload": _MakesFolder(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(ConfigError, match="refused to load .*evil.pth: it is a pickle that needs"):
        create_backbone("test_vit", num_classes=3, weights=tmp_path / "evil.pth")
    assert not marker.exists()
    unsafe(tmp_path / "evil.pth")  # the payload is live: loaded unsafely it runs
    assert marker.is_dir()


def test_the_keys_of_a_checkpoint_are_checked_from_load_state_dict_not_from_log_text(tmp_path, caplog):
    from safetensors.torch import save_file

    source, info = create_backbone("test_vit", num_classes=3, weights="random")
    state = {k: v.clone() for k, v in source.state_dict().items() if not k.startswith("head.")}
    cases = {
        "missing": {k: v for k, v in state.items() if k != "blocks.2.mlp.fc1.weight"},
        "unexpected": state | {"blocks.9.extra.weight": torch.zeros(2)},
        "shape-mismatched": state | {"blocks.0.norm1.weight": torch.ones(65)},
    }
    for kind, broken in cases.items():
        path = tmp_path / f"{kind}.safetensors"
        save_file(broken, str(path))
        with caplog.at_level("CRITICAL", logger="timm"):  # whatever timm logs (or not), the keys are named
            with pytest.raises(ConfigError, match=f"does not fit test_vit: 1 {kind} keys \\((blocks\\.[\\w.]+)"):
                create_backbone("test_vit", num_classes=3, weights=path)
    # Wrapped as training scripts save it (a 'model' entry, DataParallel's 'module.' prefix): read as is.
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "wrapped.pth")
    loaded, again = create_backbone("test_vit", num_classes=3, weights=tmp_path / "wrapped.pth")
    assert again.fingerprint == info.fingerprint


def test_a_checkpoint_at_another_resolution_is_resampled_by_the_familys_timm_filter(tmp_path):
    from safetensors.torch import save_file

    source, _ = create_backbone("test_vit", num_classes=3, weights="random", img_size=32)
    path = tmp_path / "at32.safetensors"
    save_file({k: v for k, v in source.state_dict().items() if not k.startswith("head.")}, str(path))
    model, _ = create_backbone("test_vit", num_classes=3, weights=path, img_size=64)
    assert model.pos_embed.shape[1] == source.pos_embed.shape[1] - 4 + 16  # 2x2 -> 4x4 patches (+ prefix tokens)
    torch.testing.assert_close(model.cls_token, source.cls_token)


@pytest.mark.parametrize(("name", "content"), [("junk.pth", b"not a pickle at all"), ("cut.pth", None),
                                               ("junk.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{bad")])  # fmt: skip
def test_a_damaged_weights_file_is_one_line_naming_it(tmp_path, name, content):
    if content is None:  # a torch.save file cut short
        model, _ = create_backbone("test_vit", num_classes=3, weights="random")
        torch.save(model.state_dict(), tmp_path / name)
        content = (tmp_path / name).read_bytes()[:3000]
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ConfigError, match=f"weights file {tmp_path / name} is not a readable checkpoint"):
        create_backbone("test_vit", num_classes=3, weights=tmp_path / name)


def test_a_shared_copy_shares_the_frozen_backbone_and_trains_on_its_own():
    from sls.backbones import shared_copy

    model, _ = create_backbone("test_vit", num_classes=3, weights="random", img_size=32)
    create_petl("lora").apply(model)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    pruned = truncate(shared_copy(model), 2)
    theirs = dict(model.named_parameters())
    for name, param in pruned.named_parameters():  # frozen: one storage; trainable: its own
        assert (param.data_ptr() == theirs[name].data_ptr()) == (not param.requires_grad), name
    optimizer = torch.optim.SGD([p for p in pruned.parameters() if p.requires_grad], lr=1.0)
    pruned(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    assert len(model.blocks) == 6
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0, msg=name)
    # share_trainable: a read-only view for timing, every tensor shared.
    view = truncate(shared_copy(model, share_trainable=True), 3)
    assert all(param.data_ptr() == theirs[name].data_ptr() for name, param in view.named_parameters())
    # Moving or casting a copy (what Runtime.place does) leaves the original where it was.
    view.to(torch.float64)
    assert all(p.dtype == torch.float32 for p in model.parameters())

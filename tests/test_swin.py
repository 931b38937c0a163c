"""Swin (timm v1) behind the backbone interface, and every backbone x PETL pair.

The tiny Swin: 3 stages of 2 blocks (widths 16, 32, 64), windows of 2 on a 40 px
input, so the token grids are 10x10, 5x5 and 3x3: the two odd grids are padded to
whole windows and the second block of each stage shifts its windows.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import timm
import torch
from helpers import images_for, loader_of

from sls.artifact import save_task
from sls.backbones import all_blocks, block_features, create_backbone, num_blocks, truncate
from sls.bench import parameter_count
from sls.errors import ConfigError
from sls.experiment import load_task
from sls.petl import create_petl, trainable_state

SWIN = "swin_tiny_patch4_window7_224"
SWIN_KWARGS = dict(embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4), window_size=2)
WIDTHS = [16, 16, 32, 32, 64, 64]  # block 1..6
STAGE_OF = [0, 0, 1, 1, 2, 2]


def tiny_swin(num_classes: int = 3) -> tuple[torch.nn.Module, object]:
    model, info = create_backbone(SWIN, num_classes=num_classes, weights="random", img_size=40,
                                  model_kwargs=SWIN_KWARGS)  # fmt: skip
    return model.eval(), info


def tiny_vit(num_classes: int = 3) -> tuple[torch.nn.Module, object]:
    model, info = create_backbone("test_vit", num_classes=num_classes, weights="random", img_size=32)
    return model.eval(), info


BACKBONES = {"vit": tiny_vit, "swin": tiny_swin}


def perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """Stand-in for training: random values for every trainable tensor."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))


def block_outputs_by_hand(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The patch embedding's output and every block's NHWC output, stage by stage (no hooks)."""
    x = model.patch_embed(images)
    embedded, outputs = x, []
    for stage in model.layers:
        x = stage.downsample(x)
        for block in stage.blocks:
            x = block(x)
            outputs.append(x)
    return embedded, outputs


def test_tiny_swin_layout():
    model, info = tiny_swin()
    assert info.family == "swin" and info.num_blocks == num_blocks(model) == 6
    assert [block.dim for block in all_blocks(model)] == WIDTHS
    grids = [tuple(block.input_resolution) for block in all_blocks(model)]
    # The last stage merges an odd 5x5 grid: timm >= 1.0.31 pads it to 3x3, 1.0.30 drops a row and a column.
    assert grids[:4] == [(10, 10)] * 2 + [(5, 5)] * 2 and grids[4] == grids[5] in ((3, 3), (2, 2))
    last_shift = (1, 1) if grids[5] == (3, 3) else (0, 0)  # a window as large as its grid is not shifted
    assert [tuple(block.shift_size) for block in all_blocks(model)] == [(0, 0), (1, 1)] * 2 + [(0, 0), last_shift]
    assert model.num_features == 64


@pytest.mark.parametrize("petl", [None, "lora", "repadapter"])
def test_block_features_are_the_token_mean_before_patch_merging(petl):
    model, _ = tiny_swin()
    if petl:
        create_petl(petl).apply(model)
        perturb(model)
    images = images_for(model)
    features, labels, block_input = block_features(model, loader_of(images), progress=False)
    assert [f.shape for f in features] == [(9, width) for width in WIDTHS]
    np.testing.assert_array_equal(labels, np.arange(9) % 3)
    with torch.no_grad():
        embedded, outputs = block_outputs_by_hand(model, images)
        np.testing.assert_allclose(block_input, embedded.mean(dim=(1, 2)).numpy(), rtol=1e-5, atol=1e-5)
        for feats, out in zip(features, outputs):
            np.testing.assert_allclose(feats, out.mean(dim=(1, 2)).numpy(), rtol=1e-5, atol=1e-5)
        # Block 2 closes stage 0: its feature is 16 wide, not the 32 of the merged tokens.
        merged = model.layers[1].downsample(outputs[1]).mean(dim=(1, 2))
        assert merged.shape == (9, 32) and features[1].shape == (9, 16)


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5, 6])
def test_truncation_at_every_depth(depth):
    model, _ = tiny_swin()
    create_petl("lora").apply(model)
    perturb(model)
    images = images_for(model, n=6)
    full_features, _, _ = block_features(model, loader_of(images), progress=False)
    pruned = truncate(copy.deepcopy(model), depth)

    assert num_blocks(pruned) == depth
    assert len(pruned.layers) == STAGE_OF[depth - 1] + 1
    removed_blocks = sum(parameter_count(b) for b in all_blocks(model)[depth:])
    removed_merges = sum(parameter_count(stage.downsample) for stage in model.layers[len(pruned.layers) :])
    width = WIDTHS[depth - 1]
    old_tail = parameter_count(model.norm) + parameter_count(model.head)
    new_tail = parameter_count(pruned.norm) + parameter_count(pruned.head)
    assert new_tail == old_tail - (64 - width) * (2 + 3)  # norm scale and shift, head weights
    assert parameter_count(model) - parameter_count(pruned) == removed_blocks + removed_merges + old_tail - new_tail

    kept, _, _ = block_features(pruned, loader_of(images), progress=False)
    for got, full in zip(kept, full_features[:depth]):
        np.testing.assert_array_equal(got, full)
    assert pruned.num_features == pruned.head.fc.in_features == pruned.norm.normalized_shape[0] == width
    with torch.no_grad():
        _, outputs = block_outputs_by_hand(model, images)
        logits = pruned(images)
        assert logits.shape == (6, 3)
        # norm -> token mean -> head, with the norm and head the pruned model holds.
        expected = pruned.head.fc(pruned.norm(outputs[depth - 1]).mean(dim=(1, 2)))
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    if width == 64:  # inside the last stage: the trained norm and head are kept
        assert torch.equal(pruned.norm.weight, model.norm.weight)
        assert torch.equal(pruned.head.fc.weight, model.head.fc.weight)
    else:  # a narrower stage: a fresh norm and head of its width, trainable task parameters
        assert torch.equal(pruned.norm.weight, torch.ones(width)) and torch.equal(pruned.norm.bias, torch.zeros(width))
        assert {"norm.weight", "norm.bias", "head.fc.weight", "head.fc.bias"} <= set(trainable_state(pruned))


def test_full_depth_leaves_the_model_unchanged():
    model, _ = tiny_swin()
    images = images_for(model, n=4)
    pruned = truncate(copy.deepcopy(model), 6)
    assert [(n, type(m)) for n, m in pruned.named_modules()] == [(n, type(m)) for n, m in model.named_modules()]
    before, after = model.state_dict(), pruned.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        torch.testing.assert_close(pruned(images), model(images), rtol=0, atol=0)


@pytest.mark.parametrize("depth", [0, 7])
def test_out_of_range_depth(depth):
    model, _ = tiny_swin()
    with pytest.raises(ConfigError, match=f"depth k={depth} is out of range: the model has blocks 1..6"):
        truncate(model, depth)


def test_other_families_are_refused_with_the_supported_ones_named():
    with pytest.raises(ConfigError, match="sls prunes timm VisionTransformer and SwinTransformer"):
        num_blocks(timm.create_model("test_resnet", pretrained=False))


def test_npz_weights_are_refused_for_swin(tmp_path):
    path = tmp_path / "swin.npz"
    np.savez(path, x=np.zeros(1))
    with pytest.raises(ConfigError, match="reads .npz .* for ViT models only"):
        create_backbone(SWIN, num_classes=3, weights=path, img_size=40, model_kwargs=SWIN_KWARGS)


def test_swin_weights_file_loads_through_timm(tmp_path):
    from safetensors.torch import save_file

    source, info = tiny_swin()
    path = tmp_path / "swin.safetensors"
    save_file({k: v for k, v in source.state_dict().items() if not k.startswith("head.")}, str(path))
    model, loaded = create_backbone(SWIN, num_classes=5, weights=path, img_size=40, model_kwargs=SWIN_KWARGS)
    assert loaded.fingerprint == info.fingerprint
    assert model.head.fc.out_features == 5


# -- every backbone x PETL method --------------------------------------------------------

METHOD_PARAMS = {
    # LoRA's q and v thirds of the fused qkv, each its own A and B (QKVLoRA)
    "lora": [f"attn.qkv.lora_{ab}.{part}.weight" for ab in "AB" for part in "qv"],
    # AdaptFormer's adapter hangs off the block itself (ViTBlockWithAdapter / SwinBlockWithAdapter)
    "adapter": [f"adapter.{layer}.{kind}" for layer in ("down", "up") for kind in ("weight", "bias")],
    "repadapter": [
        f"{branch}.repadapter.{layer}.{kind}"
        for branch in ("attn", "mlp") for layer in ("down", "up") for kind in ("weight", "bias")
    ],  # fmt: skip
    "convpass": [
        f"{branch}.convpass.{layer}.{kind}"
        for branch in ("attn", "mlp") for layer in ("down", "conv", "up") for kind in ("weight", "bias")
    ],  # fmt: skip
    "swin-convpass": [  # a Swin block holds both bypasses itself (SwinBlockWithConvpass)
        f"convpass.{branch}.{layer}.{kind}"
        for branch in ("attn", "mlp") for layer in ("down", "conv", "up") for kind in ("weight", "bias")
    ],  # fmt: skip
}
# Truncation depth per backbone: for Swin, the end of stage 1, so norm and head are new.
CUT = {"vit": 2, "swin": 4}


def block_names(backbone: str, count: int) -> list[str]:
    if backbone == "vit":
        return [f"blocks.{i}" for i in range(count)]
    return [f"layers.{STAGE_OF[i]}.blocks.{i % 2}" for i in range(count)]


def expected_trainable(backbone: str, method: str, count: int) -> set[str]:
    head = {"vit": {"head.weight", "head.bias"}, "swin": {"head.fc.weight", "head.fc.bias"}}[backbone]
    params = METHOD_PARAMS.get(f"{backbone}-{method}", METHOD_PARAMS[method])
    return head | {f"{block}.{param}" for block in block_names(backbone, count) for param in params}


@pytest.mark.parametrize("method", ["lora", "adapter", "repadapter", "convpass"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_backbone_and_petl_method(tmp_path, backbone, method):
    model, info = BACKBONES[backbone](num_classes=4)
    plain = copy.deepcopy(model)
    petl = create_petl(method)
    petl.apply(model)
    n_blocks = info.num_blocks
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected_trainable(backbone, method, n_blocks)
    images = images_for(model, n=6)
    with torch.no_grad():  # every method starts as the backbone
        torch.testing.assert_close(model.eval()(images), plain(images), rtol=1e-6, atol=1e-6)
    perturb(model)

    features, _, _ = block_features(model, loader_of(images), progress=False)
    widths = WIDTHS if backbone == "swin" else [64] * 6
    assert [f.shape for f in features] == [(6, w) for w in widths]

    depth = CUT[backbone]
    truncate(model, depth)
    kept, _, _ = block_features(model, loader_of(images), progress=False)
    for got, full in zip(kept, features[:depth]):
        np.testing.assert_array_equal(got, full)
    tail = {"norm.weight", "norm.bias"} if backbone == "swin" else set()  # Swin cut at width 32
    assert set(trainable_state(model)) == expected_trainable(backbone, method, depth) | tail
    perturb(model, seed=2)  # the fresh Swin norm and head get task values too

    record = {"backbone": info.to_dict(), "petl": {"method": petl.name, "hparams": petl.hparams},
              "depth": depth, "num_classes": 4}  # fmt: skip
    save_task(tmp_path / "task", model, record)
    stored = json.loads((tmp_path / "task" / "record.json").read_text())
    assert stored["backbone"]["model_kwargs"] == json.loads(json.dumps(info.model_kwargs))
    loaded, _ = load_task(tmp_path / "task")
    model.eval()
    with torch.no_grad():
        expected = model(images)
        assert expected.shape == (6, 4)
        torch.testing.assert_close(loaded(images), expected, rtol=0, atol=0)
        if method == "repadapter":  # folds into qkv / fc1, windows and padding included
            assert (petl.merge(loaded)(images) - expected).abs().max() <= 1e-5


def swin_bypass_by_hand(bypass: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Convpass's formula on an NHWC grid, with torch.nn.functional.conv2d over the whole grid."""
    act = lambda t: t * torch.sigmoid(1.702 * t)  # noqa: E731  QuickGELU
    hidden = act(tokens @ bypass.down.weight.T + bypass.down.bias).permute(0, 3, 1, 2)
    hidden = act(torch.nn.functional.conv2d(hidden, bypass.conv.weight, bypass.conv.bias, padding=1))
    return (hidden.permute(0, 2, 3, 1) @ bypass.up.weight.T + bypass.up.bias) * bypass.scale


def test_swin_convpass_convolves_the_whole_grid_across_shifted_windows():
    model, _ = tiny_swin()
    create_petl("convpass", scale=0.5).apply(model).eval()
    perturb(model)
    block = model.layers[0].blocks[1]  # 10x10 grid, windows of 2, shifted by 1
    assert block.shift_size == (1, 1) and block.window_size == (2, 2)
    x = torch.randn(2, 10, 10, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        # Silence attention and MLP: the block is then x + its attention-side bypass,
        # plus the MLP-side bypass of that sum.
        for linear in (block.attn.proj, block.mlp.fc2):
            linear.weight.zero_()
            linear.bias.zero_()
        middle = x + swin_bypass_by_hand(block.convpass["attn"], block.norm1(x))
        expected = middle + swin_bypass_by_hand(block.convpass["mlp"], block.norm2(middle))
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
        # One input token moves only its 3x3 neighbourhood of the grid at the first
        # bypass, across window borders and the shift's wrap-around alike.
        block.convpass["mlp"].up.weight.zero_()
        block.convpass["mlp"].up.bias.zero_()
        moved = x.clone()
        moved[:, 0, 4] += 1.0  # row 0: wraps around under the shift; column 4: a window border
        changed = (block(moved) - block(x)).abs().amax(dim=(0, 3)) > 0
    rows, cols = torch.nonzero(changed, as_tuple=True)
    assert set(rows.tolist()) == {0, 1} and set(cols.tolist()) == {3, 4, 5}


def test_repadapter_merges_exactly_on_swin_windows_with_padding():
    """Stages 2 and 3 pad their 5x5 and 3x3 grids to whole windows; the merge must match there too."""
    model, _ = tiny_swin()
    plain = copy.deepcopy(model)
    method = create_petl("repadapter")
    method.apply(model)
    perturb(model)
    model.eval()
    images = images_for(model, n=4)
    with torch.no_grad():
        unmerged = model(images)
        assert (unmerged - plain(images)).abs().max() > 1e-3
        merged = method.merge(model)
        assert (merged(images) - unmerged).abs().max() <= 1e-5
    assert [(n, type(m)) for n, m in merged.named_modules()] == [(n, type(m)) for n, m in plain.named_modules()]
    assert {n for n, p in merged.named_parameters() if p.requires_grad} == {"head.fc.weight", "head.fc.bias"}


def test_a_cut_before_the_last_stage_works_with_timms_older_reset_classifier(monkeypatch):
    """timm 1.0.20-1.0.24: ``reset_classifier`` resets the head without telling it the new
    width (``num_features``); truncation must still build a head of the kept width."""
    from timm.models.swin_transformer import SwinTransformer

    def old_reset_classifier(self, num_classes, global_pool=None):
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)  # in_features left as it was

    monkeypatch.setattr(SwinTransformer, "reset_classifier", old_reset_classifier)
    model, _ = tiny_swin()
    depth = next(d for d in range(1, len(WIDTHS) + 1) if WIDTHS[d - 1] < 64)
    pruned = truncate(model, depth)
    assert pruned.head.fc.in_features == pruned.num_features == WIDTHS[depth - 1]
    images = images_for(pruned, n=2)
    with torch.no_grad():
        assert pruned(images).shape == (2, 3)

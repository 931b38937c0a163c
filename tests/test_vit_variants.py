"""timm VisionTransformer variants behind the one backbone interface, and their weight files.

Every variant is a real timm model name shrunk through ``model_kwargs`` (3 blocks,
48 wide, 32 px or less), built with random weights: no network.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import images_for, loader_of

from sls.artifact import save_task
from sls.backbones import block_features, create_backbone, fingerprint, num_blocks, truncate
from sls.bench import parameter_count
from sls.errors import ConfigError
from sls.experiment import load_task
from sls.petl import create_petl, trainable_state

SMALL = dict(depth=3, embed_dim=48, num_heads=3)
# name: (timm name, extra architecture arguments, image side)
VARIANTS = {
    # mean-pooled patch tokens, fc_norm instead of the final norm
    "no-cls-avg": ("vit_tiny_patch16_224", dict(SMALL, class_token=False, global_pool="avg"), 32),
    # DINOv2 with 4 register tokens, LayerScale, patch 14, position embeddings without the prefix
    "dinov2-reg": ("vit_small_patch14_reg4_dinov2", SMALL, 28),
    # class and distillation tokens, two heads averaged
    "deit-distilled": ("deit_tiny_distilled_patch16_224", SMALL, 32),
    # another patch size and image size
    "patch32": ("vit_small_patch32_224", SMALL, 64),
    # a pretrained tag selects the in21k config (mean/std 0.5)
    "orig-in21k": ("vit_base_patch16_224.orig_in21k", SMALL, 32),
}


def variant(name: str, num_classes: int = 3) -> tuple[torch.nn.Module, object]:
    timm_name, kwargs, side = VARIANTS[name]
    model, info = create_backbone(timm_name, num_classes=num_classes, weights="random", img_size=side,
                                  model_kwargs=kwargs)  # fmt: skip
    return model.eval(), info


def tokens_after(model: torch.nn.Module, images: torch.Tensor, depth: int) -> torch.Tensor:
    """Token sequence after block ``depth``, computed by hand (no hooks)."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    for block in list(model.blocks)[:depth]:
        x = block(x)
    return x


def pooled_by_hand(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    if model.cls_token is not None:
        return tokens[:, 0]  # the class token, not the distillation or register tokens
    return tokens[:, model.num_prefix_tokens :].mean(dim=1)


def perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """Stand-in for training: random values for every trainable tensor."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))


def test_variants_have_the_expected_layout():
    layouts = {name: variant(name) for name in VARIANTS}
    prefix = {name: (m.num_prefix_tokens, m.cls_token is not None) for name, (m, _) in layouts.items()}
    assert prefix == {"no-cls-avg": (0, False), "dinov2-reg": (5, True), "deit-distilled": (2, True),
                      "patch32": (1, True), "orig-in21k": (1, True)}  # fmt: skip
    assert {name: tuple(m.patch_embed.grid_size) for name, (m, _) in layouts.items()} == {
        "no-cls-avg": (2, 2), "dinov2-reg": (2, 2), "deit-distilled": (2, 2), "patch32": (2, 2), "orig-in21k": (2, 2)
    }  # fmt: skip
    for name, (model, info) in layouts.items():
        assert info.family == "vit" and info.num_blocks == num_blocks(model) == 3, name
        assert info.model_kwargs == VARIANTS[name][1]
    assert layouts["orig-in21k"][1].mean == (0.5, 0.5, 0.5)
    assert layouts["deit-distilled"][1].mean == (0.485, 0.456, 0.406)


@pytest.mark.parametrize("name", VARIANTS)
def test_block_features_equal_a_manual_forward(name):
    model, _ = variant(name)
    images = images_for(model, n=12)
    features, labels, block_input = block_features(model, loader_of(images, batch_size=5), progress=False)
    assert len(features) == 3
    np.testing.assert_array_equal(labels, np.arange(12) % 3)
    with torch.no_grad():
        np.testing.assert_allclose(block_input, pooled_by_hand(model, tokens_after(model, images, 0)), atol=1e-5)
        for depth, feats in enumerate(features, start=1):
            assert feats.shape == (12, 48)
            expected = pooled_by_hand(model, tokens_after(model, images, depth))
            np.testing.assert_allclose(feats, expected.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
def test_truncation_at_every_depth(name):
    model, _ = variant(name)
    images = images_for(model, n=6)
    full_features, _, _ = block_features(model, loader_of(images, batch_size=5), progress=False)
    per_block = parameter_count(model.blocks[0])
    for depth in (1, 2, 3):
        pruned = truncate(copy.deepcopy(model), depth)
        assert num_blocks(pruned) == depth
        assert parameter_count(model) - parameter_count(pruned) == (3 - depth) * per_block
        kept, _, _ = block_features(pruned, loader_of(images, batch_size=5), progress=False)
        for got, full in zip(kept, full_features[:depth]):
            np.testing.assert_array_equal(got, full)
        with torch.no_grad():
            # The full model's final norm and head (both heads for DeiT) read block k's tokens.
            expected = model.forward_head(model.norm(tokens_after(model, images, depth)))
            logits = pruned(images)
        assert logits.shape == (6, 3)
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(truncate(copy.deepcopy(model), 3)(images), model(images), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["lora", "repadapter"])
@pytest.mark.parametrize("name", VARIANTS)
def test_task_round_trip(tmp_path, name, method):
    model, info = variant(name, num_classes=4)
    petl = create_petl(method)
    petl.apply(model)
    truncate(model, 2)
    perturb(model)
    heads = {"head.weight", "head.bias"}
    if name == "deit-distilled":
        heads |= {"head_dist.weight", "head_dist.bias"}
    state = trainable_state(model)
    assert heads <= set(state)
    assert {k for k in state if k not in heads and not k.startswith(("blocks.0.", "blocks.1."))} == set()
    record = {"backbone": info.to_dict(), "petl": {"method": petl.name, "hparams": petl.hparams},
              "depth": 2, "num_classes": 4}  # fmt: skip
    save_task(tmp_path / "task", model, record)
    loaded, _ = load_task(tmp_path / "task")
    model.eval()
    images = images_for(model, n=4)
    with torch.no_grad():
        expected = model(images)
        assert expected.shape == (4, 4)
        torch.testing.assert_close(loaded(images), expected, rtol=0, atol=0)


def test_deit_distilled_weights_file_with_another_head_size(tmp_path):
    """Both heads are replaced and neither counts as a missing backbone key or in the fingerprint."""
    from safetensors.torch import save_file

    source, info = variant("deit-distilled", num_classes=3)
    path = tmp_path / "deit.safetensors"
    save_file(source.state_dict(), str(path))
    timm_name, kwargs, side = VARIANTS["deit-distilled"]
    model, loaded = create_backbone(timm_name, num_classes=5, weights=path, img_size=side, model_kwargs=kwargs)
    assert loaded.fingerprint == info.fingerprint
    assert model.head.out_features == model.head_dist.out_features == 5
    torch.testing.assert_close(model.dist_token, source.dist_token)


def test_pth_state_dict_loads_through_timm(tmp_path):
    source, info = variant("dinov2-reg")
    path = tmp_path / "weights.pth"
    torch.save({k: v for k, v in source.state_dict().items() if not k.startswith("head.")}, path)
    timm_name, kwargs, side = VARIANTS["dinov2-reg"]
    model, loaded = create_backbone(timm_name, num_classes=3, weights=path, img_size=side, model_kwargs=kwargs)
    assert loaded.weights == str(path.resolve())
    assert loaded.fingerprint == info.fingerprint
    model.head.load_state_dict(source.head.state_dict())
    images = images_for(model, n=3)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), source(images), rtol=0, atol=0)


def jax_arrays(model: torch.nn.Module, layout: str) -> dict[str, np.ndarray]:
    """A ViT's weights in the JAX names timm's ``load_pretrained`` reads.

    ``"vit"``: the original google-research layout of ``ViT-B_16.npz`` (one group per
    block, ``Transformer/posembed_input``, a ``pre_logits`` layer and a 21k head that
    timm ignores). ``"big_vision"``: big_vision's, with the blocks stacked on a leading
    axis and ``pos_embedding`` at the top level.
    """

    def a(t: torch.Tensor) -> np.ndarray:
        return t.detach().numpy().copy()

    dim, heads = model.embed_dim, model.blocks[0].attn.num_heads
    out = {
        "embedding/kernel": a(model.patch_embed.proj.weight.permute(2, 3, 1, 0)),  # OIHW -> HWIO
        "embedding/bias": a(model.patch_embed.proj.bias),
        "cls": a(model.cls_token),
        "Transformer/encoder_norm/scale": a(model.norm.weight),
        "Transformer/encoder_norm/bias": a(model.norm.bias),
        "pre_logits/kernel": np.ones((dim, dim), np.float32),
        "head/kernel": np.ones((dim, 21843), np.float32),
        "head/bias": np.zeros(21843, np.float32),
    }
    attention, mlp, norm2 = ("MultiHeadDotProductAttention_1", "MlpBlock_3", "LayerNorm_2")
    if layout == "big_vision":
        attention, mlp, norm2 = ("MultiHeadDotProductAttention_0", "MlpBlock_0", "LayerNorm_1")
        out["pos_embedding"] = a(model.pos_embed)
    else:
        out["Transformer/posembed_input/pos_embedding"] = a(model.pos_embed)
    per_block = []
    for block in model.blocks:
        group = {
            "LayerNorm_0/scale": block.norm1.weight, "LayerNorm_0/bias": block.norm1.bias,
            f"{norm2}/scale": block.norm2.weight, f"{norm2}/bias": block.norm2.bias,
            f"{attention}/out/kernel": block.attn.proj.weight.reshape(dim, heads, -1).permute(1, 2, 0),
            f"{attention}/out/bias": block.attn.proj.bias,
        }  # fmt: skip
        qkv = zip(("query", "key", "value"), block.attn.qkv.weight.chunk(3), block.attn.qkv.bias.chunk(3))
        for part, weight, bias in qkv:
            group[f"{attention}/{part}/kernel"] = weight.T.reshape(dim, heads, -1)
            group[f"{attention}/{part}/bias"] = bias.reshape(heads, -1)
        for index, fc in enumerate((block.mlp.fc1, block.mlp.fc2)):
            group[f"{mlp}/Dense_{index}/kernel"] = fc.weight.T
            group[f"{mlp}/Dense_{index}/bias"] = fc.bias
        per_block.append({key: a(value) for key, value in group.items()})
    if layout == "big_vision":
        for key in per_block[0]:
            out[f"Transformer/encoderblock/{key}"] = np.stack([group[key] for group in per_block])
    else:
        for index, group in enumerate(per_block):
            out.update({f"Transformer/encoderblock_{index}/{key}": value for key, value in group.items()})
    return out


@pytest.mark.parametrize("layout", ["vit", "big_vision"])
def test_jax_npz_loads_through_timm_to_the_same_model(tmp_path, layout):
    source, info = variant("orig-in21k")
    path = tmp_path / "ViT-B_16.npz"
    np.savez(path, **jax_arrays(source, layout))
    timm_name, kwargs, side = VARIANTS["orig-in21k"]
    model, loaded = create_backbone(timm_name, num_classes=3, weights=path, img_size=side, model_kwargs=kwargs)
    assert loaded.weights == str(path.resolve())
    assert loaded.fingerprint == info.fingerprint == fingerprint(source)  # every tensor, bit for bit
    assert model.head.out_features == 3  # the file's 21k head is not used
    model.head.load_state_dict(source.head.state_dict())
    images = images_for(model, n=3)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), source(images), rtol=0, atol=0)


def test_npz_that_does_not_cover_the_model_is_refused(tmp_path):
    source, _ = variant("orig-in21k")
    arrays = jax_arrays(source, "vit")
    timm_name, kwargs, side = VARIANTS["orig-in21k"]
    short = {k: v for k, v in arrays.items() if not k.startswith("Transformer/encoderblock_2/")}
    np.savez(tmp_path / "short.npz", **short)
    with pytest.raises(ConfigError, match="short.npz does not fit vit_base_patch16_224.orig_in21k: .*encoderblock_2"):
        create_backbone(timm_name, num_classes=3, weights=tmp_path / "short.npz", img_size=side, model_kwargs=kwargs)
    # timm's loader has no entry for register tokens: they must not stay randomly initialised.
    with_registers = dict(kwargs, reg_tokens=2, no_embed_class=True)
    source, _ = create_backbone(timm_name, num_classes=3, weights="random", img_size=side, model_kwargs=with_registers)
    np.savez(tmp_path / "registers.npz", **jax_arrays(source, "vit"))
    with pytest.raises(ConfigError, match=r"it has no values for 1 tensors \(reg_token\)"):
        create_backbone(timm_name, num_classes=3, weights=tmp_path / "registers.npz", img_size=side,
                        model_kwargs=with_registers)  # fmt: skip


def test_model_kwargs_are_checked():
    with pytest.raises(ConfigError, match="model_kwargs must not set img_size"):
        create_backbone("test_vit", num_classes=3, weights="random", model_kwargs=dict(img_size=32))
    with pytest.raises(ConfigError, match="model_kwargs must hold JSON values"):
        create_backbone("test_vit", num_classes=3, weights="random", model_kwargs=dict(act_layer=torch.nn.GELU))
    # Values timm itself cannot build with: one line naming the option, no traceback.
    with pytest.raises(ConfigError, match=r"could not build test_vit with the model options depth='abc': TypeError"):
        create_backbone("test_vit", num_classes=3, weights="random", model_kwargs=dict(depth="abc"))
    with pytest.raises(ConfigError, match="nonsense=3: TypeError: .*unexpected keyword argument 'nonsense'"):
        create_backbone("test_vit", num_classes=3, weights="random", model_kwargs=dict(nonsense=3))

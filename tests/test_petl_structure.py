"""The PETL methods are the papers' by default: where AdaptFormer's adapter reads and
adds, its activation and scale; LoRA's own factors for q and v. Variants stay options."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.models.vision_transformer import Block

from sls.errors import ConfigError
from sls.petl import create_petl, petl_from_record
from sls.petl.adapter import Bottleneck, MlpWithAdapter, SwinBlockWithAdapter, ViTBlockWithAdapter
from sls.petl.lora import QKVLoRA
from sls.petl.merge import merge_lora

torch.manual_seed(0)


def randomize(module: torch.nn.Module, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(0.3 * torch.randn(param.shape, generator=generator))


def layerscale_vit(**kwargs) -> torch.nn.Module:
    return timm.create_model("test_vit", pretrained=False, num_classes=3, img_size=32, init_values=0.1, **kwargs)


def test_adapter_defaults_are_adaptformers():
    method = create_petl("adapter")
    assert method.hparams == {"bottleneck": 64, "scale": 0.1, "dropout": 0.1, "activation": "relu",
                              "placement": "parallel"}  # fmt: skip
    model = method.apply(layerscale_vit())
    block = model.blocks[0]
    assert type(block) is ViTBlockWithAdapter and isinstance(block.adapter.act, torch.nn.ReLU)
    assert (block.adapter.down.out_features, block.adapter.scale, block.adapter.dropout.p) == (64, 0.1, 0.1)
    assert type(block.mlp) is not MlpWithAdapter  # the MLP itself is untouched


def test_parallel_adapter_reads_the_residual_stream_and_adds_outside_layerscale():
    model = create_petl("adapter", dropout=0.0).apply(layerscale_vit()).eval()
    block = model.blocks[1]
    randomize(block.adapter)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        stream = x + block.ls1(block.attn(block.norm1(x)))  # between attention and MLP
        adapter = block.adapter
        by_hand = stream + block.ls2(block.mlp(block.norm2(stream))) + 0.1 * adapter.up(torch.relu(adapter.down(stream)))
        torch.testing.assert_close(block(x), by_hand, rtol=0, atol=1e-6)
        # LayerScale's gamma (0.1 here) does not scale the adapter: it would if it sat in the MLP branch.
        inside = stream + block.ls2(block.mlp(block.norm2(stream)) + 0.1 * adapter.up(torch.relu(adapter.down(stream))))
        assert (block(x) - inside).abs().max() > 1e-3


def test_parallel_adapter_is_outside_drop_path():
    block = Block(dim=32, num_heads=2, init_values=0.1, drop_path=1.0)  # both branches always dropped in training
    block.adapter = Bottleneck(32, 4, scale=0.1, dropout=0.0)
    block.__class__ = ViTBlockWithAdapter
    randomize(block.adapter)
    x = torch.randn(2, 5, 32)
    block.train()
    with torch.no_grad():
        expected = x + 0.1 * block.adapter.up(torch.relu(block.adapter.down(x)))
        torch.testing.assert_close(block(x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_parallel_adapter_starts_as_timms_block(family):
    if family == "vit":
        plain = layerscale_vit().eval()
    else:
        plain = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=3, img_size=56,
                                  embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=7).eval()  # fmt: skip
    model = create_petl("adapter").apply(copy.deepcopy(plain)).eval()
    expected_class = ViTBlockWithAdapter if family == "vit" else SwinBlockWithAdapter
    from sls.backbones import all_blocks

    assert all(type(block) is expected_class for block in all_blocks(model))
    images = torch.randn(2, 3, 32 if family == "vit" else 56, 32 if family == "vit" else 56)
    with torch.no_grad():
        torch.testing.assert_close(model(images), plain(images), rtol=0, atol=0)
        randomize(all_blocks(model)[-1].adapter)
        assert (model(images) - plain(images)).abs().max() > 1e-4


def test_mlp_placement_is_the_earlier_variant():
    model = create_petl("adapter", placement="mlp", activation="gelu", scale=1.0, dropout=0.0).apply(layerscale_vit())
    block = model.eval().blocks[0]
    assert type(block) is Block and isinstance(block.mlp, MlpWithAdapter)
    randomize(block.mlp.adapter)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        stream = x + block.ls1(block.attn(block.norm1(x)))
        normed, adapter = block.norm2(stream), block.mlp.adapter
        by_hand = stream + block.ls2(block.mlp.mlp(normed) + adapter.up(torch.nn.functional.gelu(adapter.down(normed))))
        torch.testing.assert_close(block(x), by_hand, rtol=0, atol=1e-6)


def test_a_record_from_before_the_options_rebuilds_the_earlier_modules():
    adapter = petl_from_record({"method": "adapter", "hparams": {"bottleneck": 8, "scale": 1.0, "dropout": 0.0}})
    assert adapter.hparams["placement"] == "mlp" and adapter.hparams["activation"] == "gelu"
    lora = petl_from_record({"method": "lora", "hparams": {"r": 8, "alpha": 8, "dropout": 0.0}})
    assert lora.hparams["target_modules"] == ["qkv"]
    # A record written today names every option and is rebuilt as written.
    assert petl_from_record({"method": "lora", "hparams": create_petl("lora").hparams}).hparams["target_modules"] == ["q", "v"]


def test_bad_adapter_options_are_refused():
    with pytest.raises(ConfigError, match="placement must be one of parallel, mlp"):
        create_petl("adapter", placement="sideways")
    with pytest.raises(ConfigError, match="activation must be one of relu, gelu"):
        create_petl("adapter", activation="tanh")


def test_lora_defaults_adapt_q_and_v_with_their_own_factors():
    model = create_petl("lora").apply(layerscale_vit()).eval()
    qkv = model.blocks[0].attn.qkv
    assert type(qkv) is QKVLoRA and qkv.parts == ("q", "v")
    assert set(qkv.lora_A) == set(qkv.lora_B) == {"q", "v"}
    assert qkv.lora_A["q"].weight.data_ptr() != qkv.lora_A["v"].weight.data_ptr()
    assert (qkv.lora_A["q"].weight.shape, qkv.lora_B["v"].weight.shape) == ((8, 64), (64, 8))
    randomize(qkv.lora_B, seed=2)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        update = qkv(x) - qkv.base_layer(x)
        query, key, value = update.split(64, dim=-1)
        assert key.abs().max() == 0  # k is not adapted
        scaling = 8 / 8
        for part, got in (("q", query), ("v", value)):
            expected = x @ qkv.lora_A[part].weight.T @ qkv.lora_B[part].weight.T * scaling
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_lora_merges_exactly_and_the_fused_variant_stays_an_option():
    model = create_petl("lora", alpha=16).apply(layerscale_vit()).eval()
    for block in model.blocks:
        randomize(block.attn.qkv.lora_B, seed=3)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(images)
        merged = merge_lora(model)
        assert all(type(block.attn.qkv) is torch.nn.Linear for block in merged.blocks)
        torch.testing.assert_close(merged(images), before, rtol=0, atol=1e-5)
    fused = create_petl("lora", target_modules="qkv").apply(layerscale_vit())
    names = {n for n, p in fused.named_parameters() if p.requires_grad and "lora_" in n}
    assert names == {f"blocks.{b}.attn.qkv.lora_{ab}.default.weight" for b in range(6) for ab in "AB"}
    with pytest.raises(ConfigError, match="either qkv .* or its thirds"):
        create_petl("lora", target_modules="q,qkv").apply(layerscale_vit())

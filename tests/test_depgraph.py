"""DepGraph width pruning of PETL-adapted ViTs: shapes, parameter counts, exactness at
ratio 0, widths of the PETL modules and head, and the ratio search."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("torch_pruning", reason="the DepGraph baseline needs torch-pruning")

from sls.backbones import create_backbone  # noqa: E402
from sls.baselines.depgraph import SUPPORTED_PETL, depgraph_prune, ratio_for_parameter_reduction  # noqa: E402
from sls.errors import ConfigError  # noqa: E402
from sls.petl import create_petl, list_petl  # noqa: E402
from sls.train import train  # noqa: E402

NUM_CLASSES = 3
WIDTH, HEAD_DIM, MLP_HIDDEN, BOTTLENECK = 64, 32, 192, 64  # test_vit's widths; the adapter's default


def count(model):
    return sum(p.numel() for p in model.parameters())


def adapted_vit(petl):
    """test_vit at 32 px; PETL parameters set to non-zero values so merging and
    pruning act on a non-trivial update (LoRA B and the adapter's up start at zero)."""
    model, _ = create_backbone("test_vit", num_classes=NUM_CLASSES, weights="random", img_size=32)
    if petl is not None:
        create_petl(petl).apply(model)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.requires_grad and not name.startswith("head."):
                    param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return model.eval()


@pytest.fixture
def loader(tiny_images):
    images, labels = tiny_images
    return DataLoader(TensorDataset(images, labels), batch_size=15)


@pytest.mark.parametrize("petl", [None, "lora", "adapter"])
def test_pruned_model_has_the_expected_widths_and_works(loader, tiny_images, petl):
    model = adapted_vit(petl)
    before = copy.deepcopy(model.state_dict())
    pruned = depgraph_prune(model, loader, ratio=0.25)
    images, _ = tiny_images
    with torch.no_grad():
        logits = pruned(images[:5])
    assert logits.shape == (5, NUM_CLASSES) and torch.isfinite(logits).all()
    # A quarter of every group goes: residual 64 -> 48, head dims 32 -> 24 (2 heads
    # kept), MLP hidden 192 -> 144.
    for block in pruned.blocks:
        attn = block.attn
        assert type(attn.qkv) is torch.nn.Linear  # LoRA merged away
        assert (attn.num_heads, attn.head_dim, attn.qkv.in_features, attn.qkv.out_features) == (2, 24, 48, 144)
        assert attn.proj.in_features == 48 and attn.proj.out_features == 48
        mlp = block.mlp
        assert (mlp.fc1.in_features, mlp.fc1.out_features, mlp.fc2.out_features) == (48, 144, 48)
        if petl == "adapter":
            adapter = block.adapter
            assert (adapter.down.in_features, adapter.down.out_features) == (48, BOTTLENECK)
            assert (adapter.up.in_features, adapter.up.out_features) == (BOTTLENECK, 48)
    assert (pruned.head.in_features, pruned.head.out_features) == (48, NUM_CLASSES)
    assert pruned.embed_dim == pruned.num_features == 48
    # The input model is left as it was.
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("petl", [None, "lora", "adapter"])
def test_parameters_fall_monotonically_with_the_ratio(loader, petl):
    model = adapted_vit(petl)
    merged = count(depgraph_prune(model, loader, ratio=0.0, n_batches=1))
    ratios = [0.1, 0.25, 0.5, 0.75]
    counts = [count(depgraph_prune(model, loader, ratio=r, n_batches=1)) for r in ratios]
    assert all(a > b for a, b in zip([merged, *counts], counts))
    for ratio, kept in zip(ratios, counts):
        # Layers lose inputs and outputs: between ratio and 1 - (1 - ratio)^2 of the
        # parameters go, up to channel rounding (0.03).
        removed = 1 - kept / merged
        assert ratio <= removed <= 1 - (1 - ratio) ** 2 + 0.03, (ratio, removed)


@pytest.mark.parametrize("petl", [None, "lora", "adapter"])
def test_ratio_zero_keeps_the_outputs(loader, tiny_images, petl):
    model = adapted_vit(petl)
    pruned = depgraph_prune(model, loader, ratio=0.0)
    images, _ = tiny_images
    with torch.no_grad():
        torch.testing.assert_close(pruned(images), model(images), rtol=0, atol=1e-5)
    lora_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert count(pruned) == count(model) - lora_params
    # Trainable flags carry over: the adapters and the head (merged LoRA is frozen).
    trainable = {n for n, p in pruned.named_parameters() if p.requires_grad}
    expected = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trainable == expected


def test_pruned_model_can_be_retrained_with_lora_again(loader):
    pruned = depgraph_prune(adapted_vit("lora"), loader, ratio=0.5)
    create_petl("lora").apply(pruned)
    head_before = pruned.head.weight.detach().clone()
    losses = train(pruned, loader, epochs=1, lr=1e-2, progress=False)
    assert len(losses) == 1 and losses[0] > 0
    assert not torch.equal(pruned.head.weight, head_before)
    assert pruned.blocks[0].attn.qkv.lora_A["q"].in_features == 32


@pytest.mark.parametrize("petl", ["lora", "adapter"])
def test_ratio_search_hits_the_target_parameter_reduction(loader, petl):
    model = adapted_vit(petl)
    total = count(model)
    ratios = []
    for fraction in (0.2, 0.5):
        target = int(fraction * total)
        ratio = ratio_for_parameter_reduction(model, loader, target, round_to=None)
        removed = total - count(depgraph_prune(model, loader, ratio=ratio, n_batches=1, round_to=None))
        # One residual channel of this 64-wide model moves about 2.5% of the
        # parameters; the search ends on the nearer side of that step: within 2%.
        assert abs(removed - target) <= 0.02 * total, (fraction, ratio, removed, target)
        ratios.append(ratio)
    assert 0 < ratios[0] < ratios[1] < 0.9


def test_bad_ratios_and_targets_are_refused(loader):
    model = adapted_vit("lora")
    for ratio in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="ratio"):
            depgraph_prune(model, loader, ratio=ratio)
    with pytest.raises(ConfigError, match="at most"):
        ratio_for_parameter_reduction(model, loader, count(model))
    with pytest.raises(ConfigError, match="n_batches"):
        depgraph_prune(model, loader, ratio=0.1, n_batches=0)


@pytest.mark.parametrize("petl", [m for m in list_petl() if m not in SUPPORTED_PETL] or ["none-registered"])
def test_other_petl_methods_are_refused(loader, petl):
    if petl == "none-registered":
        pytest.skip("every registered PETL method is supported")
    model = adapted_vit(petl)
    with pytest.raises(ConfigError, match=f"does not support {petl}"):
        depgraph_prune(model, loader, ratio=0.1)


@pytest.mark.parametrize("fused", [True, False])
def test_pruned_attention_keeps_the_scale_it_was_trained_with(fused):
    from timm.layers import Attention

    from sls.baselines.depgraph import _finish_attention

    torch.manual_seed(0)
    dim, heads, head_dim, kept = 8, 2, 4, [0, 2, 3]  # keep 3 of the 4 dims of each head
    attn = Attention(dim, num_heads=heads, qkv_bias=True).eval()
    # Prune by hand what torch-pruning would: the kept rows of q, k, v and columns of proj.
    rows = torch.tensor([part * dim + h * head_dim + d for part in range(3) for h in range(heads) for d in kept])
    columns = torch.tensor([h * head_dim + d for h in range(heads) for d in kept])
    qkv, proj = torch.nn.Linear(dim, len(rows)), torch.nn.Linear(len(columns), dim)
    with torch.no_grad():
        qkv.weight.copy_(attn.qkv.weight[rows])
        qkv.bias.copy_(attn.qkv.bias[rows])
        proj.weight.copy_(attn.proj.weight[:, columns])
        proj.bias.copy_(attn.proj.bias)
    attn.qkv, attn.proj = qkv, proj
    x = torch.randn(2, 5, dim)
    with torch.no_grad():
        # The kept dims with the 1/sqrt(4) scale of the unpruned heads.
        q, k, v = qkv(x).reshape(2, 5, 3, heads, len(kept)).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) * head_dim**-0.5).softmax(dim=-1)
        expected = proj((weights @ v).transpose(1, 2).reshape(2, 5, len(columns)))
    _finish_attention(attn, heads, head_dim)
    attn.fused_attn = fused
    assert (attn.head_dim, attn.attn_dim) == (3, 6)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("round_to, widths", [(8, (48, 24, 136)), (None, (44, 22, 134))])
def test_widths_are_rounded_to_multiples_of_8_head_dims_included(loader, round_to, widths):
    # ratio 0.3 of 64 / 32 / 192 channels: 44.8 / 22.4 / 134.4 kept, rounded to 48 / 24 / 136
    # (torch-pruning's own count, without rounding: 44 / 22 / 134).
    pruned = depgraph_prune(adapted_vit("lora"), loader, ratio=0.3, round_to=round_to)
    for block in pruned.blocks:
        assert (pruned.embed_dim, block.attn.head_dim, block.mlp.fc1.out_features) == widths
        assert block.attn.qkv.out_features == 3 * block.attn.num_heads * block.attn.head_dim


def test_ratio_search_with_rounding_lands_on_the_nearest_achievable_count(loader):
    model = adapted_vit("lora")
    total = count(model)
    target = int(0.4 * total)
    ratio = ratio_for_parameter_reduction(model, loader, target)
    removed = total - count(depgraph_prune(model, loader, ratio=ratio, n_batches=1))
    # The neighbouring achievable counts: one multiple of 8 more or less of every width.
    neighbours = [total - count(depgraph_prune(model, loader, ratio=r, n_batches=1))
                  for r in (max(0.0, ratio - 0.125), min(0.85, ratio + 0.125))]  # fmt: skip
    assert all(abs(removed - target) <= abs(other - target) for other in neighbours), (removed, neighbours, target)


@pytest.mark.parametrize("importance", ["taylor", "magnitude"])
def test_kept_indices_rebuild_the_pruned_layers_from_the_unpruned_ones(loader, importance):
    from sls.petl.merge import merge_for_inference

    model = adapted_vit("lora")
    merged = merge_for_inference(model)
    pruned, kept = depgraph_prune(model, loader, ratio=0.3, importance=importance, return_kept=True)
    residual = kept["blocks.5.mlp.fc2"]  # the residual group's root
    assert len(residual) == pruned.embed_dim == 48
    for b, block in enumerate(pruned.blocks):
        hidden = kept[f"blocks.{b}.mlp.fc1"]
        heads = kept[f"blocks.{b}.attn.proj"]  # the head dims, in proj's input space
        assert len(hidden) == 136 and len(heads) == block.attn.num_heads * block.attn.head_dim
        original = merged.blocks[b]
        torch.testing.assert_close(block.mlp.fc1.weight, original.mlp.fc1.weight[hidden][:, residual], rtol=0, atol=0)
        torch.testing.assert_close(block.attn.proj.weight, original.attn.proj.weight[residual][:, heads], rtol=0, atol=0)
    torch.testing.assert_close(pruned.head.weight, merged.head.weight[:, residual], rtol=0, atol=0)


def test_the_two_importances_rank_channels_differently(loader):
    _, taylor = depgraph_prune(adapted_vit("lora"), loader, ratio=0.3, return_kept=True)
    _, magnitude = depgraph_prune(adapted_vit("lora"), loader, ratio=0.3, importance="magnitude", return_kept=True)
    assert taylor.keys() == magnitude.keys()
    assert any(not torch.equal(taylor[name], magnitude[name]) for name in taylor)
    with pytest.raises(ConfigError, match="unknown DepGraph importance"):
        depgraph_prune(adapted_vit("lora"), loader, ratio=0.3, importance="random")


def test_whole_head_pruning_keeps_each_kept_heads_size(loader):
    # test_vit has 2 heads of 32 dims: at ratio 0.5 one whole head goes, the other keeps its 32 dims.
    model = adapted_vit("lora")
    pruned, kept = depgraph_prune(model, loader, ratio=0.5, heads="whole", return_kept=True)
    for b, block in enumerate(pruned.blocks):
        assert (block.attn.num_heads, block.attn.head_dim) == (1, HEAD_DIM)
        assert block.attn.qkv.out_features == 3 * HEAD_DIM and block.attn.proj.in_features == HEAD_DIM
        heads = kept[f"blocks.{b}.attn.proj"]  # the kept head's dims, one whole head
        assert len(heads) == HEAD_DIM and heads[0] % HEAD_DIM == 0 and torch.equal(heads, heads[0] + torch.arange(32))
    assert pruned.embed_dim == 32 and pruned.blocks[0].mlp.fc1.out_features == 96
    images, _ = next(iter(loader))
    with torch.no_grad():
        assert torch.isfinite(pruned(images)).all()
    # At a small ratio the nearest whole number of heads is both: nothing of the attention goes.
    light = depgraph_prune(model, loader, ratio=0.2, heads="whole")
    assert light.blocks[0].attn.num_heads == 2 and light.blocks[0].attn.head_dim == HEAD_DIM
    with pytest.raises(ConfigError, match="unknown DepGraph head mode"):
        depgraph_prune(model, loader, ratio=0.2, heads="some")


@pytest.mark.parametrize("petl", [None, "lora", "adapter"])
@pytest.mark.parametrize("heads", ["dims", "whole"])
@pytest.mark.parametrize("round_to", [8, None])
def test_the_closed_form_parameter_count_is_the_pruned_models_at_every_ratio(loader, petl, heads, round_to):
    from sls.baselines.depgraph import parameter_count_at
    from sls.petl.merge import merge_for_inference

    model = adapted_vit(petl)
    closed_form = parameter_count_at(model, loader, round_to=round_to, heads=heads)
    assert closed_form is not None
    assert closed_form(0.0) == count(merge_for_inference(model))
    for ratio in (0.05, 0.13, 0.3, 0.45, 0.62, 0.9):
        pruned = depgraph_prune(model, loader, ratio=ratio, n_batches=1, importance="magnitude", round_to=round_to,
                                heads=heads)  # fmt: skip
        assert closed_form(ratio) == count(pruned), ratio


def test_the_ratio_search_traces_one_pruning_and_finds_what_pruning_at_every_step_finds(loader, monkeypatch):
    import sls.baselines.depgraph as depgraph

    model = adapted_vit("lora")
    target = count(model) // 3
    calls = []
    real_prune = depgraph._prune
    monkeypatch.setattr(depgraph, "_prune", lambda *a, **k: calls.append(k["ratio"]) or real_prune(*a, **k))
    ratio = ratio_for_parameter_reduction(model, loader, target)
    assert len(calls) == 1  # the probe; the bisection reads the closed form
    monkeypatch.setattr(depgraph, "parameter_count_at", lambda *a, **k: None)  # a pruning per ratio tried
    calls.clear()
    assert ratio_for_parameter_reduction(model, loader, target) == ratio
    assert len(calls) == 12  # both ends and ten halvings

"""Convpass and RepAdapter: what trains, zero start, merging, truncation, task round trip."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from sls.artifact import save_task
from sls.backbones import create_backbone, truncate
from sls.errors import ConfigError
from sls.experiment import load_task
from sls.petl import create_petl, trainable_state
from sls.petl.convpass import ConvBypass

METHODS = ["convpass", "repadapter"]
# test_vit is 64 wide with 6 blocks; the shapes cover a class token, no prefix token,
# register tokens with LayerScale, another width, and a square and a non-square grid.
SHAPES = {
    "cls-2x2": dict(img_size=32),
    "avg-3x3": dict(img_size=48, class_token=False, global_pool="avg"),
    "reg-2x3": dict(img_size=(32, 48), reg_tokens=2, embed_dim=32, init_values=0.1),
}
LAYERS = {"convpass": ("down", "conv", "up"), "repadapter": ("down", "up")}


def plain_vit(shape: str) -> torch.nn.Module:
    return timm.create_model("test_vit", pretrained=False, num_classes=3, **SHAPES[shape]).eval()


def images(model: torch.nn.Module, n: int = 4) -> torch.Tensor:
    height, width = model.patch_embed.img_size
    return torch.randn(n, 3, height, width, generator=torch.Generator().manual_seed(0))


def method_param_names(method: str, blocks: range) -> set[str]:
    return {
        f"blocks.{b}.{branch}.{method}.{layer}.{kind}"
        for b in blocks
        for branch in ("attn", "mlp")
        for layer in LAYERS[method]
        for kind in ("weight", "bias")
    }


def perturb(model: torch.nn.Module, only_petl: bool = True, seed: int = 1) -> None:
    """Stand-in for training: random values for the adapter (or all trainable) parameters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and (not only_petl or not name.startswith("head.")):
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", METHODS)
def test_only_the_method_and_the_head_train(method, shape):
    model = create_petl(method).apply(plain_vit(shape))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == method_param_names(method, range(6)) | {"head.weight", "head.bias"}
    dim, r = model.embed_dim, 8
    per_module = {
        "convpass": (dim * r + r) + (9 * r * r + r) + (r * dim + dim),
        "repadapter": (dim * r + r) + (r // 2 * dim + dim),  # up has 2 groups
    }[method]
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count == 6 * 2 * per_module + 3 * dim + 3


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", METHODS)
def test_adapted_model_starts_as_the_backbone_and_moves_when_trained(method, shape):
    backbone = plain_vit(shape)
    model = create_petl(method).apply(copy.deepcopy(backbone)).eval()
    x = images(model)
    with torch.no_grad():
        expected = backbone(x)
        assert max_diff(model(x), expected) <= 1e-6
        perturb(model)
        assert max_diff(model(x), expected) > 1e-3


@pytest.mark.parametrize("shape", SHAPES)
def test_merged_repadapter_is_the_plain_backbone_with_the_same_outputs(shape):
    method = create_petl("repadapter")
    model = method.apply(plain_vit(shape))
    perturb(model)
    model.eval()
    x = images(model)
    with torch.no_grad():
        unmerged = model(x)
        merged = method.merge(model)
        assert merged is model
        assert max_diff(merged(x), unmerged) <= 1e-5
    plain = plain_vit(shape)
    assert {k: v.shape for k, v in merged.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    assert [(n, type(m)) for n, m in merged.named_modules()] == [(n, type(m)) for n, m in plain.named_modules()]
    assert {n for n, p in merged.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    with pytest.raises(ConfigError, match="holds no repadapter"):
        method.merge(merged)


def test_repadapter_merge_needs_a_biased_qkv_and_leaves_a_refused_model_untouched():
    method = create_petl("repadapter")
    model = method.apply(timm.create_model("test_vit", pretrained=False, num_classes=3, img_size=32, qkv_bias=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"blocks\.0\.attn: it needs a biased qkv"):
        method.merge(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_repadapter_groups_must_divide_the_widths():
    with pytest.raises(ConfigError, match="groups=3 must divide"):
        create_petl("repadapter", groups=3).apply(plain_vit("cls-2x2"))


def test_convpass_cannot_be_merged():
    method = create_petl("convpass")
    with pytest.raises(ConfigError, match="convpass cannot be merged"):
        method.merge(method.apply(plain_vit("cls-2x2")))


def test_convpass_mixes_grid_neighbours_and_gives_prefix_tokens_the_centre_tap():
    bypass = ConvBypass(16, 4, grid_size=(2, 3), num_prefix_tokens=2, scale=0.5, dropout=0.1).eval()
    perturb(bypass)
    x = torch.randn(3, 2 + 6, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = bypass(x)
        # A prefix token is a 1x1 map for the same padded 3x3 conv.
        hidden = bypass.act(bypass.down(x[:, :2])).reshape(-1, 4, 1, 1)
        prefix = bypass.up(bypass.act(bypass.conv(hidden).reshape(3, 2, 4))) * 0.5
        assert max_diff(out[:, :2], prefix) <= 1e-6
        # Changing the patch at row 0, column 0 moves only it and its grid neighbours.
        nudged = x.clone()
        nudged[:, 2] += 1.0
        moved = (bypass(nudged) - out).abs().amax(dim=(0, 2)) > 0
    #                             prefix        row 0 of the grid    row 1 of the grid
    assert moved.tolist() == [False, False, True, True, False, True, True, False]


def test_convpass_refuses_a_token_count_that_is_not_its_grid():
    model = create_petl("convpass").apply(plain_vit("cls-2x2"))
    with pytest.raises(ConfigError, match=r"2x2 token grid plus 1 prefix tokens, got 10 tokens"):
        model(torch.zeros(1, 3, 48, 48))  # test_vit accepts any size; the bypass must not


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", METHODS)
def test_truncated_model_runs_and_its_task_tensors_are_the_kept_blocks(method, shape):
    model = create_petl(method).apply(plain_vit(shape))
    truncate(model, 2)
    with torch.no_grad():
        assert model(images(model)).shape == (4, 3)
    assert set(trainable_state(model)) == method_param_names(method, range(2)) | {"head.weight", "head.bias"}


@pytest.mark.parametrize("img_size", [32, 48])
@pytest.mark.parametrize("method", METHODS)
def test_task_round_trip_gives_an_identical_model(tmp_path, method, img_size):
    model, info = create_backbone("test_vit", num_classes=4, weights="random", img_size=img_size)
    petl = create_petl(method, scale=2.0)
    petl.apply(model)
    truncate(model, 3)
    perturb(model, only_petl=False)
    record = {"backbone": info.to_dict(), "petl": {"method": petl.name, "hparams": petl.hparams},
              "depth": 3, "num_classes": 4}  # fmt: skip
    save_task(tmp_path / "task", model, record)
    loaded, _ = load_task(tmp_path / "task")
    model.eval()
    x = images(model)
    with torch.no_grad():
        expected = model(x)
        assert max_diff(loaded(x), expected) == 0
        if method == "repadapter":  # a truncated, reloaded task still merges
            assert max_diff(petl.merge(loaded)(x), expected) <= 1e-5


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("lora", dict(r="abc"), "lora option r must be a whole number >= 1, got 'abc'"),
        ("lora", dict(r=0), "lora option r must be a whole number >= 1, got 0"),
        ("lora", dict(r=2.5), "lora option r must be a whole number >= 1, got 2.5"),
        ("lora", dict(alpha=True), "lora option alpha must be a number, got True"),
        ("lora", dict(target_modules=[]), "lora option target_modules must be one or more names"),
        ("adapter", dict(bottleneck=-3), "adapter option bottleneck must be a whole number >= 1, got -3"),
        ("convpass", dict(scale="abc"), "convpass option scale must be a number, got 'abc'"),
        ("convpass", dict(scale=float("inf")), "convpass option scale must be a number, got inf"),
        ("repadapter", dict(dropout=1), r"repadapter option dropout must be in \[0, 1\), got 1"),
        ("repadapter", dict(groups=0), "repadapter option groups must be a whole number >= 1, got 0"),
        ("convpass", dict(conv_init=3), "convpass option conv_init must be a string, got 3"),
    ],
)
def test_bad_hyper_parameters_are_refused_before_any_model_is_touched(method, options, message):
    with pytest.raises(ConfigError, match=message):
        create_petl(method, **options)


def test_lora_target_modules_from_a_comma_list_and_unknown_names():
    method = create_petl("lora", target_modules="qkv, fc1", r=2.0)
    assert method.hparams["target_modules"] == ["qkv", "fc1"] and method.hparams["r"] == 2
    model = method.apply(plain_vit("cls-2x2"))
    adapted = {name.split(".")[3] for name, p in model.named_parameters() if p.requires_grad and "lora_" in name}
    assert adapted == {"qkv", "fc1"}
    with pytest.raises(ConfigError, match=r"cannot adapt target_modules=\['nope'\].*named: fc1, fc2, head, proj, qkv"):
        create_petl("lora", target_modules=["nope"]).apply(plain_vit("cls-2x2"))

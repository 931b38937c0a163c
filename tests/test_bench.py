"""The one measurement module: FLOPs against a count by hand, peak memory against the
tensors a known model must hold, timing against a model of known duration."""

from __future__ import annotations

import time

import pytest
import timm
import torch
from torch import nn

from sls import bench


def test_flops_of_a_vit_equal_the_count_by_hand():
    # test_vit at 32 px: 4 patches of 16x16 + CLS = 5 tokens, 64 wide, 2 heads of 32, MLP 192, 6 blocks.
    model = timm.create_model("test_vit", pretrained=False, num_classes=3, img_size=32).eval()
    tokens, dim, hidden, blocks, heads, head_dim = 5, 64, 192, 6, 2, 32
    macs = 4 * (3 * 16 * 16) * dim  # patch embedding
    macs += blocks * tokens * (dim * 3 * dim + dim * dim + 2 * dim * hidden)  # qkv, proj, fc1, fc2
    macs += blocks * heads * 2 * tokens * tokens * head_dim  # q k^T and attn v: the fused CPU kernel counted too
    macs += dim * 3  # head
    assert bench.flops(model, img_size=32) == 2 * macs
    # A truncated model's FLOPs fall by exactly its blocks' share.
    model.blocks = model.blocks[:2]
    per_block = tokens * (dim * 3 * dim + dim * dim + 2 * dim * hidden) + heads * 2 * tokens * tokens * head_dim
    assert bench.flops(model, img_size=32) == 2 * (macs - 4 * per_block)


def test_peak_memory_counts_the_tensors_a_forward_must_hold_at_once():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 1000), nn.ReLU(), nn.Linear(1000, 10)).eval()
    batch = 8
    peak = bench.peak_memory(model, batch_size=batch, img_size=4)
    # The first linear's output and the ReLU's are alive together (Sequential drops the
    # former only once the latter exists); nothing larger is ever held.
    assert peak["forward"] == 2 * batch * 1000 * 4
    assert peak["parameters"] == 4 * sum(p.numel() for p in model.parameters())
    assert peak["how"] == "peak of live tensors" and peak["batch_size"] == batch


class Sleeper(nn.Module):
    """A model that takes a known time per call, whatever the batch."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return x.mean(dim=(1, 2, 3)) + self.weight


def test_throughput_and_latency_measure_the_time_a_call_takes():
    fast, slow = Sleeper(0.004), Sleeper(0.012)
    figures = bench.measure({"fast": fast, "slow": slow}, img_size=8, batch_sizes=(1, 4), min_time=0.05, rounds=2)
    for name, seconds in (("fast", 0.004), ("slow", 0.012)):
        mine = figures[name]
        # sleep() overshoots by a little, never undershoots.
        assert 0.6 / seconds < mine["throughput"]["1"] <= 1 / seconds
        assert 0.6 * 4 / seconds < mine["throughput"]["4"] <= 4 / seconds
        latency = mine["latency_ms"]
        assert 1000 * seconds <= latency["p50"] <= latency["p90"] <= latency["p99"] < 1000 * seconds + 20
        assert latency["calls"] >= 50 and mine["parameters"] == 1
    assert figures["fast"]["throughput"]["4"] > 2 * figures["slow"]["throughput"]["4"]


def test_measure_reports_every_figure_per_model():
    model = timm.create_model("test_vit", pretrained=False, num_classes=3, img_size=32, depth=2)
    figures = bench.measure({"vit": model}, img_size=32, batch_sizes=(4, 1))
    assert set(figures["vit"]) == {"parameters", "flops", "throughput", "latency_ms", "peak_memory"}
    assert set(figures["vit"]["throughput"]) == {"1", "4"}
    assert figures["vit"]["peak_memory"]["batch_size"] == 4 and figures["vit"]["peak_memory"]["forward"] > 0
    without_one = bench.measure({"vit": model}, img_size=32, batch_sizes=(4,))
    assert "latency_ms" not in without_one["vit"]


def test_timing_uses_the_threads_the_caller_set():
    # torch.utils.benchmark's Timer runs on one thread unless told: the figures must be
    # those of the caller's thread setting.
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(torch.get_num_threads())
            return x

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        bench.throughput({"probe": Probe()}, batch_size=1, img_size=4, min_time=0.01, rounds=1)
    finally:
        torch.set_num_threads(threads)
    assert seen and set(seen) == {2}


@pytest.mark.parametrize("batch_sizes", [(1,), (1, 8)])
def test_the_largest_batch_sets_the_peak_memory_batch(batch_sizes):
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16)).eval()
    figures = bench.measure({"m": model}, img_size=4, batch_sizes=batch_sizes)
    assert figures["m"]["peak_memory"]["batch_size"] == max(batch_sizes)


def _bench_script(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_script_runs_unchanged_on_the_cpu(tmp_path, monkeypatch, capsys):
    import json

    import sls.runtime

    script = _bench_script("gpu_throughput")
    compiled = []
    monkeypatch.setattr(sls.runtime, "COMPILE_FAILURES", [])
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(model) or model)  # a real one: slow test
    out = tmp_path / "gpu.json"
    args = script.parse_args(["--device", "cpu", "--models", "test_vit", "--img-size", "32", "--depths", "2,4",
                              "--batches", "1,4", "--min-time", "0.01", "--warmup-time", "0", "--rounds", "1",
                              "--json", str(out)])  # fmt: skip
    assert args.precisions == ["fp32", "bf16"] and args.modes == ["eager", "compiled"]  # the GPU defaults
    result = script.run(args)
    rows = json.loads(out.read_text())["rows"]
    assert rows == json.loads(json.dumps(result["rows"]))
    # eager: full, k=2, k=4; compiled: full and the first k; each at both precisions and batches.
    assert len(rows) == 2 * 2 * 3 + 2 * 2 * 2
    assert len(compiled) == 2 * 2 * (2 + 1)  # per precision and model: throughput at each batch, then latency
    for row in rows:
        assert row["images_per_s"] > 0 and row["parameters"] > 0
        if row["batch"] == 1:
            assert row["latency_ms"]["p50"] > 0
        if row["variant"] == "full":
            assert row["speedup"] == 1.0 and row["blocks"] == 6
    table = capsys.readouterr().out
    assert "| test_vit | bf16 (bfloat16) | compiled | 4 | k=2 | 2/6 |" in table

"""Device, mixed precision and channels-last: train, predict and throughput follow the runtime they are given."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from sls.backbones import create_backbone
from sls.bench import throughput
from sls.cli import _config_from, build_parser
from sls.config import RunConfig
from sls.errors import ConfigError
from sls.experiment import Experiment
from sls.petl import create_petl
from sls.runtime import Runtime, resolve_device
from sls.train import predict, train


def tiny_lora_vit() -> torch.nn.Module:
    model, _ = create_backbone("test_vit", num_classes=3, weights="random", img_size=32)
    create_petl("lora").apply(model)
    return model.eval()


def loader_of(images, labels, shuffle=False):
    return DataLoader(TensorDataset(images, labels), batch_size=16, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(0) if shuffle else None)  # fmt: skip


def linear_output_dtypes(model) -> list[torch.dtype]:
    """Filled with the dtype of the last MLP's first linear layer at each forward (the
    residual stream itself stays float32 under autocast)."""
    seen = []
    model.blocks[-1].mlp.fc1.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen


def test_amp_autocasts_the_forward_pass_to_bfloat16_on_cpu(tiny_images):
    images, labels = tiny_images
    model = tiny_lora_vit()
    reference, _ = predict(model, loader_of(images, labels), progress=False)
    dtypes = linear_output_dtypes(model)
    mixed, got_labels = predict(model, loader_of(images, labels), progress=False, runtime=Runtime(amp=True))
    assert set(dtypes) == {torch.bfloat16}
    assert mixed.dtype == torch.float32 and torch.equal(got_labels, labels)
    # bfloat16 keeps 8 bits of mantissa: close to float32, not equal.
    assert not torch.equal(mixed, reference)
    torch.testing.assert_close(mixed, reference, atol=0.1, rtol=0.05)
    again, _ = predict(model, loader_of(images, labels), progress=False)  # no process-wide runtime stays behind
    assert torch.equal(again, reference)


def test_amp_training_updates_float32_parameters(tiny_images):
    images, labels = tiny_images
    model = tiny_lora_vit()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses = train(model, loader_of(images, labels, shuffle=True), epochs=2, lr=1e-2, progress=False,
                   runtime=Runtime(amp=True))  # fmt: skip
    assert all(torch.isfinite(torch.tensor(losses)))
    after = dict(model.named_parameters())
    assert all(after[n].dtype == torch.float32 for n in before)
    assert any(not torch.equal(after[n], before[n]) for n in before)


def test_channels_last_changes_the_layout_not_the_outputs(tiny_images):
    images, labels = tiny_images
    model = tiny_lora_vit()
    reference, _ = predict(model, loader_of(images, labels), progress=False)
    runtime = Runtime(channels_last=True)
    runtime.place(model)
    assert model.patch_embed.proj.weight.is_contiguous(memory_format=torch.channels_last)
    assert runtime.inputs(images, torch.device("cpu")).is_contiguous(memory_format=torch.channels_last)
    got, _ = predict(model, loader_of(images, labels), progress=False, runtime=runtime)
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)


def test_throughput_runs_under_the_runtime_it_is_given():
    full = tiny_lora_vit()
    dtypes = linear_output_dtypes(full)
    rates = throughput({"full": full, "copy": copy.deepcopy(full)}, batch_size=2, img_size=32, min_time=0.01,
                       rounds=1, runtime=Runtime(amp=True, channels_last=True))  # fmt: skip
    assert set(rates) == {"full", "copy"} and all(rate > 0 for rate in rates.values())
    assert dtypes and set(dtypes) == {torch.bfloat16}


def test_devices_are_checked():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for bad, message in (("mps", "sls runs on cpu or cuda"), ("gpu please", "not a device")):
        with pytest.raises(ConfigError, match=message):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


def test_the_run_options_reach_the_runtime_and_the_model():
    args = build_parser().parse_args(["run", "--amp", "--channels-last", "--device", "cpu", "--model", "test_vit",
                                      "--weights", "random", "--data", "digits", "--img-size", "32",
                                      "--train-samples", "100", "--test-samples", "30", "--quiet"])  # fmt: skip
    config = _config_from(args)
    assert (config.amp, config.channels_last, config.device) == (True, True, "cpu")
    assert (RunConfig.amp, RunConfig.channels_last, RunConfig.device) == (False, False, "auto")
    exp = Experiment.from_config(config)
    assert exp.runtime == Runtime(device=torch.device("cpu"), amp=True, channels_last=True)
    assert exp.model.patch_embed.proj.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_train_predict_and_throughput_on_cuda_with_amp(tiny_images):
    images, labels = tiny_images
    model = tiny_lora_vit()
    reference, _ = predict(model, loader_of(images, labels), progress=False)
    runtime = Runtime(device=resolve_device("cuda"), amp=True, channels_last=True)
    runtime.place(model)
    got, _ = predict(model, loader_of(images, labels), progress=False, runtime=runtime)
    train(model, loader_of(images, labels, shuffle=True), epochs=1, lr=1e-2, progress=False, runtime=runtime)
    rates = throughput({"full": model}, batch_size=4, img_size=32, min_time=0.01, rounds=1, runtime=runtime)
    assert got.device.type == "cpu"
    torch.testing.assert_close(got, reference, atol=0.1, rtol=0.05)
    assert next(model.parameters()).device.type == "cuda" and rates["full"] > 0


@pytest.fixture
def fresh_compile_state(monkeypatch):
    import sls.runtime

    monkeypatch.setattr(sls.runtime, "COMPILE_FAILURES", [])
    return sls.runtime


def test_compile_reaches_training_prediction_and_throughput(tiny_images, monkeypatch, fresh_compile_state):
    images, labels = tiny_images
    compiled = []

    def spy_compile(model, **kwargs):  # stands in for torch.compile: records what it was given
        compiled.append(type(model).__name__)
        return model

    monkeypatch.setattr(torch, "compile", spy_compile)
    model = tiny_lora_vit()
    runtime = Runtime(compile=True)
    reference, _ = predict(model, loader_of(images, labels), progress=False)
    got, _ = predict(model, loader_of(images, labels), progress=False, runtime=runtime)
    torch.testing.assert_close(got, reference, rtol=0, atol=0)
    train(model, loader_of(images, labels, shuffle=True), epochs=1, lr=1e-2, progress=False, runtime=runtime)
    throughput({"full": model}, batch_size=4, img_size=32, min_time=0.01, rounds=1, runtime=runtime)
    assert compiled == ["VisionTransformer"] * 3
    assert Runtime(compile=False).compiled(model) is model and runtime.describe()["compile"] is True
    args = build_parser().parse_args(["run", "--compile", "--device", "cpu"])
    assert _config_from(args).compile and not RunConfig.compile


def test_a_platform_that_cannot_compile_runs_eagerly_after_one_warning(tiny_images, monkeypatch, fresh_compile_state):
    images, _ = tiny_images

    from torch._inductor.exc import InductorError

    def failing_compile(model, **kwargs):
        def forward(*args, **kw):
            raise InductorError(RuntimeError("no working C++ compiler found\nsee the log"), None)

        return forward

    monkeypatch.setattr(torch, "compile", failing_compile)
    model = tiny_lora_vit()
    with torch.inference_mode():
        expected = model(images[:4])
        with pytest.warns(UserWarning, match="cannot compile here .*no working C\\+\\+ compiler found see the log"):
            got = Runtime(compile=True).compiled(model)(images[:4])
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert len(fresh_compile_state.COMPILE_FAILURES) == 1
        import warnings

        with warnings.catch_warnings():  # the next model does not try (and warn) again
            warnings.simplefilter("error")
            torch.testing.assert_close(Runtime(compile=True).compiled(model)(images[:4]), expected, rtol=0, atol=0)
    assert Runtime(compile=True).describe()["compile"] is False  # the record says it ran eagerly


def test_the_models_own_errors_are_not_taken_for_a_compile_failure(monkeypatch, fresh_compile_state):
    def compile_of_a_failing_model(model, **kwargs):
        def forward(*args, **kw):
            raise torch.OutOfMemoryError("CUDA out of memory")

        return forward

    monkeypatch.setattr(torch, "compile", compile_of_a_failing_model)
    with pytest.raises(torch.OutOfMemoryError):
        Runtime(compile=True).compiled(tiny_lora_vit())(torch.randn(1, 3, 32, 32))
    assert fresh_compile_state.COMPILE_FAILURES == []


@pytest.mark.slow  # a real compile takes about a minute on this CPU
def test_a_real_compile_gives_the_eager_outputs(tiny_images, fresh_compile_state):
    images, _ = tiny_images
    model = tiny_lora_vit()
    with torch.inference_mode():
        expected = model(images[:8])
        got = Runtime(compile=True).compiled(model)(images[:8])
    assert not fresh_compile_state.COMPILE_FAILURES
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)

"""Sampling under real CUDA graphs: the same images as eager within bf16 rounding for every backbone (the LiT and
KV-compression kernels included), the class and ControlNet pipelines, and no host sync in a replayed step."""

import contextlib

import pytest
import torch

from dit.pipelines import ControlNetPipeline
from dit.pipelines.cuda_graphs import CUDAGraphBackend
from tests.pipelines.test_cuda_graphs import _latents, _pipe, controlled_pipe
from tests.tiny import FORWARD_VARIANTS, class_pipeline, variant_model

DTYPE = torch.bfloat16


def _on_cuda(pipe):
    pipe.to("cuda", DTYPE)
    return pipe


def _assert_bf16_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Within a few bf16 roundings of the largest latent (graphs replay the kernels eager runs, so any difference is
    a rounding carried through the steps; the tiny random models' latents reach a few hundred)."""
    assert actual.device.type == "cuda" and actual.dtype == expected.dtype == DTYPE
    scale = max(1.0, expected.float().abs().max().item())
    difference = (actual.float() - expected.float()).abs().max().item()
    assert difference <= 2e-2 * scale, f"max |diff| {difference:.3g} > 2e-2 x {scale:.3g}"


def _graphed(pipe, run) -> tuple[torch.Tensor, torch.Tensor]:
    """The output of ``run(pipe)`` eager, then with graphs on twice (capture, then replay only): (eager, graphed)."""
    expected = run(pipe)
    pipe.enable_cuda_graphs()
    first = run(pipe)
    captured = len(pipe.cuda_graphs.graphs)
    again = run(pipe)
    assert isinstance(pipe.cuda_graphs.backend, CUDAGraphBackend) and captured >= 1
    assert len(pipe.cuda_graphs.graphs) == captured  # the second call replays only
    assert torch.equal(first, again)
    return expected, again


@pytest.mark.parametrize("variant", FORWARD_VARIANTS)
def test_every_backbone_matches_eager_in_bf16(variant):
    pipe = _on_cuda(_pipe(variant_model(variant)))
    expected, actual = _graphed(pipe, lambda p: _latents(p, steps=4, width=24))
    _assert_bf16_close(actual, expected)
    assert len(pipe.cuda_graphs.graphs) == 1


def test_class_pipeline_matches_eager_in_bf16():
    pipe = _on_cuda(class_pipeline())
    run = dict(num_inference_steps=4, output_type="latent", height=16, width=24, use_resolution_binning=False)
    expected, actual = _graphed(
        pipe, lambda p: p([1, "goldfish"], generator=torch.Generator().manual_seed(0), **run).images
    )
    _assert_bf16_close(actual, expected)


def test_controlnet_pipeline_matches_eager_in_bf16():
    pipe, run = controlled_pipe()
    assert isinstance(pipe, ControlNetPipeline)
    expected, actual = _graphed(_on_cuda(pipe), lambda p: _latents(p, **run))
    _assert_bf16_close(actual, expected)
    assert len(pipe.cuda_graphs.graphs) == 4  # one per set of active adapters


@contextlib.contextmanager
def _sync_mode(mode: str):
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _without_syncs(function):
    """``function`` run under ``set_sync_debug_mode("error")``: any host sync inside it raises, naming the op."""

    def strict(*args, **kwargs):
        with _sync_mode("error"):
            return function(*args, **kwargs)

    return strict


def test_replayed_denoiser_calls_never_sync(monkeypatch):
    """Once captured, every denoiser call (inputs copied in, replay, output copied out) runs without a host sync."""
    pipe = _on_cuda(_pipe(variant_model("lit")))
    pipe.enable_cuda_graphs()
    _latents(pipe, steps=2)  # captures
    monkeypatch.setattr(pipe, "call_transformer", _without_syncs(pipe.call_transformer))
    _latents(pipe, steps=4)


def test_the_step_loop_never_syncs_after_the_first_step_index(monkeypatch):
    """The whole loop of a replaying call (scheduler steps and CFG included) under ``set_sync_debug_mode("error")``.

    diffusers' schedulers find their first step index with ``nonzero().item()`` (a sync) unless a begin index is set,
    so the test sets it as diffusers' image-to-image pipelines do; any other sync fails here, naming the op."""
    pipe = _on_cuda(_pipe())
    pipe.enable_cuda_graphs()
    _latents(pipe, steps=2)  # captures
    scheduler, set_timesteps = pipe.scheduler, pipe.scheduler.set_timesteps

    def set_timesteps_from_the_start(*args, **kwargs):
        set_timesteps(*args, **kwargs)
        scheduler.set_begin_index(0)

    monkeypatch.setattr(scheduler, "set_timesteps", set_timesteps_from_the_start)
    monkeypatch.setattr(pipe, "denoise", _without_syncs(pipe.denoise))
    _latents(pipe, steps=4)


def test_sdpa_flex_under_graphs_matches_eager():
    """The block mask is built on the device inside the captured forward, FlexAttention compiled at the warm-up."""
    pipe = _pipe(variant_model("sigma-mask"))
    pipe.transformer.set_attention_backend("sdpa_flex")
    pipe = _on_cuda(pipe)
    expected, actual = _graphed(pipe, lambda p: _latents(p, steps=4, width=24))
    _assert_bf16_close(actual, expected)

"""Selective activation checkpointing on CUDA, eager and inside inductor-compiled blocks: the gradients of no
checkpointing, and peak memory between full checkpointing's and none's."""

import pytest
import torch

from dit import PixArtTransformer
from dit.models.base import compile_repeated_blocks
from tests.tiny import SIGMA, randomize_

MODES = ("none", "full", "selective")


def _run(mode: str, compiled: bool) -> tuple[dict, int]:
    torch._dynamo.reset()
    torch.manual_seed(0)
    config = {**SIGMA, "num_layers": 4, "sample_size": 32}
    model = randomize_(PixArtTransformer(**config), std=0.05).cuda().train()
    if mode != "none":
        model.enable_gradient_checkpointing(selective=mode == "selective")
    if compiled:
        compile_repeated_blocks(model, fullgraph=True, dynamic=False)
    gen = torch.Generator("cuda").manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(8, 4, 32, 32, device="cuda", generator=gen),
        "encoder_hidden_states": torch.randn(8, 12, SIGMA["caption_channels"], device="cuda", generator=gen),
        "timestep": torch.full((8,), 500.0, device="cuda"),
    }
    model(**inputs).sample.square().mean().backward()  # warm-up (compilation)
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    model(**inputs).sample.square().mean().backward()
    peak = torch.cuda.max_memory_allocated() - start
    return {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}, peak


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_selective_gradients_and_memory(compiled):
    runs = {mode: _run(mode, compiled) for mode in MODES}
    expected = runs["none"][0]
    for name, grad in runs["selective"][0].items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-5, msg=name)
    peaks = {mode: peak for mode, (_, peak) in runs.items()}
    assert peaks["full"] < peaks["selective"] < peaks["none"], peaks

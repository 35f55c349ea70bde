"""A shape-stable, sync-free forward: fullgraph ``torch.compile`` of every backbone variant, no tensor read on the
host, no blocking host-to-device copy, few recompilations across caption lengths, and regional compilation."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch.utils._python_dispatch import TorchDispatchMode

from dit import PixArtTransformer
from dit.models.base import compile_repeated_blocks
from dit.nn.text_padding import trim_text_padding
from tests.tiny import FORWARD_VARIANTS, SIGMA, variant_inputs, variant_model


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def counting_backend() -> tuple[callable, list]:
    """A torch.compile backend that runs the captured graph as is and records every compilation."""
    graphs = []

    def backend(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend, graphs


def _sample(output) -> torch.Tensor:
    return output.sample if hasattr(output, "sample") else output[0]


@pytest.mark.parametrize("variant", FORWARD_VARIANTS)
def test_whole_model_compiles_without_graph_break(variant):
    model, inputs = variant_model(variant), variant_inputs(variant)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        expected, actual = _sample(model(**inputs)), _sample(compiled(**inputs))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", FORWARD_VARIANTS)
def test_repeated_blocks_compile_without_graph_break_forward_and_backward(variant):
    model, inputs = variant_model(variant), variant_inputs(variant)
    with torch.no_grad():
        expected = _sample(model(**inputs))
    count = compile_repeated_blocks(model, fullgraph=True, backend="aot_eager")
    assert count == len(model.transformer_blocks) + len(getattr(model, "patch_mixer", []) or [])
    actual = _sample(model(**inputs))
    torch.testing.assert_close(actual.detach(), expected, rtol=1e-5, atol=1e-5)
    actual.square().mean().backward()
    assert all(p.grad is not None for p in model.transformer_blocks.parameters() if p.requires_grad)


class HostTraffic(TorchDispatchMode):
    """Records every blocking copy from the CPU onto ``device`` (on CUDA, a stream synchronisation)."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device, self.blocking_copies = device, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        source = (
            args[0]
            if func is torch.ops.aten._to_copy.default
            else args[1]
            if func is torch.ops.aten.copy_.default
            else None
        )
        target = kwargs.get("device") if func is torch.ops.aten._to_copy.default else getattr(args[0], "device", None)
        if isinstance(source, torch.Tensor) and source.device.type == "cpu" and target == self.device:
            if not kwargs.get("non_blocking", len(args) > 2 and args[2]):
                self.blocking_copies.append((str(func), tuple(source.shape)))
        return func(*args, **kwargs)


@pytest.mark.parametrize("variant", FORWARD_VARIANTS)
def test_forward_reads_nothing_on_the_host(variant):
    """On the ``meta`` device a tensor has no data: any ``.item()``, ``bool()``, ``int()`` or ``.tolist()`` of model
    data in the forward raises. A blocking host-to-device copy (a sync on CUDA) is recorded; after the first call
    (which fills the position-table cache) there is none."""
    device = torch.device("meta")
    model, inputs = variant_model(variant).to(device), variant_inputs(variant, device)
    with torch.no_grad():
        model(**inputs)
        with HostTraffic(device) as traffic:
            output = _sample(model(**inputs))
    assert output.device == device
    assert traffic.blocking_copies == []


@pytest.mark.parametrize("pad_to, real_lengths", [(300, [5, 17, 40, 64, 65, 100, 150, 200, 299, 300]),
                                                  (120, [5, 9, 20, 33, 50, 64, 65, 90, 110, 120])],
                         ids=["sigma-300", "alpha-120"])  # fmt: skip
def test_ten_caption_lengths_recompile_at_most_four_times(pad_to, real_lengths):
    """Captions trimmed as the pipeline and trainer trim them reach the compiled model in a few fixed lengths."""
    torch.manual_seed(0)
    model = PixArtTransformer(**SIGMA).eval()
    backend, graphs = counting_backend()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    latents, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0])
    for real in real_lengths:
        inputs = variant_inputs("sigma-mask", text_length=pad_to, real=real)
        text, mask = trim_text_padding(inputs["encoder_hidden_states"], inputs["encoder_attention_mask"])
        with torch.no_grad():
            actual = compiled(latents, text, t, encoder_attention_mask=mask).sample
            if real in (real_lengths[0], real_lengths[-1]):
                full = model(
                    latents,
                    inputs["encoder_hidden_states"],
                    t,
                    encoder_attention_mask=inputs["encoder_attention_mask"],
                )
                torch.testing.assert_close(actual, full.sample, rtol=1e-5, atol=1e-5)
    assert 1 <= len(graphs) <= 5, f"{len(graphs) - 1} recompilations"


def test_untrimmed_captions_never_recompile():
    """Without trimming (diffusers' pipelines pass the full padding) the shape never changes: one compilation."""
    torch.manual_seed(0)
    model = PixArtTransformer(**SIGMA).eval()
    backend, graphs = counting_backend()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    for real in (3, 50, 120):
        inputs = variant_inputs("sigma-mask", text_length=120, real=real)
        inputs.pop("hidden_states")
        with torch.no_grad():
            compiled(torch.randn(2, 4, 8, 8), **inputs)
    assert len(graphs) == 1

"""Compile that pays (issue 28, item 2): how often the compiled forward recompiles and where it breaks its graph.

Regional compilation (``compile_repeated_blocks``) must compile each block class once and then replay it for every
denoising step (new timesteps), every caption of one text-length bucket, and every block of the model; a new batch
size with ``dynamic=False`` costs exactly one more graph, never a dynamic-shape one. Whole-model
``torch.compile(fullgraph=True)`` of every backbone variant is one graph without a break, stable across steps.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from dit import PixArtTransformer
from dit.models.base import compile_repeated_blocks
from dit.nn.text_padding import trim_text_padding
from tests.tiny import FORWARD_VARIANTS, SIGMA, variant_inputs, variant_model

STEPS = 10
#: Graphs a variant's first regionally compiled call makes beyond one per block class: MicroDiT's blocks after token
#: masking run on fewer tokens than those before it (a second static shape).
EXTRA_FIRST_GRAPHS = {"microdit-masked": 1}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class GraphRecorder:
    """A ``torch.compile`` backend that runs each captured graph as is and records it, with whether any of its
    inputs has a symbolic (dynamic) size."""

    def __init__(self):
        self.graphs: list[torch.fx.GraphModule] = []
        self.dynamic: list[bool] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs.append(gm)
        symbolic = any(isinstance(v, torch.SymInt) for v in example_inputs) or any(
            isinstance(s, torch.SymInt) for v in example_inputs if isinstance(v, torch.Tensor) for s in v.shape
        )
        self.dynamic.append(symbolic)
        return gm.forward

    def __len__(self) -> int:
        return len(self.graphs)


def _steps(model, inputs: dict, steps: int = STEPS) -> None:
    """``steps`` denoising-like calls: the same shapes, a new timestep each call."""
    batch = inputs["hidden_states"].shape[0]
    with torch.no_grad():
        for t in torch.linspace(999, 1, steps):
            model(**{**inputs, "timestep": t.expand(batch).clone()})


def _block_classes(model) -> int:
    names = {name for sub in model.modules() for name in getattr(sub, "_repeated_blocks", ())}
    return len({type(sub) for sub in model.modules() if type(sub).__name__ in names})


@pytest.mark.parametrize("variant", FORWARD_VARIANTS)
def test_regional_compile_is_one_graph_per_block_class_and_never_recompiles_across_steps(variant):
    model, inputs = variant_model(variant), variant_inputs(variant)
    recorder = GraphRecorder()
    compile_repeated_blocks(model, fullgraph=True, backend=recorder, dynamic=False)
    _steps(model, inputs, 1)
    first, expected = len(recorder), _block_classes(model) + EXTRA_FIRST_GRAPHS.get(variant, 0)
    assert first == expected, f"{first} graphs for {_block_classes(model)} block classes"
    _steps(model, inputs)
    assert len(recorder) == first, f"{len(recorder) - first} recompilations over {STEPS} steps"


@pytest.mark.parametrize("variant", FORWARD_VARIANTS)
def test_whole_model_is_one_graph_without_break(variant):
    model, inputs = variant_model(variant), variant_inputs(variant)
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(**inputs)
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.parametrize("variant", ["alpha-mask", "sigma-kv"])
def test_whole_model_compile_never_recompiles_across_steps(variant):
    model, inputs = variant_model(variant), variant_inputs(variant)
    recorder = GraphRecorder()
    compiled = torch.compile(model, fullgraph=True, backend=recorder, dynamic=False)
    _steps(compiled, inputs)
    assert len(recorder) == 1, f"{len(recorder) - 1} recompilations over {STEPS} steps"


def _trimmed(real: int, pad_to: int = 120) -> dict:
    inputs = variant_inputs("sigma-mask", text_length=pad_to, real=real)
    text, mask = trim_text_padding(inputs["encoder_hidden_states"], inputs["encoder_attention_mask"])
    return {**inputs, "encoder_hidden_states": text, "encoder_attention_mask": mask}


def test_regional_compile_does_not_recompile_within_a_text_length_bucket():
    """Captions of 5 to 60 real tokens are trimmed to the same 64-token bucket: the same graph serves them all."""
    torch.manual_seed(0)
    model = PixArtTransformer(**SIGMA).eval()
    recorder = GraphRecorder()
    compile_repeated_blocks(model, fullgraph=True, backend=recorder, dynamic=False)
    lengths = (5, 17, 33, 48, 60)
    assert {_trimmed(real)["encoder_hidden_states"].shape[1] for real in lengths} == {64}
    for real in lengths:
        _steps(model, _trimmed(real), 2)
    assert len(recorder) == 1, f"{len(recorder) - 1} recompilations within one bucket"


@pytest.mark.parametrize("dynamic", [False, None], ids=["static", "default"])
def test_a_second_batch_size_costs_one_graph_and_static_compile_never_goes_dynamic(dynamic):
    """Batch 1, then 2, then both again (as a benchmark going from batch 1 to 4 does). With ``dynamic=False`` the new batch is one more static graph and
    alternating reuses both. torch's default (``dynamic=None``) recompiles the second shape as a dynamic-shape graph
    (automatic dynamic shapes): symbolic sizes, which on a GPU give slower generic kernels and no CUDA graphs;
    this is why a regionally compiled model measured at several shapes in one process ran slower than eager."""
    torch.manual_seed(0)
    model = PixArtTransformer(**SIGMA).eval()
    recorder = GraphRecorder()
    compile_repeated_blocks(model, fullgraph=True, backend=recorder, dynamic=dynamic)
    inputs = _trimmed(40)
    one = {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    for batch in (one, inputs, one, inputs):
        _steps(model, batch, 2)
    assert len(recorder) == 2, f"{len(recorder)} graphs for two batch sizes"
    assert recorder.dynamic == [False, dynamic is None]

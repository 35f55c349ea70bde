"""Selective activation checkpointing (dit.models.activation_checkpointing) on every backbone variant and the
ControlNet adapter: the same loss and gradients as no checkpointing and full checkpointing, matmuls and attention
kept (not rerun in backward) while norms and modulation are recomputed, activation memory between the two."""

from collections import Counter

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dit import ControlNetAdapter, PixArtTransformer
from dit.models.activation_checkpointing import selective_checkpointing_func
from dit.models.base import compile_repeated_blocks
from dit.models.controlnet import block_controls
from tests.tiny import FORWARD_VARIANTS, SIGMA, diffusers_and_ours, randomize_, variant_inputs, variant_model

MODES = ("none", "full", "selective")
MATMULS = ("mm", "addmm", "bmm", "baddbmm")


class OpCounter(TorchDispatchMode):
    """Counts the aten ops that run (by overload packet name)."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def count(self, *names: str) -> int:
        return sum(self.ops[name] for name in names)


class LiveOutputs(TorchDispatchMode):
    """Weak references to the storage of every op output: :meth:`live_bytes` is what is still held (by autograd's
    saved tensors, selective checkpointing's cache, or the caller)."""

    def __init__(self):
        super().__init__()
        self.refs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self.refs.append((StorageWeakRef(storage), storage.data_ptr(), storage.nbytes()))
        return out

    def live_bytes(self) -> int:
        return sum({ptr: n for ref, ptr, n in self.refs if not ref.expired()}.values())


def _checkpointed(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    if mode != "none":
        model.enable_gradient_checkpointing(selective=mode == "selective")
    return model


def _model(name: str, mode: str, **overrides) -> torch.nn.Module:
    """Variant ``name`` (or the Σ model with ``overrides``), random weights (the same for every mode), training."""
    torch.manual_seed(0)
    model = variant_model(name) if not overrides else PixArtTransformer(**SIGMA, **overrides)
    return _checkpointed(randomize_(model, std=0.05).train(), mode)


def _loss_and_grads(model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = model(**inputs).sample.square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(result, expected) -> None:
    (loss, grads), (expected_loss, expected_grads) = result, expected
    assert torch.equal(loss, expected_loss)
    assert grads.keys() == expected_grads.keys()
    assert any(g.abs().sum() > 0 for g in expected_grads.values())
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=1e-7, msg=name)


@pytest.mark.parametrize("name", FORWARD_VARIANTS)
def test_selective_gives_the_loss_and_gradients_of_no_and_full_checkpointing(name):
    results = {}
    for mode in MODES:
        model = _model(name, mode)
        results[mode] = _loss_and_grads(model, variant_inputs(name))
    _assert_same(results["selective"], results["none"])
    _assert_same(results["full"], results["none"])


@pytest.mark.parametrize("name", FORWARD_VARIANTS)
def test_selective_keeps_matmuls_and_attention_and_recomputes_the_cheap_ops(name):
    """In backward, selective checkpointing runs the matmuls of no checkpointing (none rerun) and no attention
    forward, but reruns the norms and modulation as full checkpointing does; it holds activation memory between
    full checkpointing's and no checkpointing's."""
    backward, memory = {}, {}
    for mode in MODES:
        model = _model(name, mode)
        live, ops = LiveOutputs(), OpCounter()
        with live:
            loss = model(**variant_inputs(name)).sample.square().mean()
        memory[mode] = live.live_bytes()
        with ops:
            loss.backward()
        backward[mode] = ops
    none, full, selective = (backward[mode] for mode in MODES)
    assert selective.count(*MATMULS) == none.count(*MATMULS) < full.count(*MATMULS)
    attention = [op for op in full.ops if op.startswith("_scaled_dot_product") and not op.endswith("_backward")]
    assert attention and selective.count(*attention) == none.count(*attention) == 0
    for cheap in ("native_layer_norm", "addcmul"):
        assert selective.count(cheap) == full.count(cheap) > none.count(cheap) == 0, cheap
    assert memory["full"] < memory["selective"] < memory["none"], memory


def test_dropout_is_recomputed_with_the_same_masks():
    """Random ops are recomputed under the restored RNG state: with dropout, the same loss and gradients."""
    results = {}
    for mode in ("none", "selective"):
        model = _model("sigma-mask", mode, dropout=0.3)
        torch.manual_seed(5)
        ops = OpCounter()
        loss = model(**variant_inputs("sigma-mask")).sample.square().mean()
        with ops:
            loss.backward()
        results[mode] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
        assert (ops.count("bernoulli_", "native_dropout") > 0) == (mode == "selective")
    _assert_same(results["selective"], results["none"])
    with torch.no_grad():
        assert not torch.equal(model.eval()(**variant_inputs("sigma-mask")).sample.square().mean(), results["none"][0])


def test_controlnet_adapter_selective_checkpointing():
    results, matmuls = {}, {}
    for mode in MODES:
        base = _model("sigma-mask", mode)
        torch.manual_seed(3)
        adapter = _checkpointed(randomize_(ControlNetAdapter.from_transformer(base, num_blocks=1), std=0.05), mode)
        inputs = variant_inputs("sigma-mask")
        cond = torch.randn_like(inputs["hidden_states"])
        loss = base(**inputs, block_controls=block_controls(base, adapter, cond, 1.0)).sample.square().mean()
        ops = OpCounter()
        with ops:
            loss.backward()
        results[mode] = (loss.detach(), {n: p.grad for n, p in adapter.named_parameters()})
        matmuls[mode] = ops.count(*MATMULS)
    _assert_same(results["selective"], results["none"])
    _assert_same(results["full"], results["none"])
    assert matmuls["selective"] == matmuls["none"] < matmuls["full"]


def test_any_diffusers_model_takes_the_selective_function():
    reference, _ = diffusers_and_ours(SIGMA)
    reference.train()
    inputs = variant_inputs("sigma-mask")

    def run():
        reference.zero_grad()
        return _loss_and_grads(reference, inputs)

    plain = run()
    reference.enable_gradient_checkpointing(selective_checkpointing_func)
    _assert_same(run(), plain)


def test_enable_gradient_checkpointing_keeps_diffusers_default_and_refuses_two_functions():
    model = variant_model("sigma-mask")
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing and model._gradient_checkpointing_func is not selective_checkpointing_func
    model.enable_gradient_checkpointing(selective=True)
    assert model._gradient_checkpointing_func is selective_checkpointing_func
    model.disable_gradient_checkpointing()
    assert not model.gradient_checkpointing
    with pytest.raises(ValueError, match="gradient_checkpointing_func or selective"):
        model.enable_gradient_checkpointing(selective_checkpointing_func, selective=True)


class CountingBackend:
    """``aot_eager`` that counts compilations and calls of the forward and backward graphs."""

    def __init__(self):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        self.compiled, self.calls = Counter(), Counter()

        def compiler(kind):
            def compile_graph(graph, example_inputs):
                self.compiled[kind] += 1

                def run(*args):
                    self.calls[kind] += 1
                    return graph(*args)

                return make_boxed_func(run)

            return compile_graph

        self.backend = aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward"))


def test_regionally_compiled_blocks_checkpoint_inside_one_shared_graph():
    """With compile_repeated_blocks, the checkpoint runs inside one compiled function shared by every block, so the
    compiler plans the recompute from the policy: no matmul is rerun, the gradients are those of no checkpointing."""
    torch._dynamo.reset()
    inputs = variant_inputs("sigma-mask")
    plain = _model("sigma-mask", "none")
    plain_loss, plain_ops = plain(**inputs).sample.square().mean(), OpCounter()
    with plain_ops:
        plain_loss.backward()
    expected = (plain_loss.detach(), {n: p.grad for n, p in plain.named_parameters() if p.grad is not None})
    model, counting = _model("sigma-mask", "selective"), CountingBackend()
    compile_repeated_blocks(model, fullgraph=True, backend=counting.backend)
    loss = model(**inputs).sample.square().mean()
    ops = OpCounter()
    with ops:
        loss.backward()
    blocks = len(model.transformer_blocks)
    assert counting.compiled == {"forward": 1, "backward": 1}  # one graph for all blocks
    assert counting.calls == {"forward": blocks, "backward": blocks}
    assert ops.count(*MATMULS) == plain_ops.count(*MATMULS)  # the backward of no checkpointing: nothing rerun
    assert ops.count("native_layer_norm") > plain_ops.count("native_layer_norm") == 0  # the norms are
    actual = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert torch.equal(actual[0], expected[0])
    for name, grad in expected[1].items():
        torch.testing.assert_close(actual[1][name], grad, rtol=1e-6, atol=1e-7, msg=name)
    torch._dynamo.reset()


def test_a_block_compiled_on_its_own_is_refused():
    """Compiled without compile_repeated_blocks, its options are unknown: the checkpoint cannot be put inside."""
    model = _model("sigma-mask", "selective")
    for block in model.transformer_blocks:
        block.compile(backend="aot_eager")
    with pytest.raises(RuntimeError, match="compiled on its own.*compile_repeated_blocks"):
        model(**variant_inputs("sigma-mask"))

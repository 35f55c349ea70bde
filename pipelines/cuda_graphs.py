"""Sampling under CUDA graphs: the denoiser call of each static shape captured once, replayed at every step.

``pipe.enable_cuda_graphs()`` (``dit generate --cuda-graphs``) on any pipeline of the toolkit captures the
transformer's forward (a ControlNet's adapters included) into a CUDA graph per input signature and replays it at
every step, so a step costs the GPU's time and no longer the host's (a few hundred Python ops per block)::

    pipe = TextToImagePipeline.from_pretrained(folder, dtype=torch.bfloat16).to("cuda")
    pipe.enable_cuda_graphs()
    image = pipe(prompt).images[0]  # the first call of a size captures (a warm-up call, then the capture)

A graph is keyed by everything that changes the captured program: the shape, dtype and device of every tensor input
(batch, latent height and width, text length, which the pipelines round up to multiples of 64 tokens, the CFG batch),
every non-tensor input (a LoRA ``cross_attention_kwargs={"scale": s}``, an embedded guidance scale, the ControlNet
adapters active at the step and their scales) and the denoiser's weights (where each lives, its LoRA adapters and
their scales, read once per call): a new key captures, the same key replays. At most ``max_graphs`` graphs are kept
(least recently used dropped first). Inputs are copied into static buffers before each replay, and the output
copied out of the graph's static buffer; nothing in the step loop reads device memory on the host.

Where a graph cannot be captured the call runs eagerly, with one warning per pipeline and reason: not on a CUDA
device; model CPU offload or any accelerate / diffusers offload hook (they move weights on the host at every call);
a diffusers step cache (``transformer.enable_cache(...)``: it decides on the host which blocks run at each step);
other diffusers hooks or torch forward hooks on the denoiser (they would run at capture only). A forward that reads
the host (``.item()``, a CPU tensor) cannot be captured: that is a ``RuntimeError`` naming it.

Tests swap the capture backend: :class:`EagerReplayBackend` "captures" by recording the call and its static buffers
and "replays" by calling it on them, so the bookkeeping runs on the CPU.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from diffusers.utils import logging
from torch.utils._pytree import tree_flatten, tree_unflatten

logger = logging.get_logger(__name__)

#: Graphs kept per pipeline by default (least recently used dropped first).
MAX_GRAPHS = 8
#: diffusers hooks that only cast weights on the device, which a graph captures as it does any op.
CAPTURABLE_HOOKS = ("layerwise_casting", "peft_autocast_disable")


# ----- capture backends ------------------------------------------------------------------------------------------
class _GraphCall:
    """A captured CUDA graph and its static output."""

    def __init__(self, graph: torch.cuda.CUDAGraph, output: torch.Tensor):
        self.graph, self.output = graph, output

    def replay(self) -> None:
        self.graph.replay()


class CUDAGraphBackend:
    """Capture with ``torch.cuda.CUDAGraph``: ``warmup`` calls on a side stream (lazy initialisation, Triton
    autotuning and compilation happen there), then the capture. The graphs of one backend share a memory pool: their
    outputs are copied out right after each replay, so one graph's intermediates may reuse another's."""

    def __init__(self, warmup: int = 1):
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (CUDA graph capture needs a warm-up call), got {warmup}.")
        self.warmup = warmup
        self._pools: dict[torch.device, tuple] = {}

    def unsupported(self, device: torch.device) -> str | None:
        """Why graphs cannot be captured on ``device`` (None: they can)."""
        if device.type != "cuda":
            return f"the transformer is on {device.type}, and CUDA graphs need a CUDA device"
        return None

    def capture(self, fn: Callable[[], torch.Tensor], device: torch.device) -> _GraphCall:
        """Warm ``fn`` up on a side stream, then capture it; the graph has not run yet (replay it)."""
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                fn()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if device not in self._pools:
            self._pools[device] = torch.cuda.graph_pool_handle()
        pool = self._pools[device]
        with torch.cuda.graph(graph, pool=pool):
            output = fn()
        return _GraphCall(graph, output)


class _RecordedCall:
    """A recorded call: replaying calls it again (on the static buffers it closes over) into the static output."""

    def __init__(self, fn: Callable[[], torch.Tensor], backend: EagerReplayBackend):
        self.fn, self.backend = fn, backend
        self.output = torch.empty_like(fn())

    def replay(self) -> None:
        self.backend.replays += 1
        self.output.copy_(self.fn())


class EagerReplayBackend:
    """A stand-in for :class:`CUDAGraphBackend` on any device (tests, debugging): "captures" by recording the call
    and its static buffers, "replays" by calling it on those buffers and copying into a static output. Counts
    ``captures`` and ``replays``."""

    def __init__(self):
        self.captures = 0
        self.replays = 0

    def unsupported(self, device: torch.device) -> str | None:
        return None

    def capture(self, fn: Callable[[], torch.Tensor], device: torch.device) -> _RecordedCall:
        self.captures += 1
        return _RecordedCall(fn, self)


# ----- the graphs of one pipeline --------------------------------------------------------------------------------
@dataclass
class _Entry:
    inputs: list[torch.Tensor]  # static input buffers, in the order of the call's tensor leaves
    call: _GraphCall | _RecordedCall


@dataclass
class DenoiserGraphs:
    """The captured denoiser calls of one pipeline, by key, at most ``max_graphs`` (least recently used dropped).

    ``graphs(fn, kwargs)`` returns ``fn(**kwargs)``: the tensors anywhere in ``kwargs`` (nested dicts, lists) are
    copied into the static buffers of the graph for this key, which is replayed (captured first on a new key); every
    non-tensor value of ``kwargs`` is part of the key, so everything else ``fn`` reads must be fixed while the
    graph lives (:meth:`start_call` clears the graphs when the weights moved).
    """

    backend: CUDAGraphBackend | EagerReplayBackend = field(default_factory=CUDAGraphBackend)
    max_graphs: int = MAX_GRAPHS
    graphs: OrderedDict = field(default_factory=OrderedDict)
    weights: tuple | None = None

    def __post_init__(self):
        if not isinstance(self.max_graphs, int) or self.max_graphs < 1:
            raise ValueError(f"max_graphs must be an int >= 1, got {self.max_graphs!r}.")

    def start_call(self, modules: list[torch.nn.Module]) -> None:
        """Before a sampling call: drop every graph if the denoiser's weights moved or its LoRA state changed."""
        weights = weights_signature(modules)
        if weights != self.weights:
            self.clear()
            self.weights = weights

    def clear(self) -> None:
        """Drop every graph (and the memory it holds)."""
        self.graphs.clear()

    def __call__(self, fn: Callable[..., torch.Tensor], kwargs: dict) -> torch.Tensor:
        leaves, spec = tree_flatten(kwargs)
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        if not tensors:
            raise ValueError("A denoiser call under CUDA graphs needs at least one tensor input.")
        constants = tuple(None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves)
        shapes = tuple((t.shape, t.dtype, t.device) for t in tensors)
        key = (spec, constants, shapes)
        try:
            entry = self.graphs.get(key)
        except TypeError:
            value = next(c for c in constants if not _hashable(c))
            raise TypeError(
                f"The denoiser input {value!r} ({type(value).__name__}) cannot key a CUDA graph: pass tensors, numbers "
                "or strings (e.g. in cross_attention_kwargs), or call pipe.disable_cuda_graphs()."
            ) from None
        if entry is None:
            entry = self._capture(fn, leaves, spec, tensors)
            self.graphs[key] = entry
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        for static, tensor in zip(entry.inputs, tensors):
            static.copy_(tensor)
        entry.call.replay()
        return entry.call.output.clone()  # the static output is overwritten by the next replay

    def _capture(self, fn, leaves: list, spec, tensors: list[torch.Tensor]) -> _Entry:
        """Static buffers holding this call's inputs, and ``fn`` captured on them."""
        static = [tensor.detach().clone() for tensor in tensors]  # an expanded tensor becomes contiguous
        buffers = iter(static)
        kwargs = tree_unflatten([next(buffers) if isinstance(x, torch.Tensor) else x for x in leaves], spec)
        try:
            call = self.backend.capture(lambda: fn(**kwargs), tensors[0].device)
        except RuntimeError as error:
            raise RuntimeError(
                f"Capturing the denoiser into a CUDA graph failed: {error}. Something in its forward reads the host "
                "(.item(), a CPU tensor, a data-dependent shape); call pipe.disable_cuda_graphs() to sample eagerly."
            ) from error
        return _Entry(static, call)


def _hashable(value) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def weights_signature(modules: list[torch.nn.Module]) -> tuple:
    """Where every parameter and buffer of ``modules`` lives (address, dtype) and the state of each LoRA layer
    (active adapters, scaling, merged, disabled): a captured graph reads exactly these."""
    places, lora = [], []
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            places.append((tensor.data_ptr(), tensor.dtype))
        for layer in module.modules():
            if hasattr(layer, "merged_adapters") and hasattr(layer, "scaling"):  # peft's LoRA layers
                scaling = tuple(sorted(layer.scaling.items()))
                lora.append(
                    (tuple(layer.active_adapters), scaling, tuple(layer.merged_adapters), layer.disable_adapters)
                )
    return tuple(places), tuple(lora)


def capture_blocker(modules: list[torch.nn.Module]) -> str | None:
    """Why the denoiser ``modules`` cannot run under a CUDA graph (None: they can): offload hooks, a step cache,
    other diffusers hooks, or torch forward hooks, which would run only when a graph is captured."""
    for module in modules:
        for name, layer in module.named_modules():
            where = f"{type(module).__name__}{'.' + name if name else ''}"
            if getattr(layer, "_hf_hook", None) is not None:
                return (f"{where} has an accelerate hook (model CPU offload, e.g. enable_model_cpu_offload or the "
                        "low-memory preset, or a device_map), which moves weights on the host at every call")  # fmt: skip
            if getattr(layer, "_cache_config", None) is not None:
                return (f"{where} has the step cache {type(layer._cache_config).__name__} (enable_cache), which "
                        "decides on the host at every step which blocks run; call disable_cache() to use graphs")  # fmt: skip
            registry = getattr(layer, "_diffusers_hook", None)
            hooks = [h for h in getattr(registry, "hooks", {}) if h not in CAPTURABLE_HOOKS]
            if hooks:
                return f"{where} has the diffusers hooks {hooks} (offloading, caching), which run on the host"
            if layer._forward_pre_hooks or layer._forward_hooks:
                return f"{where} has torch forward hooks, which would run only when a graph is captured"
    return None


# ----- the pipeline side -----------------------------------------------------------------------------------------
class CUDAGraphsMixin:
    """:meth:`enable_cuda_graphs` / :meth:`disable_cuda_graphs` for a pipeline whose steps call the transformer
    through :meth:`call_transformer` inside :meth:`cuda_graphs_session` (:class:`~.sampling.LatentSamplingMixin`)."""

    _cuda_graphs: DenoiserGraphs | None = None
    _graphs_now: DenoiserGraphs | None = None  # the graphs of the running call (None: eager)

    def enable_cuda_graphs(self, max_graphs: int = MAX_GRAPHS, backend=None):
        """Sample with the denoiser call captured into a CUDA graph per input signature and replayed at every step
        (:mod:`dit.pipelines.cuda_graphs`). ``max_graphs``: graphs kept (least recently used dropped first);
        ``backend``: the capture backend (:class:`CUDAGraphBackend`, or :class:`EagerReplayBackend` for tests).
        Where graphs cannot be captured, calls run eagerly with one warning per reason: a device other than CUDA,
        model CPU offload (the low-memory preset's included) or any offload hook, a diffusers step cache
        (``transformer.enable_cache``), other diffusers hooks or torch forward hooks on the transformer. LoRA scales
        (``cross_attention_kwargs``), an embedded guidance scale and ControlNet adapters each capture their own
        graphs; changing LoRA adapters or moving the weights drops the graphs at the next call. Returns the
        pipeline."""
        if getattr(self, "_whole_compile_mode", None) == "reduce-overhead":
            raise ValueError("The transformer was compiled whole with mode='reduce-overhead', which captures CUDA "
                             "graphs of its own: sample with those, or compile with another mode.")  # fmt: skip
        self._cuda_graphs = DenoiserGraphs(backend or CUDAGraphBackend(), max_graphs)
        self._graph_warnings = set()
        return self

    def disable_cuda_graphs(self):
        """Sample eagerly again and free the captured graphs. Returns the pipeline."""
        if self._cuda_graphs is not None:
            self._cuda_graphs.clear()
        self._cuda_graphs = None
        return self

    @property
    def cuda_graphs(self) -> DenoiserGraphs | None:
        """The pipeline's captured graphs (None: CUDA graphs are off)."""
        return self._cuda_graphs

    def denoiser_modules(self) -> list[torch.nn.Module]:
        """The modules a denoiser call runs: the transformer (and a ControlNet's adapters)."""
        controlnet = getattr(self, "controlnet", None)
        return [self.transformer] + ([controlnet] if controlnet is not None else [])

    @contextlib.contextmanager
    def cuda_graphs_session(self) -> Iterator[None]:
        """One sampling call: its denoiser calls replay graphs when CUDA graphs are on and can be captured; else
        they run eagerly (with one warning per pipeline and reason)."""
        graphs = self._cuda_graphs
        if graphs is not None:
            modules = self.denoiser_modules()
            reason = capture_blocker(modules) or graphs.backend.unsupported(self.transformer.device)
            if reason is None:
                graphs.start_call(modules)
            else:
                self._warn_eager(reason)
                graphs = None
        self._graphs_now = graphs
        try:
            yield
        finally:
            self._graphs_now = None

    def _warn_eager(self, reason: str) -> None:
        if reason not in self._graph_warnings:
            self._graph_warnings.add(reason)
            logger.warning(
                "CUDA graphs are enabled, but %s runs its denoiser eagerly: %s.", type(self).__name__, reason
            )

    def call_transformer(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        """``self.transformer(hidden_states, **kwargs, return_dict=False)[0]`` for one step, replayed from a CUDA
        graph in a session with graphs (:meth:`cuda_graphs_session`). :meth:`denoiser_inputs` runs first, on the
        host."""
        kwargs = self.denoiser_inputs({"hidden_states": hidden_states, **kwargs})
        graphs = self._graphs_now
        return self.denoiser_forward(**kwargs) if graphs is None else graphs(self.denoiser_forward, kwargs)

    def denoiser_inputs(self, kwargs: dict) -> dict:
        """The inputs of this step's :meth:`denoiser_forward` (a subclass adds its own, e.g. ControlNet's): run at
        every step outside the graph; non-tensor values are part of the graph's key."""
        return kwargs

    def denoiser_forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        """The captured program: the transformer's output for the latents ``hidden_states`` and ``kwargs``."""
        return self.transformer(hidden_states, **kwargs, return_dict=False)[0]

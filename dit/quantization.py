"""Quantized weights for every backbone and pipeline of the toolkit, through diffusers' and transformers' own
quantization configs (torchao, optimum-quanto, bitsandbytes).

A scheme is named once, by backend and scheme, and becomes the config class of the library that loads each
component (diffusers' for the transformer, ControlNet and VAE; transformers' for the text encoder), which
diffusers' ``PipelineQuantizationConfig(quant_backend=..., quant_kwargs=...)`` cannot do for torchao and quanto
(their two config classes take different arguments)::

    from dit.pipelines import TextToImagePipeline
    from dit.quantization import quantization_config

    pipe = TextToImagePipeline.from_pretrained(
        folder, quantization_config=quantization_config("int8_weight_only"), torch_dtype=torch.bfloat16
    )

One model: ``PixArtTransformer.from_pretrained(folder, quantization_config=model_quantization_config(...))``.
A loaded model: :func:`quantize_`. ``save_pretrained`` writes quantized safetensors folders for torchao (every
component) and quanto (the toolkit's and diffusers' models; transformers refuses to save a quanto text encoder); the
config is recorded in each component's ``config.json``, so ``from_pretrained`` reads them back quantized.
bitsandbytes 8/4-bit loads on CUDA only. Every mistake is a named error before any weight loads
(:func:`check_scheme`): an unknown backend or scheme, a backend that is not installed, bitsandbytes or
``float8_dynamic`` without the hardware, a component the folder does not have.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

import torch

#: backend -> scheme -> what it does. ``pip install 'dit-toolkit[quantization]'`` installs torchao and quanto;
#: ``[bitsandbytes]`` bitsandbytes (CUDA).
SCHEMES: dict[str, dict[str, str]] = {
    "torchao": {
        "int8_weight_only": "int8 weights, activations in the model's dtype (CPU and CUDA)",
        "int8_dynamic": "int8 weights and per-token int8 activations (CPU and CUDA)",
        "float8_weight_only": "float8 (e4m3) weights (CPU and CUDA)",
        "float8_dynamic": "float8 weights and activations (CUDA with compute capability >= 8.9: Ada, Hopper)",
    },
    "quanto": {
        "int8_weight_only": "int8 weights (CPU and CUDA)",
        "float8_weight_only": "float8 weights (CPU and CUDA)",
        "int4_weight_only": "int4 weights (CPU and CUDA; coarser: ~10x the int8 error)",
    },
    "bitsandbytes": {
        "int8": "LLM.int8() weights, as PixArt-delta loads T5 (CUDA only)",
        "nf4": "4-bit NormalFloat weights, bf16 compute (CUDA only)",
    },
}
#: The Python package each backend needs.
PACKAGES = {"torchao": "torchao", "quanto": "optimum.quanto", "bitsandbytes": "bitsandbytes"}
#: The extra of this package that installs each backend.
EXTRAS = {"torchao": "quantization", "quanto": "quantization", "bitsandbytes": "bitsandbytes"}
#: Pipeline components loaded by transformers (the others by diffusers or this toolkit).
TRANSFORMERS_COMPONENTS = ("text_encoder",)
#: What ``quantization_config`` quantizes by default: the two large models.
DEFAULT_COMPONENTS = ("transformer", "text_encoder")


def check_scheme(scheme: str, backend: str = "torchao") -> None:
    """Raise a named error unless ``backend`` offers ``scheme`` here: a ``ValueError`` for an unknown name or missing
    hardware (bitsandbytes and ``float8_dynamic`` need CUDA), an ``ImportError`` naming the extra to install."""
    if backend not in SCHEMES:
        raise ValueError(f"Unknown quantization backend {backend!r}: use one of {sorted(SCHEMES)}.")
    if scheme not in SCHEMES[backend]:
        others = [name for name, schemes in SCHEMES.items() if scheme in schemes]
        hint = f" ({scheme!r} is a scheme of {others})" if others else ""
        raise ValueError(
            f"Unknown {backend} quantization scheme {scheme!r}{hint}: {backend} offers {sorted(SCHEMES[backend])}."
        )
    if not _installed(PACKAGES[backend]):
        raise ImportError(
            f"Quantization with {backend} needs the {PACKAGES[backend]} package: "
            f"pip install 'dit-toolkit[{EXTRAS[backend]}]'."
        )
    if backend == "bitsandbytes" and not torch.cuda.is_available():
        raise ValueError(
            f"bitsandbytes {scheme} quantizes on a CUDA GPU only, and none is available: on the CPU use "
            "quantization_config('int8_weight_only') (torchao) or backend='quanto'."
        )
    if scheme == "float8_dynamic" and not _has_float8_matmul():
        raise ValueError(
            "torchao float8_dynamic needs a CUDA GPU with compute capability >= 8.9 (Ada, Hopper), which this "
            "machine lacks: use 'float8_weight_only' or 'int8_dynamic'."
        )


def model_quantization_config(
    scheme: str = "int8_weight_only", backend: str = "torchao", *, library: str = "diffusers"
):
    """The ``quantization_config`` of one model's ``from_pretrained`` for ``scheme`` of ``backend``: diffusers'
    config class (``library="diffusers"``: the toolkit's models, VAE, ControlNet) or transformers' (the text
    encoder)."""
    check_scheme(scheme, backend)
    if library not in ("diffusers", "transformers"):
        raise ValueError(f"library must be 'diffusers' or 'transformers', got {library!r}.")
    module = importlib.import_module(library)
    if backend == "torchao":
        return module.TorchAoConfig(_torchao_config(scheme))
    if backend == "quanto":
        weights = scheme.removesuffix("_weight_only")
        return module.QuantoConfig(weights_dtype=weights) if library == "diffusers" else module.QuantoConfig(weights)
    if scheme == "int8":
        return module.BitsAndBytesConfig(load_in_8bit=True)
    return module.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )


def quantization_config(
    scheme: str = "int8_weight_only", components: Iterable[str] = DEFAULT_COMPONENTS, backend: str = "torchao"
):
    """diffusers' ``PipelineQuantizationConfig`` quantizing ``components`` with ``scheme`` of ``backend``, each with
    the config class of the library that loads it (transformers' for ``text_encoder``). Pass it as a pipeline's
    ``from_pretrained(..., quantization_config=...)``; schemes in :data:`SCHEMES`."""
    from diffusers import PipelineQuantizationConfig

    components = [components] if isinstance(components, str) else list(components)
    if not components:
        raise ValueError("quantization_config needs at least one component to quantize (e.g. 'transformer').")
    mapping = {
        name: model_quantization_config(
            scheme, backend, library="transformers" if name in TRANSFORMERS_COMPONENTS else "diffusers"
        )
        for name in components
    }
    return PipelineQuantizationConfig(quant_mapping=mapping)


def component_quantization(config, name: str, is_diffusers: bool):
    """The ``quantization_config`` a pipeline's ``from_pretrained`` gives component ``name`` (as diffusers resolves
    a ``PipelineQuantizationConfig`` for the components it loads itself); None to load it unquantized."""
    from diffusers import PipelineQuantizationConfig

    if not isinstance(config, PipelineQuantizationConfig):
        return None
    return config._resolve_quant_config(is_diffusers=is_diffusers, module_name=name)


def check_components(config, components: Iterable[str]) -> None:
    """A ``PipelineQuantizationConfig`` that names a component the pipeline does not have is an error naming it
    (diffusers would load every component unquantized without a word)."""
    named = set(getattr(config, "quant_mapping", None) or {}) | set(
        getattr(config, "components_to_quantize", None) or ()
    )
    unknown = sorted(named - set(components))
    if unknown:
        raise ValueError(
            f"The quantization config names {unknown}, which this pipeline does not have: its components are "
            f"{sorted(components)}."
        )


def quantize_(model: torch.nn.Module, scheme: str = "int8_weight_only", backend: str = "torchao") -> torch.nn.Module:
    """Quantize the linear layers of a loaded ``model`` in place with ``scheme`` of ``backend`` (torchao or quanto;
    bitsandbytes quantizes at load time only) and return it. A model that is already quantized is left as it is."""
    check_scheme(scheme, backend)
    if is_quantized(model):
        return model
    if backend == "torchao":
        from torchao.quantization import quantize_ as torchao_quantize_

        torchao_quantize_(model, _torchao_config(scheme))
    elif backend == "quanto":
        from optimum import quanto

        quanto.quantize(model, weights=getattr(quanto, "q" + scheme.removesuffix("_weight_only")))
        quanto.freeze(model)
        check_quantized(model)
    else:
        raise ValueError("bitsandbytes quantizes at load time only: pass quantization_config(...) to from_pretrained.")
    return model


def check_dtype(config, dtype: torch.dtype | None, name: str = "the model") -> None:
    """Raise a ``ValueError`` when ``dtype`` is one the quantization ``config`` (one model's) fails with at its first
    forward: torchao's float8 weight-only matmul takes bf16 or fp32 activations, not fp16 (a dtype mismatch deep in
    the first step otherwise)."""
    quant_type = getattr(config, "quant_type", None)
    if type(quant_type).__name__ == "Float8WeightOnlyConfig" and dtype == torch.float16:
        raise ValueError(
            f"torchao float8_weight_only computes in bfloat16 or float32, not float16: load {name} with "
            "torch_dtype=torch.bfloat16."
        )


def check_quantized(model: torch.nn.Module) -> torch.nn.Module:
    """Raise a ``ValueError`` naming the layers of a quanto-quantized ``model`` that would crash the process in a
    bf16 forward on the CPU: quanto sends int8 weights with bf16 activations to ``torch._weight_int8pack_mm``, which
    segfaults (torch 2.13) for an input width that is a multiple of 4 but not of 16 (24, 40, ...). Real checkpoints'
    widths (1152, 4096, ...) are multiples of 16. Returns ``model``."""
    bad = [name for name, module in model.named_modules() if _crashes_int8pack(module)]
    if bad:
        raise ValueError(
            f"quanto int8 would crash the CPU forward of {len(bad)} layer(s) whose input width is a multiple of 4 but "
            f"not of 16 ({', '.join(bad[:6])}{', ...' if len(bad) > 6 else ''}): torch._weight_int8pack_mm segfaults "
            "there. Use torchao (quantization_config('int8_weight_only')), keep them unquantized "
            "(QuantoConfig(..., modules_to_not_convert=[...])) or compute in float32."
        )
    return model


def _crashes_int8pack(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    if type(module).__name__ != "QLinear" or weight is None or weight.device.type != "cpu":
        return False
    qtype = getattr(getattr(weight, "qtype", None), "name", None)
    in_features = weight.shape[-1]
    return qtype == "qint8" and weight.dtype == torch.bfloat16 and in_features % 4 == 0 and in_features % 16 != 0


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds quantized weights (loaded with a quantization config, or by :func:`quantize_`)."""
    if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
        return True
    return any(type(p) is not torch.nn.Parameter and type(p) is not torch.Tensor for p in model.parameters())


def _installed(package: str) -> bool:
    """Whether ``package`` (dotted names too: ``optimum.quanto``) can be imported, without importing it."""
    parent, _, _ = package.rpartition(".")
    return (not parent or _installed(parent)) and importlib.util.find_spec(package) is not None


def _torchao_config(scheme: str):
    """torchao's config object for ``scheme`` (what diffusers' and transformers' ``TorchAoConfig`` take)."""
    from torchao import quantization as ao

    return {
        "int8_weight_only": ao.Int8WeightOnlyConfig,
        "int8_dynamic": ao.Int8DynamicActivationInt8WeightConfig,
        "float8_weight_only": ao.Float8WeightOnlyConfig,
        "float8_dynamic": ao.Float8DynamicActivationFloat8WeightConfig,
    }[scheme]()


def _has_float8_matmul() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)

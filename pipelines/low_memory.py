"""The low-memory preset: PixArt-delta's 8-bit inference recipe as one switch on every pipeline of the toolkit.

``Pipeline.from_pretrained(folder, low_memory=True)`` (or :meth:`LowMemoryMixin.enable_low_memory` on a loaded
pipeline, or ``dit generate --low-memory``) applies, in this order:

1. an 8-bit text encoder (torchao int8 weight-only: CPU and CUDA; ``LowMemoryConfig(text_encoder_backend=
   "bitsandbytes", text_encoder_scheme="int8")`` loads T5 exactly as PixArt-delta does, on CUDA);
2. encode, then offload the text encoder: with model CPU offload it leaves the accelerator when the transformer
   runs (on a CPU-only machine everything already lives in host memory and offload does nothing);
3. a half-precision transformer (and VAE, ControlNet): bf16 by default;
4. model CPU offload (diffusers' ``enable_model_cpu_offload``) where an accelerator is available;
5. VAE tiling for images with a side above ``vae_tile_above`` px (smaller images decode as before).

Loading with ``low_memory=True`` quantizes and casts while loading, so the full-precision weights are never all
in memory at once; :meth:`enable_low_memory` converts a pipeline that is already loaded.

Output: the preset's images stay within ``0.02`` mean absolute difference (pixels in [0, 1]) of the same
pipeline in bf16 without it, on the shipped MicroShapes model (``tests/pipelines/test_low_memory.py``); its
MicroShapes score and peak memory are in ``bench/results/low_memory_cpu.json`` (``bench/low_memory.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from diffusers.utils import logging

from ..quantization import check_scheme, is_quantized, quantization_config, quantize_

logger = logging.get_logger(__name__)

#: Images in [0, 1]: the largest mean absolute difference the preset may make against the bf16 pipeline.
OUTPUT_TOLERANCE = 0.02


@dataclass(frozen=True)
class LowMemoryConfig:
    """What the low-memory preset does (the defaults are the PixArt-delta recipe).

    Args:
        text_encoder_scheme: quantization scheme of the text encoder (:data:`~dit.quantization.SCHEMES`);
            None keeps its weights as loaded.
        text_encoder_backend: ``"torchao"`` (default, CPU and CUDA), ``"quanto"`` or ``"bitsandbytes"`` (CUDA).
        dtype: the half precision of the transformer, VAE and any ControlNet (``torch.bfloat16`` or
            ``torch.float16``); the text encoder computes in bf16 (T5 overflows in fp16).
        offload: model CPU offload where an accelerator is available.
        device: the accelerator that offload moves each model to (None: diffusers' choice, ``cuda`` first).
        vae_tile_above: the VAE decodes in tiles of this many pixels an image with a side above it; None: never.
    """

    text_encoder_scheme: str | None = "int8_weight_only"
    text_encoder_backend: str = "torchao"
    dtype: torch.dtype = torch.bfloat16
    offload: bool = True
    device: str | torch.device | None = None
    vae_tile_above: int | None = 1024

    def __post_init__(self):
        if self.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"The low-memory preset runs in half precision: dtype must be bfloat16 or float16, got "
                             f"{self.dtype}.")  # fmt: skip
        if self.vae_tile_above is not None and (not isinstance(self.vae_tile_above, int) or self.vae_tile_above < 8):
            raise ValueError(f"vae_tile_above must be None or an int >= 8 (pixels), got {self.vae_tile_above!r}.")
        if self.text_encoder_scheme is not None:
            check_scheme(self.text_encoder_scheme, self.text_encoder_backend)


def low_memory_config(low_memory: bool | LowMemoryConfig | dict | None, **overrides) -> LowMemoryConfig | None:
    """The preset ``low_memory`` asks for: None for False/None, the defaults for True, a dict's fields, or the
    config itself; ``overrides`` replace fields (an unknown name is an error naming the fields)."""
    if low_memory is None or low_memory is False:
        return None
    if low_memory is True:
        config = LowMemoryConfig()
    elif isinstance(low_memory, dict):
        config = _checked(LowMemoryConfig, low_memory)
    elif isinstance(low_memory, LowMemoryConfig):
        config = low_memory
    else:
        raise TypeError(f"low_memory must be a bool, a LowMemoryConfig or a dict of its fields, got "
                        f"{type(low_memory).__name__}.")  # fmt: skip
    return replace(config, **_checked(LowMemoryConfig, overrides, build=False)) if overrides else config


def _checked(cls, values: dict, build: bool = True):
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"Unknown low-memory option(s) {unknown}: {cls.__name__} takes {sorted(names)}.")
    return cls(**values) if build else values


def low_memory_load_kwargs(config: LowMemoryConfig, kwargs: dict, components: list[str]) -> dict:
    """``from_pretrained`` keyword arguments that load the pipeline as the preset runs it: the text encoder
    quantized and every component in half precision (the text encoder in bf16). What ``kwargs`` already sets
    (``quantization_config``, ``torch_dtype``/``dtype``) is kept."""
    kwargs = dict(kwargs)
    quantize = config.text_encoder_scheme is not None and "text_encoder" in components
    if quantize and kwargs.get("quantization_config") is None and "text_encoder" not in kwargs:
        kwargs["quantization_config"] = quantization_config(
            config.text_encoder_scheme, ["text_encoder"], config.text_encoder_backend
        )
    if kwargs.get("dtype") is None and kwargs.get("torch_dtype") is None:
        kwargs["dtype"] = {"default": config.dtype, "text_encoder": torch.bfloat16}
    return kwargs


class LowMemoryMixin:
    """:meth:`enable_low_memory`, the preset of :mod:`dit.pipelines.low_memory`, for a ``DiffusionPipeline``."""

    #: The preset this pipeline runs with (None: none); set by :meth:`enable_low_memory`.
    low_memory_config: LowMemoryConfig | None = None

    def enable_low_memory(self, config: bool | LowMemoryConfig | dict = True, **overrides):
        """Run this pipeline with the low-memory preset (module docstring): 8-bit text encoder, half-precision
        transformer and VAE, model CPU offload where an accelerator is available, VAE tiling above a size.
        ``config``/``overrides``: :class:`LowMemoryConfig` fields. Returns the pipeline."""
        config = low_memory_config(config, **overrides) or LowMemoryConfig()
        text_encoder = getattr(self, "text_encoder", None)
        if text_encoder is not None and config.text_encoder_scheme is not None and not is_quantized(text_encoder):
            if config.text_encoder_backend == "bitsandbytes":
                raise ValueError("bitsandbytes quantizes the text encoder while loading only: load the pipeline "
                                 "with from_pretrained(..., low_memory=config).")  # fmt: skip
            quantize_(text_encoder.to(torch.bfloat16), config.text_encoder_scheme, config.text_encoder_backend)
        for name in ("transformer", "controlnet", "vae"):
            model = getattr(self, name, None)
            if model is not None and not is_quantized(model) and model.dtype != config.dtype:
                model.to(config.dtype)
        self._tile_vae(config.vae_tile_above)
        self._offload(config)
        self.low_memory_config = config
        return self

    def _tile_vae(self, above: int | None) -> None:
        """VAE tiling for images with a side above ``above`` px (tiles of that size, diffusers' overlap)."""
        vae = getattr(self, "vae", None)
        if vae is None or above is None or not hasattr(vae, "enable_tiling"):
            return
        vae.enable_tiling()
        vae.tile_sample_min_size = above
        vae.tile_latent_min_size = above // self.vae_scale_factor

    def _offload(self, config: LowMemoryConfig) -> None:
        """Model CPU offload onto the accelerator, or one line saying why not."""
        if not config.offload:
            return
        accelerator = config.device or _accelerator()
        if accelerator is None or torch.device(accelerator).type == "cpu":
            logger.info("Low-memory preset: no accelerator, so no model offload (the models stay in host memory).")
            return
        self.enable_model_cpu_offload(device=accelerator)


def _accelerator() -> str | None:
    """The accelerator model offload would use ("cuda", "xpu", ...), None without one."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        return accelerator.current_accelerator().type
    return "cuda" if torch.cuda.is_available() else None

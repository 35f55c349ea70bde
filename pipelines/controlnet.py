"""Text-to-image with ControlNet adapters (PixArt-δ): :class:`TextToImagePipeline` plus control images."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import PIL.Image
import torch
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from ..models.controlnet import ControlNetAdapter, MultiControlNetAdapter, adapter_list, block_controls
from .checks import check_image_side, check_prompt
from .text_to_image import TextToImagePipeline

ControlImage = PIL.Image.Image | np.ndarray | torch.Tensor | list


def control_tensor(image: ControlImage) -> torch.Tensor:
    """A control image (or a list of them) as a (B, 3, H, W) float tensor in [-1, 1].

    Accepts PIL images (any mode; converted to RGB), uint8 arrays (H, W), (H, W, 3) or (B, H, W, 3) with values
    0..255, and tensors (3, H, W) or (B, 3, H, W) already in [-1, 1].
    """
    if isinstance(image, list):
        return torch.cat([control_tensor(item) for item in image])
    if isinstance(image, torch.Tensor):
        tensor = image[None] if image.ndim == 3 else image
        if tensor.ndim != 4 or tensor.shape[1] != 3:
            raise ValueError(f"A control image tensor must be (3, H, W) or (B, 3, H, W), got {tuple(image.shape)}.")
        return tensor.float().contiguous()
    if isinstance(image, PIL.Image.Image):
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError("A control image must be a PIL image, a uint8 array or a tensor in [-1, 1].")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)  # (H, W, 3)
    array = image[None] if image.ndim == 3 else image  # (B, H, W, 3)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"A control image array must be (H, W), (H, W, 3) or (B, H, W, 3), got {image.shape}.")
    tensor = torch.from_numpy(array.copy()).permute(0, 3, 1, 2)  # (B, 3, H, W)
    return (tensor.float() / 127.5 - 1.0).contiguous()


CONTROL_POSTERIORS = ("mean", "sample")


def encode_control(
    vae, images: torch.Tensor, posterior: str = "mean", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Control images (B, 3, H, W) in [-1, 1] -> control latents (B, C, h, w): the VAE posterior mean, shifted and
    scaled as latents are (an identity pixel-space VAE gives the pixels themselves).

    ``posterior="sample"`` takes a posterior sample (drawn with ``generator``) instead of the mean, as PixArt-δ's
    original inference does (``vae.encode(hed).latent_dist.sample() * scale_factor``) and its training features
    (mean + std * noise) are.
    """
    if posterior not in CONTROL_POSTERIORS:
        raise ValueError(f"posterior must be one of {CONTROL_POSTERIORS}, got {posterior!r}.")
    config = vae.config
    dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
    latents = dist.mean if posterior == "mean" else dist.sample(generator)  # (B, C, h, w)
    if getattr(config, "shift_factor", None) is not None:
        latents = latents - config.shift_factor
    return latents * config.scaling_factor


def _in_window(step: int, total: int, start: float, end: float) -> bool:
    """Whether sampling step ``step`` of ``total`` lies in the guidance window (diffusers' ``controlnet_keep``)."""
    return not (step / total < start or (step + 1) / total > end)


def _per_adapter(value, count: int, name: str) -> list:
    """``value`` for each of ``count`` adapters: a list of that length, or one value for all."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{name} has {len(value)} entries for {count} ControlNet adapters.")
        return list(value)
    return [value] * count


def _check_control_counts(images: list[torch.Tensor], prompts: int) -> None:
    """Each adapter's control is one image (for every prompt) or one image per prompt; anything else is an error
    (two images for one prompt would otherwise control the CFG batch's two halves differently)."""
    for k, image in enumerate(images):
        if image.shape[0] not in (1, prompts):
            which = f"control_image[{k}]" if len(images) > 1 else "control_image"
            raise ValueError(
                f"{which} has {image.shape[0]} images; pass one, or one per prompt ({prompts} prompt"
                f"{'s' if prompts > 1 else ''} here), for each ControlNet adapter ({len(images)} here); with several "
                "adapters, control_image is a list with one entry per adapter."
            )


class ControlNetPipeline(TextToImagePipeline):
    """Text-to-image with one or several ControlNet adapters (:class:`~dit.models.controlnet.ControlNetAdapter`).

    Takes everything :class:`TextToImagePipeline` takes, plus ``control_image``, ``controlnet_conditioning_scale``
    and ``control_guidance_start`` / ``control_guidance_end`` (fractions of the sampling steps, as in diffusers'
    ControlNet pipelines). Control images are encoded by the VAE (posterior mean, or with ``control_posterior="sample"``
    a posterior sample as PixArt-δ's original inference, times its scaling factor) and enter
    the transformer through its own patch embedding. A scale of 0 (or a step outside the guidance window) runs the
    base model exactly as :class:`TextToImagePipeline` does.

    Args:
        tokenizer: tokenizer of the text encoder.
        text_encoder: a transformers ``T5EncoderModel``.
        vae: a diffusers ``AutoencoderKL`` (also encodes the control images).
        transformer: a backbone of this toolkit (its forward takes ``block_controls``).
        scheduler: any diffusers scheduler; None picks the one the transformer's config records it was trained for
            (:func:`~dit.pipelines.schedulers.default_scheduler`).
        controlnet: an adapter, a list of adapters (multi-control) or a ``MultiControlNetAdapter``.
    """

    # The adapters run inside the transformer's forward (never called on their own): with model CPU offload they stay
    # on the execution device, as diffusers keeps ControlNets that are called every step.
    _exclude_from_cpu_offload = ["controlnet"]

    def __init__(self, tokenizer, text_encoder, vae, transformer, scheduler, controlnet):
        if isinstance(controlnet, (list, tuple)):
            controlnet = MultiControlNetAdapter(controlnet) if len(controlnet) > 1 else controlnet[0]
        if not isinstance(controlnet, (ControlNetAdapter, MultiControlNetAdapter)):
            raise TypeError(f"controlnet must be a ControlNetAdapter or a list of them, got {type(controlnet)}.")
        super().__init__(tokenizer, text_encoder, vae, transformer, scheduler)
        for adapter in adapter_list(controlnet):
            adapter.check_compatible(transformer)
        self.register_modules(controlnet=controlnet)

    @property
    def adapters(self) -> list[ControlNetAdapter]:
        return adapter_list(self.controlnet)

    def encode_control(
        self, image: torch.Tensor, posterior: str = "mean", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Control pixels (B, 3, H, W) in [-1, 1] -> control latents (B, C, H/f, W/f), as the training features:
        the posterior mean, or a sample with ``posterior="sample"`` (see :func:`encode_control`)."""
        return encode_control(self.vae, image, posterior, generator)

    @torch.no_grad()
    def __call__(
        self,
        *args,
        control_image: ControlImage | Sequence[ControlImage] | None = None,
        controlnet_conditioning_scale: float | Sequence[float] = 1.0,
        control_guidance_start: float | Sequence[float] = 0.0,
        control_guidance_end: float | Sequence[float] = 1.0,
        control_posterior: str = "mean",
        **kwargs,
    ) -> ImagePipelineOutput | tuple:
        """Generate images for ``prompt`` that follow ``control_image``.

        Takes :meth:`TextToImagePipeline.__call__`'s arguments (diffusers' ``PixArtSigmaPipeline`` ones, in its
        positional order, then the toolkit's keyword-only ones) and these keyword-only ones:

        Args:
            control_image: the control for a single adapter (an image, or a list with one per prompt); with several
                adapters, a list with one such entry per adapter. Images must have the output size; with
                ``height`` / ``width`` unset, they set it.
            controlnet_conditioning_scale: residual scale, one for all adapters or one per adapter.
            control_guidance_start: fraction of the steps at which each adapter starts acting.
            control_guidance_end: fraction of the steps at which each adapter stops acting.
            control_posterior: ``mean`` encodes each control image as the VAE posterior mean; ``sample`` as a
                posterior sample drawn with ``generator`` (its first one, if a list), as PixArt-δ's original
                inference does (see :func:`encode_control`).
        """
        kwargs = _named_arguments(self, args, kwargs)
        prompt = kwargs.pop("prompt", None)
        if control_image is None:
            raise ValueError("ControlNetPipeline needs control_image (use TextToImagePipeline without control).")
        check_image_side("height", kwargs.get("height"))
        check_image_side("width", kwargs.get("width"))
        count = len(self.adapters)
        images = [control_image] if count == 1 else _per_adapter(control_image, count, "control_image")
        images = [control_tensor(image) for image in images]
        _check_control_counts(images, check_prompt(prompt, kwargs.get("prompt_embeds")))
        kwargs["height"], kwargs["width"] = self._output_size(images, kwargs.get("height"), kwargs.get("width"))
        scales = _per_adapter(controlnet_conditioning_scale, count, "controlnet_conditioning_scale")
        starts = _per_adapter(control_guidance_start, count, "control_guidance_start")
        ends = _per_adapter(control_guidance_end, count, "control_guidance_end")
        for start, end in zip(starts, ends):
            if not 0.0 <= start < end <= 1.0:
                raise ValueError(f"control_guidance_start={start} and _end={end} must satisfy 0 <= start < end <= 1.")
        windows = list(zip(starts, ends))
        if control_posterior not in CONTROL_POSTERIORS:
            raise ValueError(f"control_posterior must be one of {CONTROL_POSTERIORS}, got {control_posterior!r}.")
        generator = kwargs.get("generator")
        generator = generator[0] if isinstance(generator, (list, tuple)) else generator

        def encode(image: torch.Tensor) -> torch.Tensor:
            return self.encode_control(image, control_posterior, generator)

        with self._controls_installed(images, scales, windows, kwargs.get("num_images_per_prompt", 1), encode):
            return super().__call__(prompt, **kwargs)

    @staticmethod
    def _output_size(images: list[torch.Tensor], height: int | None, width: int | None) -> tuple[int, int]:
        """The requested size, or the control images' size; every control image must have it."""
        size = tuple(images[0].shape[-2:])
        height, width = size[0] if height is None else height, size[1] if width is None else width
        for image in images:
            if tuple(image.shape[-2:]) != (height, width):
                raise ValueError(
                    f"control_image is {image.shape[-1]}x{image.shape[-2]} (WxH); the image to generate is "
                    f"{width}x{height}. Pass control images of the output size (or leave height/width unset)."
                )
        return height, width

    @contextlib.contextmanager
    def _controls_installed(
        self,
        images: list[torch.Tensor],
        scales: list[float],
        windows: list[tuple[float, float]],
        per_prompt: int,
        encode: Callable[[torch.Tensor], torch.Tensor],
    ) -> Iterator[None]:
        """While sampling, every denoiser call (:meth:`denoiser_inputs`) gets the adapters active at that step, their
        scales and control latents."""
        state = {"step": 0, "latents": {}}

        def add_controls(kwargs: dict) -> dict:
            hidden = kwargs["hidden_states"]
            step, total = state["step"], max(1, len(self.scheduler.timesteps))
            state["step"] += 1
            active = [k for k in range(len(windows)) if scales[k] != 0 and _in_window(step, total, *windows[k])]
            if not active:
                return kwargs
            latents = [
                self._control_latents(k, images[k], hidden, per_prompt, state["latents"], encode) for k in active
            ]
            scaled = tuple(float(scales[k]) for k in active)
            controls = {"adapters": tuple(active), "scales": scaled, "latents": latents}
            return {**kwargs, "controls": controls}

        self._add_controls = add_controls
        try:
            yield
        finally:
            self._add_controls = None

    def denoiser_inputs(self, kwargs: dict) -> dict:
        """The step's inputs plus ``controls``: the indices of the adapters active at this step, their scales
        (part of a CUDA graph's key) and their control latents (B or 1, C, h, w) (static inputs of the graph)."""
        add_controls = getattr(self, "_add_controls", None)
        return kwargs if add_controls is None else add_controls(kwargs)

    def denoiser_forward(self, hidden_states: torch.Tensor, controls: dict | None = None, **kwargs) -> torch.Tensor:
        """The transformer's output with ``block_controls`` built from ``controls`` (see :meth:`denoiser_inputs`)."""
        if controls is not None:
            adapters = [self.adapters[k] for k in controls["adapters"]]
            kwargs["block_controls"] = block_controls(
                self.transformer, adapters, controls["latents"], list(controls["scales"])
            )
        return super().denoiser_forward(hidden_states, **kwargs)

    def _control_latents(
        self,
        k: int,
        image: torch.Tensor,
        hidden: torch.Tensor,
        per_prompt: int,
        cache: dict,
        encode: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Adapter ``k``'s control latents for a transformer batch like ``hidden`` (encoded once per call)."""
        if k not in cache:
            size = (hidden.shape[-2] * self.vae_scale_factor, hidden.shape[-1] * self.vae_scale_factor)
            if tuple(image.shape[-2:]) != size:  # resolution binning sampled at another size
                image = torch.nn.functional.interpolate(image, size=size, mode="bilinear", align_corners=False)
            cache[k] = encode(image).to(hidden.device, hidden.dtype)  # (B_c, C, h, w)
        latents, batch = cache[k], hidden.shape[0]
        if latents.shape[0] == 1:
            return latents
        latents = latents.repeat_interleave(per_prompt, dim=0)
        if batch == 2 * latents.shape[0]:  # the CFG batch: unconditional half first, both controlled
            latents = torch.cat([latents, latents])
        if latents.shape[0] != batch:
            raise ValueError(f"control_image has {cache[k].shape[0]} images; pass one, or one per prompt.")
        return latents


def _named_arguments(pipe: ControlNetPipeline, args: tuple, kwargs: dict) -> dict:
    """The arguments of a :meth:`TextToImagePipeline.__call__` call by name (a bad call is Python's TypeError)."""
    call = inspect.signature(TextToImagePipeline.__call__)  # forwarded signature: binds, not probes
    bound = call.bind_partial(pipe, *args, **kwargs)
    named = dict(bound.arguments)
    named.pop("self")
    return {**named, **named.pop("kwargs", {})}


def _call_signature() -> inspect.Signature:
    """:meth:`ControlNetPipeline.__call__`'s signature: the base call's parameters, then the control ones."""
    base = list(inspect.signature(TextToImagePipeline.__call__).parameters.values())  # forwarded signature
    own = inspect.signature(inspect.unwrap(ControlNetPipeline.__call__)).parameters  # forwarded signature
    controls = [p for p in own.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    return inspect.Signature(base[:-1] + controls + base[-1:])


ControlNetPipeline.__call__.__signature__ = _call_signature()

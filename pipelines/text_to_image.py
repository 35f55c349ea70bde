"""Text-to-image sampling with any backbone of the toolkit, a T5 text encoder and a diffusers VAE."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import PixArtImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import retrieve_timesteps
from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import PixArtSigmaPipeline
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

from ..models.base import compile_repeated_blocks
from ..models.capabilities import capability
from ..nn.text_padding import trim_text_padding
from .callbacks import (
    CALLBACK_TENSOR_INPUTS,
    CallStateMixin,
    StepTensors,
    callback_tensor_names,
    legacy_callback_due,
)
from .checks import (
    MAX_IMAGE_TOKENS,
    SamplingValueError,
    check_callback_steps,
    check_eta,
    check_guidance_scale,
    check_image_side,
    check_image_tokens,
    check_latents,
    check_num_images_per_prompt,
    check_num_inference_steps,
    check_prompt,
)
from .defaults import SamplingDefaultsMixin
from .loading import check_scheduler, has_scheduler, local_folder, strict_components
from .lora import DiTLoraLoaderMixin
from .resolution import flow_shift_mu, sampling_size
from .schedulers import default_scheduler

logger = logging.get_logger(__name__)

PromptEmbeds = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


class TextToImagePipeline(SamplingDefaultsMixin, CallStateMixin, DiffusionPipeline, DiTLoraLoaderMixin):
    """Text-to-image pipeline for the toolkit's diffusion transformers.

    Takes every argument of diffusers' ``PixArtSigmaPipeline.__call__`` and ``encode_prompt`` (same names, positional
    order and defaults; ``clean_caption`` cleans captions with diffusers' own code), diffusers' step-end callbacks
    (:mod:`dit.pipelines.callbacks`), ``cross_attention_kwargs`` (``{"scale": s}`` for LoRA) and diffusers' pipeline
    LoRA methods (:mod:`dit.pipelines.lora`). Beyond it: any backbone of the toolkit, the sampling defaults of the
    folder it was loaded from (:attr:`sampling_defaults`), the learned null caption of original PixArt checkpoints
    as the unconditional branch (as PixArt's own inference does), and the nearest valid size for any
    ``sample_size`` instead of an "Invalid sample size" error.

    Args:
        tokenizer: tokenizer of the text encoder.
        text_encoder: a transformers ``T5EncoderModel`` (or any encoder returning hidden states first).
        vae: a diffusers ``AutoencoderKL``.
        transformer: a backbone of this toolkit (or diffusers' ``PixArtTransformer2DModel``).
        scheduler: any diffusers scheduler; None picks the one the transformer's config records it was trained for
            (:func:`~dit.pipelines.schedulers.default_scheduler`).

    Flexible-resolution backbones (FiT) sample any size that divides into patches, without PixArt's aspect-ratio
    bins. A flow-matching scheduler with ``use_dynamic_shifting`` gets ``mu`` from the image token count at every
    call (:func:`~dit.pipelines.resolution.flow_shift_mu`), so the timestep shift follows the resolution.

    Every sampling argument is checked before any work starts (:mod:`dit.pipelines.checks`): a bad value is a
    ``ValueError`` naming it and its allowed range. Sizes are capped at 16384 px per side and ``max_image_tokens``
    image tokens (raise it on the instance for a device with the memory).
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["tokenizer", "text_encoder"]
    _callback_tensor_inputs = CALLBACK_TENSOR_INPUTS
    # diffusers' caption cleaning (needs bs4 and ftfy), reused as is: PixArtSigmaPipeline's methods and their regex.
    bad_punct_regex = PixArtSigmaPipeline.bad_punct_regex
    _text_preprocessing = PixArtSigmaPipeline._text_preprocessing
    _clean_caption = PixArtSigmaPipeline._clean_caption
    #: Largest number of image tokens per image a call accepts (see :data:`dit.pipelines.checks.MAX_IMAGE_TOKENS`).
    max_image_tokens: int = MAX_IMAGE_TOKENS

    def __init__(self, tokenizer, text_encoder, vae, transformer, scheduler):
        super().__init__()
        scheduler = scheduler if scheduler is not None else default_scheduler(transformer)
        check_scheduler(scheduler)
        self.register_modules(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
        )
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = PixArtImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, strict: bool = True, **kwargs):
        """diffusers' ``DiffusionPipeline.from_pretrained``, strict by default: a component whose checkpoint misses
        a key of the model, or holds one the model does not have, is a
        :class:`~dit.checkpoint.CheckpointKeyError` listing them (diffusers would only warn and leave those weights
        random), and a scheduler ``prediction_type`` its class does not implement is a ``ValueError``.

        ``strict=False`` loads as diffusers does. With ``device_map``, diffusers places the components itself and
        only the toolkit's own models (always strict) are checked. The folder's ``sampling_defaults.json`` becomes
        the pipeline's :attr:`sampling_defaults`. A folder without ``scheduler/`` samples with the scheduler its
        transformer's config records (as ``scheduler=None``).
        """
        folder = local_folder(pretrained_model_name_or_path, kwargs)
        if "scheduler" not in kwargs and not has_scheduler(folder):
            kwargs["scheduler"] = None  # the transformer's own (__init__): what its config records it predicts
        if not strict or kwargs.get("device_map") is not None:
            pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        else:
            pipe = super().from_pretrained(folder, **{**strict_components(folder, kwargs), **kwargs})
        pipe.record_sampling_defaults(folder)
        return pipe

    # ----- text ---------------------------------------------------------------------------------------
    def _encode_text(
        self, texts: list[str], max_length: int, device: torch.device, clean_caption: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tokenizer is None or self.text_encoder is None:
            raise ValueError("This pipeline has no tokenizer/text encoder: pass prompt_embeds and their masks.")
        clean_caption = clean_caption and _can_clean_captions()  # else diffusers warns on every call
        texts = self._text_preprocessing(texts, clean_caption=clean_caption)  # diffusers': lower-cased, stripped
        tokens = self.tokenizer(
            texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        )
        mask = tokens.attention_mask.to(device)  # (B, L)
        embeds = self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]  # (B, L, C)
        return embeds.to(self.text_encoder.dtype), mask

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = "",
        num_images_per_prompt: int = 1,
        device: torch.device | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        clean_caption: bool = False,
        max_sequence_length: int = 300,
        *,
        use_null_caption: bool | None = None,
        **kwargs,
    ) -> PromptEmbeds:
        """Text features and masks for the conditional and (with CFG) unconditional branch.

        The arguments of diffusers' ``PixArtSigmaPipeline.encode_prompt``, in its order; ``clean_caption`` cleans
        prompts as diffusers does (with bs4 and ftfy installed; without them diffusers' warning and no cleaning);
        other keyword arguments are ignored with a warning (diffusers ignores them, warning on ``mask_feature``).
        The unconditional branch is, in order: ``negative_prompt_embeds``; the transformer's learned null
        caption when ``use_null_caption`` (default: when the model has one and no negative prompt is given),
        with the prompt's mask as in PixArt-α's inference; else the encoded ``negative_prompt`` (``""``: the
        empty-prompt encoding PixArt-Σ's inference uses; pass ``use_null_caption=False`` for a Σ checkpoint).
        """
        warn_ignored(kwargs, "encode_prompt")
        device = device or self._execution_device
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds, prompt_attention_mask = self._encode_text(
                prompts, max_sequence_length, device, clean_caption
            )
        elif prompt_attention_mask is None:
            prompt_attention_mask = torch.ones(prompt_embeds.shape[:2], dtype=torch.long, device=device)
        batch = prompt_embeds.shape[0]
        prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        prompt_attention_mask = prompt_attention_mask.repeat_interleave(num_images_per_prompt, dim=0)
        if not do_classifier_free_guidance:
            return prompt_embeds, prompt_attention_mask, None, None

        if negative_prompt_embeds is None:
            negative_prompt_embeds, negative_prompt_attention_mask = self._unconditional_text(
                negative_prompt, prompt_embeds, prompt_attention_mask[::num_images_per_prompt], batch,
                use_null_caption, clean_caption,
            )  # fmt: skip
        elif negative_prompt_attention_mask is None:
            negative_prompt_attention_mask = torch.ones(
                negative_prompt_embeds.shape[:2], dtype=torch.long, device=device
            )
        negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        negative_prompt_attention_mask = negative_prompt_attention_mask.repeat_interleave(num_images_per_prompt, dim=0)
        return prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask

    def _unconditional_text(
        self, negative_prompt, prompt_embeds: torch.Tensor, prompt_mask: torch.Tensor, batch: int,
        use_null_caption: bool | None, clean_caption: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """The unconditional text of ``batch`` prompts (one row each): the learned null caption or the encoded
        negative prompt, as long as the prompts' text."""
        device = prompt_embeds.device
        if use_null_caption is None:
            use_null_caption = capability(self.transformer, "has_null_caption") and not negative_prompt
        if use_null_caption:
            length = prompt_embeds.shape[1]
            return self.transformer.null_caption(batch, length).to(device, prompt_embeds.dtype), prompt_mask
        negatives = [negative_prompt or ""] * batch if not isinstance(negative_prompt, list) else negative_prompt
        if len(negatives) != batch:
            raise ValueError(f"{len(negatives)} negative prompts were given for {batch} prompts.")
        return self._encode_text(negatives, prompt_embeds.shape[1], device, clean_caption)

    # ----- sampling -----------------------------------------------------------------------------------
    def prepare_latents(
        self, batch: int, height: int, width: int, dtype, device, generator, latents=None
    ) -> torch.Tensor:
        """Initial noise (B, C, H/f, W/f) scaled by the scheduler's ``init_noise_sigma`` (1 for flow matching)."""
        shape = self.latent_shape(batch, height, width)
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"{len(generator)} generators were given for a batch of {batch} images.")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; expected {shape}.")
        return latents.to(device=device, dtype=dtype) * getattr(self.scheduler, "init_noise_sigma", 1.0)

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        """The latents' shape (B, C, H/f, W/f) for ``batch`` images of ``height`` x ``width`` pixels."""
        f = self.vae_scale_factor
        return (batch, self.transformer.config.in_channels, height // f, width // f)

    # ----- checks and sizes ---------------------------------------------------------------------------
    def check_inputs(
        self, prompt, prompt_embeds, num_inference_steps, timesteps, sigmas, guidance_scale, eta,
        num_images_per_prompt, height, width, output_type, tensor_inputs,
    ) -> None:  # fmt: skip
        """Check every call argument that needs no model work, one check per value (:mod:`dit.pipelines.checks`)."""
        check_prompt(prompt, prompt_embeds)
        check_num_inference_steps(num_inference_steps, timesteps, sigmas)
        check_guidance_scale(guidance_scale)
        check_eta(eta)
        check_num_images_per_prompt(num_images_per_prompt)
        check_image_side("height", height)
        check_image_side("width", width)
        _check_outputs(output_type, tensor_inputs, self._callback_tensor_inputs)

    @property
    def size_multiple(self) -> int:
        """Image sides the model takes as they are: multiples of the VAE factor times the patch size."""
        return self.vae_scale_factor * self.transformer.config.patch_size

    def sampling_sizes(self, height: int | None, width: int | None, binning: bool) -> tuple[int, int, int, int]:
        """(height, width) asked (None: the model's training size) and (height, width) sampled at.

        With ``binning`` a size is snapped (PixArt's aspect-ratio bins, or the nearest multiple of
        :attr:`size_multiple`) and the image resized back to the size asked; without, a size the model cannot take
        is an error naming the multiple. More than :attr:`max_image_tokens` image tokens is an error.
        """
        default = self.transformer.config.sample_size * self.vae_scale_factor
        height, width = default if height is None else height, default if width is None else width
        multiple = self.size_multiple
        resolution = None if capability(self.transformer, "native_resolution") else default  # FiT: no bins
        sample_h, sample_w = sampling_size(height, width, resolution, multiple, binning)
        check_image_tokens(sample_h, sample_w, multiple, self.max_image_tokens)
        if height % multiple or width % multiple:
            logger.warning(
                "%dx%d (WxH) is not a multiple of %d (VAE factor x patch size): sampling at %dx%d and resizing to "
                "the size asked.", width, height, multiple, sample_w, sample_h,
            )  # fmt: skip
        return height, width, sample_h, sample_w

    def _added_cond_kwargs(self, height: int, width: int, dtype, device) -> dict[str, torch.Tensor | None]:
        """The micro-conditions of one image (rows repeated to the model batch at each step)."""
        if not capability(self.transformer, "use_additional_conditions"):
            return {"resolution": None, "aspect_ratio": None}
        resolution = torch.tensor([[height, width]], dtype=dtype, device=device)  # (1, 2)
        aspect_ratio = torch.tensor([[height / width]], dtype=dtype, device=device)  # (1, 1)
        return {"resolution": resolution, "aspect_ratio": aspect_ratio}

    def _step_kwargs(self, generator, eta: float) -> dict[str, Any]:
        """``eta`` and ``generator`` for the scheduler's ``step``, where it takes them."""
        params = _parameter_names(self.scheduler.step)
        kwargs = {"eta": eta} if "eta" in params else {}
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    @property
    def guidance_embedded(self) -> bool:
        """Whether the transformer takes the guidance scale as an input (an LCM student with ``time_cond_proj_dim``):
        then there is no CFG batch, and ``guidance_scale`` is embedded as LCM's ``w = guidance_scale - 1``."""
        return capability(self.transformer, "embeds_guidance")

    def compile_transformer(self, **compile_kwargs) -> int:
        """Compile the transformer's repeated blocks, and a ControlNet adapter's, in place (regional compilation, as
        diffusers' ``compile_repeated_blocks``): one graph shared by all blocks, compiled in seconds, reused at every
        step. ``fullgraph=True`` unless given (a graph break is an error); other keyword arguments go to
        ``torch.compile`` (``mode="max-autotune"``, ``backend=...``). Returns the number of blocks compiled.

        The text reaching the blocks is trimmed to a few fixed lengths (64, 128, ... tokens), so a new prompt length
        costs at most one recompilation per length bucket.
        """
        compile_kwargs = {"fullgraph": True, **compile_kwargs}
        count = compile_repeated_blocks(self.transformer, **compile_kwargs)
        controlnet = getattr(self, "controlnet", None)
        if controlnet is not None:
            count += compile_repeated_blocks(controlnet, **compile_kwargs)
        return count

    def _predict(self, latents, t, embeds, mask, added) -> torch.Tensor:
        """One transformer call (a CFG batch when guided; the scale as an input of a guidance-embedding model),
        reduced to the latent channels."""
        guided = self.do_classifier_free_guidance
        embeds, mask = _step_text(embeds, mask, latents.shape[0], guided)
        model_in = torch.cat([latents] * 2) if guided else latents
        if hasattr(self.scheduler, "scale_model_input"):  # flow-matching schedulers have none
            model_in = self.scheduler.scale_model_input(model_in, t)
        batch = model_in.shape[0]
        timestep = torch.as_tensor(t, device=latents.device).reshape(-1).expand(batch)
        extra = {"guidance": self.guidance_scale} if self.guidance_embedded else {}
        if self.cross_attention_kwargs is not None:
            extra["cross_attention_kwargs"] = self.cross_attention_kwargs
        pred = self.transformer(
            model_in,
            encoder_hidden_states=embeds,
            encoder_attention_mask=mask,
            timestep=timestep,
            added_cond_kwargs={k: None if v is None else v.repeat(batch, 1) for k, v in added.items()},
            return_dict=False,
            **extra,
        )[0]
        if guided:
            uncond, cond = pred.chunk(2)
            pred = uncond + self.guidance_scale * (cond - uncond)
        if pred.shape[1] == 2 * latents.shape[1]:  # learned sigma: keep the mean prediction
            pred = pred[:, : latents.shape[1]]
        return pred

    def decode(self, latents: torch.Tensor, output_type: str):
        """Latents -> images in ``output_type`` (``pil``, ``np``, ``pt`` or ``latent``)."""
        if output_type == "latent":
            return latents
        config = self.vae.config
        latents = latents.to(self.vae.dtype) / config.scaling_factor
        if getattr(config, "shift_factor", None) is not None:
            latents = latents + config.shift_factor
        image = self.vae.decode(latents, return_dict=False)[0]
        return image

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = "",
        num_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback: Callable[[int, Any, torch.Tensor], None] | None = None,
        callback_steps: int = 1,
        clean_caption: bool = True,
        use_resolution_binning: bool = True,
        max_sequence_length: int = 300,
        *,
        use_null_caption: bool | None = None,
        callback_on_step_end: Callable[..., dict[str, torch.Tensor]] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        **kwargs,
    ) -> ImagePipelineOutput | tuple:
        """Generate images for ``prompt``: diffusers' ``PixArtSigmaPipeline.__call__`` (its arguments in its order,
        ``callback`` / ``callback_steps`` and ``clean_caption`` included), then the toolkit's keyword-only ones.

        ``num_inference_steps`` / ``guidance_scale`` left None take :attr:`sampling_defaults` (the folder's
        ``sampling_defaults.json``, else diffusers' 20 and 4.5). Other keyword arguments are ignored with a warning,
        as diffusers ignores them.

        Few-step LCM students sample with diffusers' ``LCMScheduler`` (1-4 steps): a student distilled at a fixed
        guidance scale takes ``guidance_scale=1`` (no CFG batch: guidance is baked in); a guidance-embedding
        student (``time_cond_proj_dim``) takes the scale it should imitate, embedded without a CFG batch.

        ``use_null_caption``: the unconditional branch is ``y_embedding`` (default when the model has one and no
        negative prompt is given: PixArt-α's inference) or, with False, the encoded empty prompt (PixArt-Σ's).
        ``callback_on_step_end(pipe, i, t, tensors)`` gets
        the tensors named in ``callback_on_step_end_tensor_inputs`` (any of :attr:`_callback_tensor_inputs`) and may
        return replacements for any of them (:mod:`dit.pipelines.callbacks`). ``cross_attention_kwargs`` goes to
        the transformer at every step (``{"scale": s}`` scales the active LoRA adapters).

        Raises a ``ValueError`` (:class:`~dit.pipelines.checks.SamplingValueError`) naming the value and its allowed
        range, before any work, for: ``guidance_scale`` not finite or < 0; ``num_inference_steps`` < 1; ``height`` /
        ``width`` < 1, above 16384 px or (without binning) no multiple of :attr:`size_multiple`; more image tokens
        than :attr:`max_image_tokens`; ``latents`` of another shape or not finite; ``num_images_per_prompt`` < 1;
        ``prompt`` neither a string nor a non-empty list of strings; ``eta`` outside [0, 1]; ``callback_steps`` < 1.
        """
        warn_ignored(kwargs, "__call__")
        defaults = self.sampling_defaults
        steps = defaults["num_inference_steps"] if num_inference_steps is None else num_inference_steps
        guidance_scale = defaults["guidance_scale"] if guidance_scale is None else guidance_scale
        tensor_inputs = callback_tensor_names(callback_on_step_end, callback_on_step_end_tensor_inputs)
        self.check_inputs(
            prompt, prompt_embeds, steps, timesteps, sigmas, guidance_scale, eta,
            num_images_per_prompt, height, width, output_type, tensor_inputs,
        )  # fmt: skip
        check_callback_steps(callback_steps)
        height, width, sample_h, sample_w = self.sampling_sizes(height, width, use_resolution_binning)
        prompts = check_prompt(prompt, prompt_embeds)
        check_latents(latents, self.latent_shape(prompts * num_images_per_prompt, sample_h, sample_w))
        self._guidance_scale, self._cross_attention_kwargs = guidance_scale, cross_attention_kwargs
        self._interrupt = False
        device = self._execution_device

        guided = self.do_classifier_free_guidance
        embeds, mask, neg_embeds, neg_mask = self.encode_prompt(
            prompt, guided, negative_prompt, num_images_per_prompt, device, prompt_embeds, negative_prompt_embeds,
            prompt_attention_mask, negative_prompt_attention_mask, clean_caption, max_sequence_length,
            use_null_caption=use_null_caption,
        )  # fmt: skip
        batch = embeds.shape[0]
        if guided:
            embeds, mask = torch.cat([neg_embeds, embeds]), torch.cat([neg_mask, mask])
        embeds, mask = trim_text_padding(embeds, mask)  # once per call: a few fixed key lengths, exact

        multiple = self.size_multiple
        mu = flow_shift_mu(self.scheduler, (sample_h // multiple) * (sample_w // multiple))
        timesteps, steps = retrieve_timesteps(
            self.scheduler, steps, device, timesteps, sigmas, **({} if mu is None else {"mu": mu})
        )
        self._num_timesteps = len(timesteps)
        latents = self.prepare_latents(batch, sample_h, sample_w, embeds.dtype, device, generator, latents)
        state = StepTensors(latents, embeds, mask, negatives=batch if guided else 0)
        added = self._added_cond_kwargs(sample_h, sample_w, embeds.dtype, device)
        step_kwargs = self._step_kwargs(generator, eta)
        order = getattr(self.scheduler, "order", 1)

        with self.progress_bar(total=steps) as progress:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                pred = self._predict(state.latents, t, state.prompt_embeds, state.prompt_attention_mask, added)
                state.latents = self.scheduler.step(pred, t, state.latents, **step_kwargs, return_dict=False)[0]
                if callback_on_step_end is not None:
                    state.run(callback_on_step_end, self, i, t, tensor_inputs)
                if callback is not None and legacy_callback_due(i, len(timesteps), steps, order, callback_steps):
                    callback(i // order, t, state.latents)
                progress.update()

        image = self.decode(state.latents, output_type)
        if output_type != "latent":
            if (sample_h, sample_w) != (height, width):
                image = self.image_processor.resize_and_crop_tensor(image, width, height)
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=image) if return_dict else (image,)


def _can_clean_captions() -> bool:
    """Whether diffusers' caption cleaning can run (it needs beautifulsoup4 and ftfy, as the module of the
    ``_text_preprocessing`` we inherit sees them); without them it says so once per process (diffusers would warn
    twice on every prompt encoding and use the captions as given)."""
    from diffusers.pipelines.pixart_alpha import pipeline_pixart_sigma as sigma

    if sigma.is_bs4_available() and sigma.is_ftfy_available():
        return True
    _warn_once_without_cleaning()
    return False


@functools.cache
def _warn_once_without_cleaning() -> None:
    logger.warning("clean_caption=True needs beautifulsoup4 and ftfy (pip install beautifulsoup4 ftfy); captions are "
                   "used as given (lower-cased and stripped).")  # fmt: skip


def _parameter_names(function) -> tuple[str, ...]:
    """The parameter names of a plain Python function or bound method (a scheduler's ``step``)."""
    code = function.__code__
    return code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]


def _check_outputs(output_type: str, tensor_inputs: list[str], allowed_tensors: list[str]) -> None:
    """``output_type`` is one the pipeline writes; the callback asks only for tensors it hands out."""
    if output_type not in ("pil", "np", "pt", "latent"):
        raise SamplingValueError(f"Unknown output_type {output_type!r}; use 'pil', 'np', 'pt' or 'latent'.")
    unknown = set(tensor_inputs) - set(allowed_tensors)
    if unknown:
        raise SamplingValueError(f"callback_on_step_end_tensor_inputs {sorted(unknown)} are not in {allowed_tensors}.")


def warn_ignored(kwargs: dict[str, Any], where: str) -> None:
    """Keyword arguments a method takes only for diffusers' signature: ignored, as diffusers ignores them, but said."""
    if kwargs:
        logger.warning("%s ignores the keyword arguments %s (diffusers' PixArtSigmaPipeline ignores them too).",
                       where, sorted(kwargs))  # fmt: skip


def _step_text(embeds: torch.Tensor, mask: torch.Tensor, batch: int, guided: bool):
    """The text rows of one step for ``batch`` latents: ``2 * batch`` with a CFG batch (unconditional first),
    ``batch`` without; a CFG batch left after guidance was switched off (by a step-end callback) gives its
    conditional half."""
    rows = embeds.shape[0]
    if not guided and rows == 2 * batch:
        return embeds[batch:], mask[batch:]
    if rows != (2 * batch if guided else batch):
        raise SamplingValueError(
            f"The text batch has {rows} rows for {batch} latents; it needs {2 * batch if guided else batch} "
            f"({'unconditional rows first, then conditional' if guided else 'no CFG batch'}). Did a step-end "
            "callback return prompt_embeds of another batch?"
        )
    return embeds, mask

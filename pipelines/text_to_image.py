"""Text-to-image sampling with any backbone of the toolkit, a T5 text encoder and a diffusers VAE."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import PixArtSigmaPipeline
from diffusers.utils import logging

from ..models.capabilities import capability
from ..nn.text_padding import trim_text_padding
from .callbacks import CALLBACK_TENSOR_INPUTS, CallStateMixin, StepCallbacks, StepTensors, callback_tensor_names
from .checks import (
    SamplingValueError,
    check_callback_steps,
    check_eta,
    check_guidance_scale,
    check_image_side,
    check_latents,
    check_num_images_per_prompt,
    check_num_inference_steps,
    check_prompt,
)
from .defaults import SamplingDefaultsMixin
from .loading import check_scheduler
from .lora import DiTLoraLoaderMixin
from .sampling import LatentSamplingMixin, check_outputs
from .schedulers import default_scheduler

logger = logging.get_logger(__name__)

PromptEmbeds = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


class TextToImagePipeline(
    SamplingDefaultsMixin, CallStateMixin, LatentSamplingMixin, DiffusionPipeline, DiTLoraLoaderMixin
):
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

    def __init__(self, tokenizer, text_encoder, vae, transformer, scheduler):
        super().__init__()
        scheduler = scheduler if scheduler is not None else default_scheduler(transformer)
        check_scheduler(scheduler)
        self.register_modules(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
        )
        self._set_image_processor(vae)

    # ----- text ---------------------------------------------------------------------------------------
    def _encode_text(
        self, texts: list[str], max_length: int, device: torch.device, clean_caption: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tokenizer is None or self.text_encoder is None:
            raise ValueError("This pipeline has no tokenizer/text encoder: pass prompt_embeds and their masks.")
        clean_caption = clean_caption and _can_clean_captions()  # else diffusers warns on every call
        texts = self._text_preprocessing(texts, clean_caption=clean_caption)  # diffusers': lower-cased, stripped
        # a text encoder with a position table (CLIP: 77) reads no more tokens than it has positions; T5 has none
        positions = getattr(getattr(self.text_encoder, "config", None), "max_position_embeddings", None)
        max_length = min(max_length, positions) if isinstance(positions, int) else max_length
        tokens = self.tokenizer(
            texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        )
        mask = tokens.attention_mask.to(device)  # (B, L)
        # a transformer that reads every token without a mask (MicroDiT) was trained on features encoded without one
        encoder_mask = mask if capability(self.transformer, "uses_text_mask") else None
        embeds = self.text_encoder(tokens.input_ids.to(device), attention_mask=encoder_mask)[0]  # (B, L, C)
        # in the transformer's dtype (the low-memory preset: a bf16 text encoder, an fp16 model) where there is one
        return embeds.to((self.transformer or self.text_encoder).dtype), mask

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
            negative_prompt_embeds = negative_prompt_attention_mask = None
        elif negative_prompt_embeds is None:
            negative_prompt_embeds, negative_prompt_attention_mask = self._unconditional_text(
                negative_prompt, prompt_embeds, prompt_attention_mask[::num_images_per_prompt], batch,
                use_null_caption, clean_caption,
            )  # fmt: skip
        elif negative_prompt_attention_mask is None:
            negative_prompt_attention_mask = torch.ones(
                negative_prompt_embeds.shape[:2], dtype=torch.long, device=device
            )
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
            negative_prompt_attention_mask = negative_prompt_attention_mask.repeat_interleave(
                num_images_per_prompt, dim=0
            )
        # one return statement, as diffusers' (its encode_prompt test reads the output names from it)
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

    # ----- checks and one step ------------------------------------------------------------------------
    def check_inputs(
        self, prompt, prompt_embeds, num_inference_steps, timesteps, sigmas, guidance_scale, eta,
        num_images_per_prompt, height, width, output_type, tensor_inputs, guidance_channels=None,
    ) -> None:  # fmt: skip
        """Check every call argument that needs no model work, one check per value (:mod:`dit.pipelines.checks`)."""
        check_prompt(prompt, prompt_embeds)
        check_num_inference_steps(num_inference_steps, timesteps, sigmas)
        check_guidance_scale(guidance_scale)
        self.check_guidance_channels(guidance_channels)
        check_eta(eta)
        check_num_images_per_prompt(num_images_per_prompt)
        check_image_side("height", height)
        check_image_side("width", width)
        check_outputs(output_type, tensor_inputs, self._callback_tensor_inputs)

    def _added_cond_kwargs(self, height: int, width: int, dtype, device) -> dict[str, torch.Tensor | None]:
        """The micro-conditions of one image (rows repeated to the model batch at each step)."""
        if not capability(self.transformer, "use_additional_conditions"):
            return {"resolution": None, "aspect_ratio": None}
        resolution = torch.tensor([[height, width]], dtype=dtype, device=device)  # (1, 2)
        aspect_ratio = torch.tensor([[height / width]], dtype=dtype, device=device)  # (1, 1)
        return {"resolution": resolution, "aspect_ratio": aspect_ratio}

    def _predict(self, latents, t, embeds, mask, added) -> torch.Tensor:
        """One transformer call (a CFG batch when guided; the scale as an input of a guidance-embedding model),
        reduced to the latent channels."""
        guided = self.do_classifier_free_guidance
        embeds, mask = _step_text(embeds, mask, latents.shape[0], guided)
        model_in, timestep = self.model_input(latents, t, guided)
        batch = model_in.shape[0]
        extra = {"guidance": self.guidance_scale} if self.guidance_embedded else {}
        if self.cross_attention_kwargs is not None:
            extra["cross_attention_kwargs"] = self.cross_attention_kwargs
        pred = self.call_transformer(  # replayed from a CUDA graph with enable_cuda_graphs()
            model_in,
            encoder_hidden_states=embeds,
            encoder_attention_mask=mask if capability(self.transformer, "uses_text_mask") else None,
            timestep=timestep,
            added_cond_kwargs={k: None if v is None else v.repeat(batch, 1) for k, v in added.items()},
            **extra,
        )
        return self.guided_prediction(pred, latents.shape[1], guided)

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
        guidance_channels: int | None = None,
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
        negative prompt is given: PixArt-α's inference; MicroDiT's is all zeros) or, with False, the encoded empty
        prompt (PixArt-Σ's). A transformer whose ``uses_text_mask`` is False (MicroDiT) gets every caption token and
        no mask.
        ``callback_on_step_end(pipe, i, t, tensors)`` gets
        the tensors named in ``callback_on_step_end_tensor_inputs`` (any of :attr:`_callback_tensor_inputs`) and may
        return replacements for any of them (:mod:`dit.pipelines.callbacks`). ``cross_attention_kwargs`` goes to
        the transformer at every step (``{"scale": s}`` scales the active LoRA adapters). ``guidance_channels=k``
        guides the first k latent channels only, the others keep the conditional prediction (FiT's published models
        guide 3 of 4); None takes :attr:`sampling_defaults`' value where the folder records one, else every channel.

        Raises a ``ValueError`` (:class:`~dit.pipelines.checks.SamplingValueError`) naming the value and its allowed
        range, before any work, for: ``guidance_scale`` not finite or < 0; ``num_inference_steps`` < 1; ``height`` /
        ``width`` < 1, above 16384 px or (without binning) no multiple of :attr:`size_multiple`; more image tokens
        than :attr:`max_image_tokens`; ``latents`` of another shape or not finite; ``num_images_per_prompt`` < 1;
        ``prompt`` neither a string nor a non-empty list of strings; ``eta`` outside [0, 1]; ``callback_steps`` < 1;
        ``guidance_channels`` not None nor an int in [1, latent channels].
        """
        warn_ignored(kwargs, "__call__")
        defaults = self.sampling_defaults
        steps = defaults["num_inference_steps"] if num_inference_steps is None else num_inference_steps
        guidance_scale = defaults["guidance_scale"] if guidance_scale is None else guidance_scale
        guidance_channels = defaults.get("guidance_channels") if guidance_channels is None else guidance_channels
        tensor_inputs = callback_tensor_names(callback_on_step_end, callback_on_step_end_tensor_inputs)
        self.check_inputs(
            prompt, prompt_embeds, steps, timesteps, sigmas, guidance_scale, eta,
            num_images_per_prompt, height, width, output_type, tensor_inputs, guidance_channels,
        )  # fmt: skip
        check_callback_steps(callback_steps)
        height, width, sample_h, sample_w = self.sampling_sizes(height, width, use_resolution_binning)
        prompts = check_prompt(prompt, prompt_embeds)
        check_latents(latents, self.latent_shape(prompts * num_images_per_prompt, sample_h, sample_w))
        self._guidance_scale, self._cross_attention_kwargs = guidance_scale, cross_attention_kwargs
        self._guidance_channels, self._interrupt = guidance_channels, False
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
        if not capability(self.transformer, "uses_text_mask"):  # it attends to every token: none is padding
            mask = torch.ones_like(mask)
        embeds, mask = trim_text_padding(embeds, mask)  # once per call: a few fixed key lengths, exact

        timesteps, steps = self.sampling_timesteps(steps, timesteps, sigmas, sample_h, sample_w, device)
        latents = self.prepare_latents(batch, sample_h, sample_w, embeds.dtype, device, generator, latents)
        state = StepTensors(latents, embeds, mask, negatives=batch if guided else 0)
        added = self._added_cond_kwargs(sample_h, sample_w, embeds.dtype, device)

        def predict(state: StepTensors, t) -> torch.Tensor:
            return self._predict(state.latents, t, state.prompt_embeds, state.prompt_attention_mask, added)

        callbacks = StepCallbacks(callback_on_step_end, tensor_inputs, callback, callback_steps)
        latents = self.denoise(state, timesteps, steps, predict, self._step_kwargs(generator, eta), callbacks)
        image = self.output_images(latents, output_type, (height, width), (sample_h, sample_w))
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


#: diffusers' words for PixArt-α's deprecated ``mask_feature`` argument (``PixArtAlphaPipeline``, a FutureWarning).
MASK_FEATURE_DEPRECATION = (
    "The use of `mask_feature` is deprecated. It is no longer used in any computation and that doesn't affect the end "
    "results. It will be removed in a future version."
)


def warn_ignored(kwargs: dict[str, Any], where: str) -> None:
    """Keyword arguments a method takes only for diffusers' signature: ignored, as diffusers ignores them, but said;
    PixArt-α's ``mask_feature`` with diffusers' FutureWarning."""
    if "mask_feature" in kwargs:
        warnings.warn(MASK_FEATURE_DEPRECATION, FutureWarning, stacklevel=3)
    others = sorted(key for key in kwargs if key != "mask_feature")
    if others:
        logger.warning("%s ignores the keyword arguments %s (diffusers' PixArtSigmaPipeline ignores them too).",
                       where, others)  # fmt: skip


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

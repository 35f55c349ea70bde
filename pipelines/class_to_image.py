"""Class-conditional sampling (FiT / FiTv2 on ImageNet): class ids or label names, at any size and aspect ratio."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from .callbacks import CallStateMixin, StepCallbacks, StepLatents, callback_tensor_names
from .checks import (
    check_callback_steps,
    check_eta,
    check_guidance_scale,
    check_image_side,
    check_latents,
    check_num_images_per_prompt,
    check_num_inference_steps,
)
from .defaults import SamplingDefaultsMixin
from .labels import ClassLabels
from .loading import check_scheduler
from .sampling import LatentSamplingMixin, check_outputs
from .schedulers import default_scheduler

ClassLabelsArg = int | str | Sequence[int | str] | torch.Tensor


class ClassToImagePipeline(SamplingDefaultsMixin, CallStateMixin, LatentSamplingMixin, DiffusionPipeline):
    """Class-conditional image generation with a class-conditional backbone of the toolkit (``num_classes`` in its
    config: :class:`~dit.FiTTransformer`), diffusers' ``DiTPipeline`` for any size and aspect ratio.

    A call takes class ids or label names (:meth:`get_label_ids`, as ``DiTPipeline``'s), guides with the null class
    (id ``num_classes``) as the unconditional branch, and samples at ``height`` x ``width`` (multiples of
    :attr:`size_multiple`; other sizes are snapped and resized back with ``use_resolution_binning``). It shares
    the text pipeline's sampling (:mod:`dit.pipelines.sampling`): any diffusers scheduler (flow matching with the
    resolution-dependent shift, or DDPM / DDIM / DPM-Solver for an ε model with a learned sigma, whose variance
    channels DDPM with a learned ``variance_type`` uses), the folder's :attr:`sampling_defaults`, strict loading,
    step callbacks and the value checks.

    Args:
        transformer: a class-conditional backbone; its forward takes ``class_labels``.
        vae: a diffusers ``AutoencoderKL``.
        scheduler: any diffusers scheduler; None picks the one the transformer's config records it was trained for
            (:func:`~dit.pipelines.schedulers.default_scheduler`).
        id2label: class id -> label, comma-separated synonyms (ImageNet's ``{0: "tench, Tinca tinca", ...}``), as
            diffusers' ``DiTPipeline`` takes it; keys ints or digit strings; recorded in ``model_index.json`` with
            string keys, as JSON has them (:mod:`dit.pipelines.labels`).
    """

    model_cpu_offload_seq = "transformer->vae"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, transformer, vae, scheduler, id2label: dict[str, str] | None = None):
        super().__init__()
        num_classes = transformer.config.get("num_classes")
        if not num_classes:
            raise ValueError(
                f"ClassToImagePipeline needs a class-conditional transformer (num_classes in its config); this "
                f"{type(transformer).__name__} has none: use TextToImagePipeline."
            )
        text = {k: transformer.config.get(k) for k in ("caption_channels", "cross_attention_dim")}
        if any(v is not None for v in text.values()):
            raise ValueError(
                f"ClassToImagePipeline samples class-only models; this {type(transformer).__name__} also attends to "
                f"text ({', '.join(f'{k}={v}' for k, v in text.items() if v is not None)}), which it has none of."
            )
        scheduler = scheduler if scheduler is not None else default_scheduler(transformer)
        check_scheduler(scheduler)
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)
        self.classes = ClassLabels(id2label, num_classes)
        self.register_to_config(id2label=self.classes.id2label)
        self._set_image_processor(vae)

    @property
    def labels(self) -> dict[str, int]:
        """Label name -> class id, sorted by name (diffusers' ``DiTPipeline.labels``); a name shared by several
        classes is left out (ask by id)."""
        return self.classes.names

    @property
    def null_class(self) -> int:
        """The class id of the unconditional branch: ``num_classes``."""
        return self.classes.num_classes

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """diffusers' ``DiTPipeline.get_label_ids``: the class ids of label names. A name that is not a label is a
        ``ValueError`` with the close matches; a case-insensitive match that is unique is taken."""
        return self.classes.get_label_ids(label)

    def check_inputs(
        self, num_inference_steps, timesteps, sigmas, guidance_scale, guidance_channels, eta, num_images_per_label,
        height, width, output_type, tensor_inputs, callback_steps,
    ) -> None:  # fmt: skip
        """Check every call argument that needs no model work, one check per value (:mod:`dit.pipelines.checks`)."""
        check_num_inference_steps(num_inference_steps, timesteps, sigmas)
        check_guidance_scale(guidance_scale)
        self.check_guidance_channels(guidance_channels)
        check_eta(eta)
        check_num_images_per_prompt(num_images_per_label, "num_images_per_label")
        check_image_side("height", height)
        check_image_side("width", width)
        check_outputs(output_type, tensor_inputs, self._callback_tensor_inputs)
        check_callback_steps(callback_steps)

    def _predict(self, latents: torch.Tensor, t, labels: torch.Tensor) -> torch.Tensor:
        """One transformer call (a CFG batch with the null class first when guided), reduced to the latents'
        channels."""
        guided = self.do_classifier_free_guidance
        model_in, timestep = self.model_input(latents, t, guided)
        if guided:
            labels = torch.cat([torch.full_like(labels, self.null_class), labels])  # (2B,)
        extra = {"guidance": self.guidance_scale} if self.guidance_embedded else {}
        pred = self.call_transformer(model_in, timestep=timestep, class_labels=labels, **extra)
        return self.guided_prediction(pred, latents.shape[1], guided)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: ClassLabelsArg,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        *,
        height: int | None = None,
        width: int | None = None,
        num_images_per_label: int = 1,
        guidance_channels: int | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        eta: float = 0.0,
        latents: torch.Tensor | None = None,
        use_resolution_binning: bool = True,
        callback_on_step_end: Callable[..., dict[str, torch.Tensor]] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        callback: Callable[[int, Any, torch.Tensor], None] | None = None,
        callback_steps: int = 1,
    ) -> ImagePipelineOutput | tuple:
        """Generate ``num_images_per_label`` images of each class of ``class_labels``: diffusers'
        ``DiTPipeline.__call__`` (its arguments in its order), then the toolkit's keyword-only ones.

        Args:
            class_labels: a class id, a label name (:attr:`labels`) or a list of them, mixed at will, or a 1-D
                tensor of ids.
            guidance_scale: classifier-free guidance against the null class (1: none); None takes
                :attr:`sampling_defaults` (the folder's ``sampling_defaults.json``, else 4.5).
            generator: one generator, or one per image.
            num_inference_steps: None takes :attr:`sampling_defaults` (else 20).
            output_type: ``pil``, ``np``, ``pt`` or ``latent``.
            return_dict: an ``ImagePipelineOutput`` instead of a tuple.
            height, width: the image size in pixels (None: the model's training size); any aspect ratio.
            num_images_per_label: images per class label (image k of label j is row ``j * n + k``).
            guidance_channels: guide the first k latent channels only, the others keep the conditional prediction
                (FiT's published models guide 3 of 4, as their ``forward_with_cfg``); None takes the folder's
                recorded value, else every channel.
            timesteps, sigmas: an explicit schedule for schedulers that take one.
            eta: DDIM's noise weight (for schedulers that take it).
            latents: initial noise (B, C, H/f, W/f), B = labels x ``num_images_per_label``.
            use_resolution_binning: sample a size that is no multiple of :attr:`size_multiple` at the nearest one and
                resize the image back; False makes such a size an error.
            callback_on_step_end: ``callback(pipe, i, t, {"latents": ...})`` after every step; it may return new
                latents, change ``pipe._guidance_scale`` or set ``pipe._interrupt`` (:mod:`dit.pipelines.callbacks`).
            callback_on_step_end_tensor_inputs: ``["latents"]`` (the only tensor handed out) or ``[]``.
            callback, callback_steps: the legacy ``callback(step, t, latents)`` every ``callback_steps`` steps.

        Raises a ``ValueError`` (:class:`~dit.pipelines.checks.SamplingValueError`) naming the value and its allowed
        range before any work: an unknown label name (with close matches), a class id outside the model's classes,
        and the checks :meth:`TextToImagePipeline.__call__ <dit.pipelines.TextToImagePipeline.__call__>` makes.
        """
        defaults = self.sampling_defaults
        steps = defaults["num_inference_steps"] if num_inference_steps is None else num_inference_steps
        guidance_scale = defaults["guidance_scale"] if guidance_scale is None else guidance_scale
        guidance_channels = defaults.get("guidance_channels") if guidance_channels is None else guidance_channels
        tensor_inputs = callback_tensor_names(callback_on_step_end, callback_on_step_end_tensor_inputs)
        self.check_inputs(
            steps, timesteps, sigmas, guidance_scale, guidance_channels, eta, num_images_per_label, height, width,
            output_type, tensor_inputs, callback_steps,
        )  # fmt: skip
        ids = self.classes.ids(class_labels)
        height, width, sample_h, sample_w = self.sampling_sizes(height, width, use_resolution_binning)
        batch = len(ids) * num_images_per_label
        check_latents(latents, self.latent_shape(batch, sample_h, sample_w))
        self._guidance_scale, self._guidance_channels = guidance_scale, guidance_channels
        self._cross_attention_kwargs, self._interrupt = None, False
        device = self._execution_device

        labels = torch.tensor(ids, device=device).repeat_interleave(num_images_per_label)  # (B,)
        timesteps, steps = self.sampling_timesteps(steps, timesteps, sigmas, sample_h, sample_w, device)
        latents = self.prepare_latents(batch, sample_h, sample_w, self.transformer.dtype, device, generator, latents)

        def predict(state: StepLatents, t) -> torch.Tensor:
            return self._predict(state.latents, t, labels)

        callbacks = StepCallbacks(callback_on_step_end, tensor_inputs, callback, callback_steps)
        step_kwargs = self._step_kwargs(generator, eta)
        latents = self.denoise(StepLatents(latents), timesteps, steps, predict, step_kwargs, callbacks)
        image = self.output_images(latents, output_type, (height, width), (sample_h, sample_w))
        return ImagePipelineOutput(images=image) if return_dict else (image,)

"""What a latent sampling call does whatever conditions it: strict loading, sizes, initial noise, the timesteps (with
the resolution-dependent flow shift), the model input of a step, classifier-free guidance of a prediction, the
denoising loop with its callbacks and decoding. :class:`~dit.pipelines.TextToImagePipeline` and
:class:`~dit.pipelines.ClassToImagePipeline` share them through :class:`LatentSamplingMixin`."""

from __future__ import annotations

import torch
from diffusers.image_processor import PixArtImageProcessor
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import retrieve_timesteps
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

from ..models.base import compile_repeated_blocks
from ..models.capabilities import capability
from ..quantization import check_components
from .callbacks import StepCallbacks
from .checks import MAX_IMAGE_TOKENS, SamplingValueError, check_guidance_channels, check_image_tokens
from .cuda_graphs import CUDAGraphsMixin
from .guidance import classifier_free_guidance
from .loading import folder_components, has_scheduler, local_folder, strict_components
from .low_memory import LowMemoryConfig, LowMemoryMixin, low_memory_config, low_memory_load_kwargs
from .resolution import flow_shift_mu, sampling_size
from .schedulers import initial_noise_sigma

logger = logging.get_logger(__name__)

#: Schedulers that step with a learned variance themselves (``variance_type`` ``learned`` / ``learned_range``):
#: they take a learned-sigma model's 2C channels and split them. Every other scheduler gets the first C.
VARIANCE_SCHEDULERS = ("DDPMScheduler", "DDPMParallelScheduler")
LEARNED_VARIANCES = ("learned", "learned_range")


class LatentSamplingMixin(CUDAGraphsMixin, LowMemoryMixin):
    """The condition-free parts of a latent diffusion pipeline with one of the toolkit's transformers.

    Put before ``DiffusionPipeline`` among the bases (its :meth:`from_pretrained` extends diffusers'). Expects
    ``transformer``, ``vae`` and ``scheduler`` components and :class:`~dit.pipelines.callbacks.CallStateMixin`'s
    call state.
    """

    #: Largest number of image tokens per image a call accepts (see :data:`dit.pipelines.checks.MAX_IMAGE_TOKENS`).
    max_image_tokens: int = MAX_IMAGE_TOKENS

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        *,
        strict: bool = True,
        low_memory: bool | LowMemoryConfig = False,
        **kwargs,
    ):
        """diffusers' ``DiffusionPipeline.from_pretrained``, strict by default: a component whose checkpoint misses
        a key of the model, or holds one the model does not have, is a
        :class:`~dit.checkpoint.CheckpointKeyError` listing them (diffusers would only warn and leave those weights
        random), and a scheduler ``prediction_type`` its class does not implement is a ``ValueError``.

        ``strict=False`` loads as diffusers does. With ``device_map``, diffusers places the components itself and
        only the toolkit's own models (always strict) are checked. The folder's ``sampling_defaults.json`` becomes
        the pipeline's :attr:`sampling_defaults`. A folder without ``scheduler/`` samples with the scheduler its
        transformer's config records (as ``scheduler=None``).

        ``quantization_config`` (diffusers' ``PipelineQuantizationConfig``, e.g.
        :func:`~dit.quantization.quantization_config`) quantizes the components it names, the text encoder
        too; naming a component the folder does not have is an error. ``low_memory=True`` (or a
        :class:`~dit.pipelines.low_memory.LowMemoryConfig`) loads and runs with the low-memory preset
        (:mod:`dit.pipelines.low_memory`).
        """
        folder = local_folder(pretrained_model_name_or_path, kwargs)
        components = folder_components(folder)
        check_components(kwargs.get("quantization_config"), components)
        preset = low_memory_config(low_memory)
        if preset is not None:
            kwargs = low_memory_load_kwargs(preset, kwargs, components)
        if "scheduler" not in kwargs and not has_scheduler(folder):
            kwargs["scheduler"] = None  # the transformer's own (__init__): what its config records it predicts
        if not strict or kwargs.get("device_map") is not None:
            pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        else:
            pipe = super().from_pretrained(folder, **{**strict_components(folder, kwargs), **kwargs})
        pipe.record_sampling_defaults(folder)
        return pipe if preset is None else pipe.enable_low_memory(preset)

    def _set_image_processor(self, vae) -> None:
        """``vae_scale_factor`` (8 without a VAE) and the image processor, from the VAE."""
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = PixArtImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # ----- sizes and noise -----------------------------------------------------------------------------
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

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        """The latents' shape (B, C, H/f, W/f) for ``batch`` images of ``height`` x ``width`` pixels."""
        f = self.vae_scale_factor
        return (batch, self.transformer.config.in_channels, height // f, width // f)

    def prepare_latents(
        self, batch: int, height: int, width: int, dtype, device, generator, latents=None
    ) -> torch.Tensor:
        """Initial noise (B, C, H/f, W/f) scaled by the scheduler's first sigma (:func:`~.schedulers.initial_noise_sigma`:
        ``init_noise_sigma``, 1 for flow matching, EDM's ``sigma_max`` for an EDM scheduler); after ``set_timesteps``."""
        shape = self.latent_shape(batch, height, width)
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"{len(generator)} generators were given for a batch of {batch} images.")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; expected {shape}.")
        return latents.to(device=device, dtype=dtype) * initial_noise_sigma(self.scheduler)

    def sampling_timesteps(
        self, steps: int | None, timesteps, sigmas, sample_h: int, sample_w: int, device
    ) -> tuple[torch.Tensor, int]:
        """The scheduler's timesteps for this call and their count; a flow-matching scheduler with dynamic shifting
        gets ``mu`` from the image token count (:func:`~dit.pipelines.resolution.flow_shift_mu`)."""
        multiple = self.size_multiple
        mu = flow_shift_mu(self.scheduler, (sample_h // multiple) * (sample_w // multiple))
        timesteps, steps = retrieve_timesteps(
            self.scheduler, steps, device, timesteps, sigmas, **({} if mu is None else {"mu": mu})
        )
        self._num_timesteps = len(timesteps)
        return timesteps, steps

    # ----- one step ------------------------------------------------------------------------------------
    @property
    def guidance_embedded(self) -> bool:
        """Whether the transformer takes the guidance scale as an input (an LCM student with ``time_cond_proj_dim``):
        then there is no CFG batch, and ``guidance_scale`` is embedded as LCM's ``w = guidance_scale - 1``."""
        return capability(self.transformer, "embeds_guidance")

    def check_guidance_channels(self, guidance_channels) -> None:
        """None or an int in [1, the transformer's latent channels] (a :class:`SamplingValueError` naming it)."""
        check_guidance_channels(guidance_channels, self.transformer.config.in_channels)

    def _step_kwargs(self, generator, eta: float) -> dict:
        """``eta`` and ``generator`` for the scheduler's ``step``, where it takes them."""
        params = parameter_names(self.scheduler.step)
        kwargs = {"eta": eta} if "eta" in params else {}
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    def model_input(self, latents: torch.Tensor, t, guided: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformer's input for one step: the latents (twice for a CFG batch), scaled as the scheduler wants,
        and the timestep repeated to that batch (B,)."""
        model_in = torch.cat([latents] * 2) if guided else latents  # (B or 2B, C, H, W)
        if hasattr(self.scheduler, "scale_model_input"):  # flow-matching schedulers have none
            model_in = self.scheduler.scale_model_input(model_in, t)
        timestep = torch.as_tensor(t, device=latents.device).reshape(-1).expand(model_in.shape[0])  # (B or 2B,)
        return model_in, timestep

    def guided_prediction(self, pred: torch.Tensor, latent_channels: int, guided: bool) -> torch.Tensor:
        """A transformer output (2B rows, unconditional first, when ``guided``) as the scheduler's model output.

        Guided: ``classifier_free_guidance`` on the first :attr:`guidance_channels` latent channels (None: all C);
        a learned variance (``out_channels = 2C``) is never guided, it keeps the conditional branch as DiT's and
        FiT's ``forward_with_cfg`` do. Then a learned-sigma output keeps its mean (the first C channels) unless the
        scheduler steps with the learned variance itself (:data:`VARIANCE_SCHEDULERS`).
        """
        if guided:
            channels = self.guidance_channels or latent_channels  # (2B, C or 2C, H, W) -> (B, C or 2C, H, W)
            pred = classifier_free_guidance(*pred.chunk(2), self.guidance_scale, min(channels, latent_channels))
        if pred.shape[1] == 2 * latent_channels and not steps_with_learned_variance(self.scheduler):
            pred = pred[:, :latent_channels]  # learned sigma: keep the mean prediction (B, C, H, W)
        return pred

    # ----- the loop and the output ------------------------------------------------------------------------
    def denoise(self, state, timesteps, steps: int, predict, step_kwargs: dict, callbacks: StepCallbacks):
        """Run the scheduler over ``timesteps``: ``predict(state, t)`` gives the model output of each step, the
        scheduler steps ``state.latents``, then the callbacks run (:class:`~dit.pipelines.callbacks.StepCallbacks`).
        A step-end callback that sets ``pipe._interrupt`` skips the remaining steps. Returns the final latents.
        With :meth:`enable_cuda_graphs`, ``predict``'s transformer calls replay CUDA graphs (:mod:`.cuda_graphs`)."""
        with self.progress_bar(total=steps) as progress, self.cuda_graphs_session():
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                pred = predict(state, t)
                state.latents = self.scheduler.step(pred, t, state.latents, **step_kwargs, return_dict=False)[0]
                callbacks.after_step(self, state, i, t, len(timesteps), steps)
                progress.update()
        return state.latents

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

    def output_images(self, latents: torch.Tensor, output_type: str, size: tuple[int, int], sampled: tuple[int, int]):
        """The call's images: decoded, resized back to ``size`` (height, width) when sampled at another size, in
        ``output_type``; frees the offload hooks."""
        image = self.decode(latents, output_type)
        if output_type != "latent":
            if sampled != size:
                image = self.image_processor.resize_and_crop_tensor(image, size[1], size[0])
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        return image

    def compile_transformer(self, regional: bool = True, **compile_kwargs) -> int:
        """Compile the transformer in place; returns the number of compiled modules.

        ``regional=True`` (default): its repeated blocks, and a ControlNet adapter's (regional compilation, as
        diffusers' ``compile_repeated_blocks``): one graph shared by all blocks, compiled in seconds, reused at every
        step. The text reaching the blocks is trimmed to a few fixed lengths (64, 128, ... tokens), so a new prompt
        length costs at most one recompilation per length bucket.

        ``regional=False``: the whole transformer in one graph (for inference: no host work between blocks;
        ``mode="reduce-overhead"`` adds torch's own CUDA graphs, so do not combine it with :meth:`enable_cuda_graphs`,
        which is refused). Compiles longer, once per shape. Not for a pipeline with ControlNet adapters (their
        controls enter the forward as modules; refused): compile those regionally.

        ``fullgraph=True`` and ``dynamic=False`` unless given (a graph break is an error; each shape gets its own
        static graph: torch's automatic dynamic shapes would compile the second shape it meets with symbolic sizes,
        generic kernels and more guards, which made regional compile slower than eager on an H200); other keyword
        arguments go to ``torch.compile`` (``mode=...``, ``backend=...``).
        """
        compile_kwargs = {"fullgraph": True, "dynamic": False, **compile_kwargs}
        controlnet = getattr(self, "controlnet", None)
        if not regional:
            return self._compile_whole(controlnet, compile_kwargs)
        count = compile_repeated_blocks(self.transformer, **compile_kwargs)
        if controlnet is not None:
            count += compile_repeated_blocks(controlnet, **compile_kwargs)
        return count

    def _compile_whole(self, controlnet, compile_kwargs: dict) -> int:
        """``compile_transformer(regional=False)``: the transformer as one compiled module."""
        if controlnet is not None:
            raise ValueError("compile_transformer(regional=False) compiles the transformer alone, and this pipeline "
                             "has ControlNet adapters: compile regionally (the default), which covers them too.")  # fmt: skip
        if compile_kwargs.get("mode") == "reduce-overhead" and self.cuda_graphs is not None:
            raise ValueError("mode='reduce-overhead' captures CUDA graphs of its own: call disable_cuda_graphs() "
                             "first, or compile with another mode.")  # fmt: skip
        self.transformer.compile(**compile_kwargs)
        self._whole_compile_mode = compile_kwargs.get("mode")
        return 1


def steps_with_learned_variance(scheduler) -> bool:
    """Whether ``scheduler`` takes a learned-sigma output whole (DDPM with a learned ``variance_type``)."""
    learned = getattr(scheduler, "config", {}).get("variance_type") in LEARNED_VARIANCES
    return learned and type(scheduler).__name__ in VARIANCE_SCHEDULERS


def parameter_names(function) -> tuple[str, ...]:
    """The parameter names of a plain Python function or bound method (a scheduler's ``step``)."""
    code = function.__code__
    return code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]


def check_outputs(output_type: str, tensor_inputs: list[str], allowed_tensors: list[str]) -> None:
    """``output_type`` is one the pipeline writes; the callback asks only for tensors it hands out."""
    if output_type not in ("pil", "np", "pt", "latent"):
        raise SamplingValueError(f"Unknown output_type {output_type!r}; use 'pil', 'np', 'pt' or 'latent'.")
    unknown = set(tensor_inputs) - set(allowed_tensors)
    if unknown:
        raise SamplingValueError(f"callback_on_step_end_tensor_inputs {sorted(unknown)} are not in {allowed_tensors}.")

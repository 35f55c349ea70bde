"""Small mixins, one concern each, composed by the backbones and the ControlNet adapter (before ``ModelMixin`` in
the bases): the attention backend, diffusers' attention-processor API, the block runner with gradient checkpointing
and the capabilities a backbone declares to pipelines and the trainer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers.models.attention import AttentionMixin
from diffusers.utils import logging

from ..nn.attention import DiTAttention, DiTAttnProcessor, resolve_backend
from ..nn.attention.backends import AttentionBackend, get_backend
from ..nn.attention.processors import FusedDiTAttnProcessor
from ..nn.context import BlockContext
from .activation_checkpointing import selective_checkpointing_func

logger = logging.get_logger(__name__)

# Other names of our own backends (diffusers' names run through its dispatcher, see dit.nn.attention.backends).
BACKEND_ALIASES = {"torch": "sdpa"}


class AttentionBackendMixin:
    """The softmax kernel of every :class:`~dit.nn.attention.DiTAttention` inside the model, chosen by name."""

    _attention_backend_name: str = "sdpa"
    _resolved_backend: tuple[tuple[str, torch.device], AttentionBackend] | None = None

    def set_attention_backend(self, backend: str) -> None:
        """Choose the softmax kernel: ``sdpa`` (default), ``math`` (plain reference), ``xformers`` (CUDA), or any of
        diffusers' backend names (``native``, ``_native_math``, ``flash``, ``flex``, ``sage``, ...), which run through
        diffusers' ``dispatch_attention_fn``; one diffusers cannot use here (``flash`` without flash-attn) is an error
        saying why.

        Every attention module gets the kernel now, so the forward reads a fixed attribute (nothing a compiled graph
        would see change); only ``xformers`` is resolved per device at the first forward (SDPA where it cannot run).
        """
        name = BACKEND_ALIASES.get(backend, backend)
        get_backend(name)  # unknown names fail here, with the list of known ones
        self._attention_backend_name = name
        self._resolved_backend = None
        if name != "xformers":
            self._push_backend(get_backend(name))

    def set_use_memory_efficient_attention_xformers(self, valid: bool, attention_op=None) -> None:
        """Called by diffusers' ``enable_xformers_memory_efficient_attention()``."""
        self.set_attention_backend("xformers" if valid else "sdpa")

    def _push_backend(self, backend: AttentionBackend) -> None:
        for module in self.modules():
            if isinstance(module, DiTAttention):
                module.backend = backend

    def _attention_backend(self, device: torch.device) -> AttentionBackend:
        """The backend for this forward. ``sdpa`` and ``math`` run anywhere and were pushed to the modules when set;
        ``xformers`` is resolved for ``device`` (and pushed) when the device changes."""
        if self._attention_backend_name != "xformers":
            return get_backend(self._attention_backend_name)
        key = (self._attention_backend_name, device)
        if self._resolved_backend is not None and self._resolved_backend[0] == key:
            return self._resolved_backend[1]
        backend = resolve_backend(self._attention_backend_name, device)
        self._push_backend(backend)
        self._resolved_backend = (key, backend)
        return backend


class AttentionProcessorMixin(AttentionMixin):
    """diffusers' attention-processor API over the model's :class:`~dit.nn.attention.DiTAttention` modules (diffusers'
    ``AttentionMixin``): ``attn_processors`` (by name, ``transformer_blocks.0.attn1.processor``, ...),
    ``set_attn_processor`` (one for all, or a dict by name), :meth:`set_default_attn_processor`,
    ``fuse_qkv_projections`` / ``unfuse_qkv_projections`` (exact; the state dict keeps its keys).

    The default processor, :class:`~dit.nn.attention.DiTAttnProcessor`, runs the toolkit's kernels (backends, linear
    attention, KV compression, RoPE, masks); any other is called as diffusers calls processors (PAG's, a user's)."""

    def set_default_attn_processor(self) -> None:
        """Every attention module back to :class:`~dit.nn.attention.DiTAttnProcessor`."""
        self.set_attn_processor(DiTAttnProcessor())

    def fuse_qkv_projections(self) -> None:
        """diffusers' QKV fusion; the default processors become ``FusedDiTAttnProcessor`` (the same computation,
        named for the state as diffusers' fused processors are), the others stay. ``original_attn_processors`` keeps
        the processors from before, as in diffusers."""
        self.original_attn_processors = self.attn_processors
        super().fuse_qkv_projections()
        fused = FusedDiTAttnProcessor()
        processors = self.original_attn_processors.items()
        self.set_attn_processor({name: fused if type(p) is DiTAttnProcessor else p for name, p in processors})

    def unfuse_qkv_projections(self) -> None:
        """diffusers' unfusing; each ``FusedDiTAttnProcessor`` becomes a :class:`~dit.nn.attention.DiTAttnProcessor`
        again, the other processors stay (one set while fused included)."""
        super().unfuse_qkv_projections()
        plain = DiTAttnProcessor()
        processors = self.attn_processors.items()
        self.set_attn_processor({name: plain if type(p) is FusedDiTAttnProcessor else p for name, p in processors})

    def _ignore_attention_kwargs(self, cross_attention_kwargs: dict[str, Any] | None) -> None:
        """Keys of ``cross_attention_kwargs`` besides the LoRA ``scale`` (taken by ``apply_lora_scale``) are not read;
        they are ignored with diffusers' warning, as diffusers' PixArt model ignores those its processors lack."""
        if cross_attention_kwargs:
            logger.warning(
                f"cross_attention_kwargs {sorted(cross_attention_kwargs)} are not expected by {type(self).__name__} "
                "and will be ignored."
            )


class BlockRunnerMixin:
    """Runs one block on ``(hidden_states, context)``, through diffusers' gradient checkpointing when it is enabled
    (``enable_gradient_checkpointing()``, non-reentrant: the :class:`BlockContext` passes through as it is). The
    class sets ``self.gradient_checkpointing = False`` in ``__init__``, the attribute diffusers switches."""

    def enable_gradient_checkpointing(
        self, gradient_checkpointing_func: Callable | None = None, *, selective: bool = False
    ) -> None:
        """diffusers' gradient checkpointing of every block (full recompute in backward); ``selective=True``: keep
        the outputs of the blocks' matmuls and attention kernels and recompute only the cheap ops
        (:mod:`~dit.models.activation_checkpointing`), for less recompute at more memory than full checkpointing."""
        if selective and gradient_checkpointing_func is not None:
            raise ValueError("enable_gradient_checkpointing: pass gradient_checkpointing_func or selective=True.")
        func = selective_checkpointing_func if selective else gradient_checkpointing_func
        super().enable_gradient_checkpointing(func)

    def _run_block(self, block: torch.nn.Module, hidden_states: torch.Tensor, context: BlockContext):
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, hidden_states, context)
        return block(hidden_states, context)


class RecordedPrediction:
    """The ``prediction_type`` a backbone's config records (``epsilon``, ``v_prediction``, ``sample``, ``flow``; None:
    unknown), read on an instance; on the class, the default of its config field. Pipelines given ``scheduler=None``
    sample with the matching scheduler."""

    def __init__(self, default: str | None):
        self.default = default

    def __get__(self, instance, owner=None) -> str | None:
        if instance is None:
            return self.default
        return instance.config.get("prediction_type", self.default)


class BackboneMixin:
    """What a backbone declares about itself, read by pipelines and the trainer instead of probing signatures.

    Class attributes (the defaults here; each backbone sets its own):

    - ``supports_token_masking``: ``forward`` takes ``keep_indices`` (training on a subset of patch tokens).
    - ``supports_image_sizes``: ``forward`` takes per-sample ``image_sizes`` (a padded batch of mixed sizes).
    - ``supports_block_controls``: ``forward`` takes ``block_controls`` (ControlNet adapters run in its block loop).
    - ``prediction_type``: what the model predicts, recorded in its config (:class:`RecordedPrediction`).
    - ``native_resolution``: trained at native sizes (pipelines skip PixArt's aspect-ratio bins).
    - ``use_additional_conditions``: PixArt-α's resolution / aspect-ratio micro-conditions (set per instance).
    """

    supports_token_masking: bool = False
    supports_image_sizes: bool = False
    supports_block_controls: bool = False
    native_resolution: bool = False
    use_additional_conditions: bool = False

    #: What the model predicts: its config's ``prediction_type`` on an instance, the class's default on the class.
    prediction_type = RecordedPrediction(None)

    @property
    def needs_full_grid(self) -> bool:
        """Whether a self-attention needs the full token grid (KV compression or a value convolution)."""
        return any(block.attn1.needs_grid for block in self.transformer_blocks)

    @property
    def has_null_caption(self) -> bool:
        """Whether the model keeps a learned null caption (``y_embedding``, see ``null_caption``)."""
        return getattr(self, "y_embedding", None) is not None

    @property
    def embeds_guidance(self) -> bool:
        """Whether ``forward`` takes the guidance scale itself (``guidance``: an LCM student with
        ``time_cond_proj_dim``), so a pipeline runs no CFG batch."""
        return getattr(self.config, "time_cond_proj_dim", None) is not None

    @property
    def text_embed_dim(self) -> int | None:
        """Width the ``encoder_hidden_states`` must have."""
        return self.config.caption_channels or self.config.cross_attention_dim

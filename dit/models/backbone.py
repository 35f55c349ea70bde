"""The backbone contract: :class:`DiTBackbone`, the base of every backbone family, owns the forward skeleton (checks,
attention backend, block loop with ``block_controls``, output head) and derives from one class attribute what the
rest of the toolkit needs to know about a family."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import apply_lora_scale
from torch import nn

from ..nn.attention.backends import AttentionBackend
from ..nn.context import BlockContext
from ..nn.normalization import output_head
from .cache import StepCacheMixin, register_cache_block
from .inputs import check_inputs
from .mixins import AttentionBackendMixin, AttentionProcessorMixin, BackboneMixin, BlockRunnerMixin
from .strict_io import StrictIOMixin

__all__ = ["BACKBONES", "REQUIRED_CONFIG", "DiTBackbone", "ForwardInputs", "ForwardState"]

#: Backbone class name -> class: every subclass of :class:`DiTBackbone`, listed when it is defined (read it through
#: :func:`dit.models.registry.backbone_class`, which also imports the built-in families).
BACKBONES: dict[str, type] = {}
#: Config fields every backbone has (pipelines, the trainer and ControlNet read them).
REQUIRED_CONFIG = ("num_attention_heads", "attention_head_dim", "in_channels", "num_layers", "patch_size",
                   "sample_size", "caption_channels", "prediction_type", "noise_shift")  # fmt: skip


@dataclass(frozen=True)
class ForwardInputs:
    """The inputs every backbone's forward takes, by name (a family's own inputs go to :meth:`DiTBackbone.prepare`
    as keywords).

    Args:
        hidden_states: latents (B, in_channels, H, W).
        encoder_hidden_states: text features (B, L, D_text), or None.
        timestep: (B,) or a scalar.
        encoder_attention_mask: text keep-mask (B, L) or additive bias (B, 1, L), or None.
        added_cond_kwargs: diffusers' extra conditions (PixArt-α's micro-conditions), or None.
        guidance: the guidance scale of a model that embeds it, or None.
        block_controls: the hook called after every block (ControlNet), or None.
    """

    hidden_states: torch.Tensor
    encoder_hidden_states: torch.Tensor | None = None
    timestep: torch.Tensor | float | None = None
    encoder_attention_mask: torch.Tensor | None = None
    added_cond_kwargs: dict[str, Any] | None = None
    guidance: torch.Tensor | float | None = None
    block_controls: Callable[..., torch.Tensor] | None = None


@dataclass
class ForwardState:
    """What a family's :meth:`DiTBackbone.prepare` builds once per forward and the skeleton carries to the end;
    families subclass it for what their :meth:`~DiTBackbone.mix_and_mask` and :meth:`~DiTBackbone.unpatchify`
    read (a token layout, kept indices, ...).

    Args:
        tokens: embedded image tokens (B, N, D), before any patch mixer or token masking; released (None) once
            :meth:`~DiTBackbone.mix_and_mask` has made the blocks' input, so the hooks after it must not read it.
        context: the blocks' :class:`~dit.nn.context.BlockContext` (for the tokens the blocks run on).
        embedding: the condition of the output head (B, D).
    """

    tokens: torch.Tensor | None
    context: BlockContext
    embedding: torch.Tensor


class DiTBackbone(
    BackboneMixin,
    AttentionBackendMixin,
    AttentionProcessorMixin,
    BlockRunnerMixin,
    StrictIOMixin,
    StepCacheMixin,
    ModelMixin,
    ConfigMixin,
    PeftAdapterMixin,
):
    """Base of every backbone family: a diffusers model whose forward is one skeleton with family hooks.

    The forward (:meth:`run_forward`) checks the inputs, picks the attention backend, asks the family to
    :meth:`prepare` (embed the latents, build the :class:`~dit.nn.context.BlockContext`), lets it
    :meth:`mix_and_mask` the tokens, runs ``transformer_blocks`` (:meth:`run_blocks`, the one block loop, calling
    ``block_controls`` after each block), applies the adaLN output head and asks the family to :meth:`unpatchify`.

    **The contract** a family fills in (a test, ``tests/models/test_backbone_contract.py``, checks every registered
    class, and builds a toy family that runs through pipelines, the trainer, ControlNet and the step caches):

    - ``block_class`` (class attribute): the repeated block, called ``block(hidden_states, context)`` and returning
      the hidden states, with its self-attention at ``attn1`` and its cross-attention at ``attn2`` (a
      :class:`~dit.nn.attention.DiTAttention`, or None), so diffusers' processors, PEFT targets and caches find them.
      Regional compilation (``_repeated_blocks``), the FSDP wrap unit (``_no_split_modules``, read by accelerate's
      ``TRANSFORMER_BASED_WRAP`` when no class is named), diffusers' cache-hook registry and ControlNet's repeated
      blocks derive from it; the class is listed in :data:`BACKBONES` (training configs' ``model.cls``, ControlNet's
      ``transformer_class``, a folder's ``_class_name``, a distillation teacher) when it is defined, and its module
      gets the name ``ModelMixin`` diffusers' pipeline loader looks up there.
    - modules: ``transformer_blocks`` (an ``nn.ModuleList`` of ``block_class``), the output head of
      :func:`~dit.nn.normalization.add_output_head` (``norm_out`` with ``scale_shift_table`` or its own ``linear``,
      then ``proj_out``), and
      ``self.gradient_checkpointing = False`` set in ``__init__``.
    - config fields (``@register_to_config`` on ``__init__``): :data:`REQUIRED_CONFIG`; ``cross_attention_dim``
      when text enters without a caption projection.
    - hooks: :meth:`prepare` and :meth:`unpatchify` (required), :meth:`mix_and_mask` (token masking, a patch
      mixer), :meth:`control_tokens` (ControlNet, with ``supports_block_controls``).
    - capabilities (class attributes of :class:`~dit.models.mixins.BackboneMixin`): ``supports_token_masking``,
      ``supports_image_sizes``, ``supports_block_controls``, ``native_resolution``, ``prediction_type``.

    The default :meth:`forward` takes diffusers' PixArt arguments plus ``block_controls`` and ``guidance``; a family
    with inputs of its own (image sizes, class labels, token masking) overrides it with its full signature and
    calls :meth:`run_forward` with them by name.
    """

    #: The repeated block of this family (see the class docstring).
    block_class: ClassVar[type[nn.Module]]
    _supports_gradient_checkpointing = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        block = getattr(cls, "block_class", None)
        if not (isinstance(block, type) and issubclass(block, nn.Module)):
            raise TypeError(f"{cls.__name__} must set block_class, the nn.Module class of its repeated block.")
        if "_repeated_blocks" not in cls.__dict__:
            cls._repeated_blocks = [block.__name__]
        if not getattr(cls, "_no_split_modules", None):
            cls._no_split_modules = [block.__name__]
        register_cache_block(block)
        # diffusers' pipeline loader looks the name `ModelMixin` up in the module model_index.json records
        module = sys.modules.get(cls.__module__)
        if module is not None and not hasattr(module, "ModelMixin"):
            module.ModelMixin = ModelMixin
        known = BACKBONES.get(cls.__name__)
        if known is not None and known is not cls and known.__module__ != cls.__module__:
            raise TypeError(
                f"Two backbone classes are called {cls.__name__}: {known.__module__} and {cls.__module__}."
            )
        BACKBONES[cls.__name__] = cls

    @apply_lora_scale("cross_attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        timestep: torch.Tensor | float | None = None,
        added_cond_kwargs: dict[str, Any] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
        block_controls: Callable[..., torch.Tensor] | None = None,
        guidance: torch.Tensor | float | None = None,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Predict for latents (B, in_channels, H, W): the arguments of :class:`ForwardInputs`, plus
        ``cross_attention_kwargs`` (``{"scale": s}`` scales loaded LoRA layers; other keys are ignored with diffusers'
        warning) and ``return_dict``."""
        inputs = ForwardInputs(
            hidden_states, encoder_hidden_states, timestep, encoder_attention_mask, added_cond_kwargs, guidance,
            block_controls,
        )  # fmt: skip
        return self.run_forward(inputs, return_dict=return_dict, cross_attention_kwargs=cross_attention_kwargs)

    def run_forward(
        self,
        inputs: ForwardInputs,
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        **family_inputs: Any,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """The forward skeleton; ``family_inputs`` go to :meth:`prepare` by name."""
        check_inputs(self, inputs.hidden_states, inputs.encoder_hidden_states, inputs.timestep)
        self._ignore_attention_kwargs(cross_attention_kwargs)
        backend = self._attention_backend(inputs.hidden_states.device)

        state = self.prepare(inputs, backend, **family_inputs)  # tokens (B, N, D), context, embedding (B, D)
        # the blocks' input is handed over, not kept here: no frame holds it once the first block made a new tensor
        x = self.run_blocks(self.transformer_blocks, self._blocks_input(state), state.context, inputs.block_controls)
        x = output_head(self, x, state.embedding)  # (B, K, p*p*C)
        output = self.unpatchify(x, state)  # (B, C, H, W)
        return Transformer2DModelOutput(sample=output) if return_dict else (output,)

    def _blocks_input(self, state: ForwardState) -> torch.Tensor:
        """The tokens the blocks run on, (B, K, D); ``state.tokens`` is released."""
        hidden_states = self.mix_and_mask(state)  # (B, K, D)
        state.tokens = None
        return hidden_states

    def run_blocks(
        self,
        blocks: nn.ModuleList,
        hidden_states: torch.Tensor,
        context: BlockContext,
        block_controls: Callable[..., torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run ``blocks`` in order on ``hidden_states`` (B, N, D) with ``context`` (through gradient checkpointing
        when enabled), calling ``block_controls(index, hidden_states, context)`` after each block when given."""
        for index, block in enumerate(blocks):
            hidden_states = self._run_block(block, hidden_states, context)  # (B, N, D)
            if block_controls is not None:
                hidden_states = block_controls(index, hidden_states, context)  # (B, N, D)
        return hidden_states

    # ----- the family's hooks --------------------------------------------------------------------------------
    def prepare(self, inputs: ForwardInputs, backend: AttentionBackend, **family_inputs: Any) -> ForwardState:
        """Embed the latents and build the blocks' context (masks with ``backend``): the forward's state."""
        raise NotImplementedError(f"{type(self).__name__} must implement prepare (see DiTBackbone).")

    def mix_and_mask(self, state: ForwardState) -> torch.Tensor:
        """The tokens the blocks run on, (B, K, D): ``state.tokens`` unless the family mixes or drops tokens."""
        return state.tokens

    def unpatchify(self, hidden_states: torch.Tensor, state: ForwardState) -> torch.Tensor:
        """The output head's tokens (B, K, p*p*C) back to an image (B, C, H, W)."""
        raise NotImplementedError(f"{type(self).__name__} must implement unpatchify (see DiTBackbone).")

    def control_tokens(self, controlnet_cond: torch.Tensor, context: BlockContext) -> torch.Tensor:
        """A ControlNet's control latent (B, C, H, W) as tokens like the latents, (B, N, D) (families with
        ``supports_block_controls``)."""
        raise NotImplementedError(f"{type(self).__name__} takes no ControlNet (no control_tokens).")

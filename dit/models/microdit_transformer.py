"""MicroDiT ("Stretching Each Dollar", arXiv 2407.15811): a patch-mixer before deferred token masking, expert-choice
MoE feed-forwards in every other block, and optional layer-wise width scaling, on the PixArt backbone."""

from __future__ import annotations

import inspect
import numbers
from dataclasses import replace

import torch
from diffusers.configuration_utils import register_to_config

# diffusers' pipeline loader looks the name `ModelMixin` up in the module that model_index.json records.
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..nn.blocks import FeedForward, PixArtBlock
from ..nn.masking import gather_tokens
from ..nn.moe import ExpertChoiceFeedForward, moe_routing_stats
from .attention_config import self_attention_spec
from .config_checks import check_positive_ints
from .pixart_transformer import PixArtState, PixArtTransformer

__all__ = ["MicroDiTTransformer", "ModelMixin"]

#: MicroDiT's options and their defaults (the rest of the config is PixArt's).
MICRODIT_DEFAULTS = {
    "patch_mixer_layers": 2,
    "deferred_masking": True,
    "num_experts": 8,
    "expert_capacity": 2.0,
    "experts_every_n": 2,
    "attention_multipliers": None,
    "ffn_multipliers": None,
}


class MicroDiTTransformer(PixArtTransformer):
    """PixArt-style transformer with MicroDiT's micro-budget training pieces.

    - ``patch_mixer``: ``patch_mixer_layers`` PixArt blocks (self-attention, cross-attention to the caption, MLP,
      adaLN-single modulation) that run on **all** tokens before masking, so the kept tokens carry information about
      the masked ones. With ``keep_indices`` in ``forward`` (training; :mod:`dit.nn.masking`) the backbone
      ``transformer_blocks`` then run on the kept tokens only and the output is zero at masked patches. Inference
      passes no ``keep_indices`` and never masks; the mixer is part of the model there too.
    - ``deferred_masking=False`` masks before the mixer (naive masking, for the ablation).
    - ``num_experts``: expert-choice MoE feed-forward (:class:`~dit.nn.moe.ExpertChoiceFeedForward`, capacity factor
      ``expert_capacity``) in blocks ``i`` with ``(i + 1) % experts_every_n == 0``, the last backbone block excepted,
      in the mixer and the backbone; None: dense MLPs everywhere. :meth:`routing_stats` reports expert utilisation.
    - Layer-wise scaling: ``attention_multipliers=(lo, hi)`` scales the attention width (heads of
      ``attention_head_dim``) and ``ffn_multipliers=(lo, hi)`` the MLP width (x token width) linearly from the
      first backbone block to the last (MicroDiT: (0.5, 1.0) and (0.5, 4.0)); None: uniform widths.

    Everything else (config, keys, forward, pipelines, LoRA) is :class:`PixArtTransformer`'s.
    """

    _no_split_modules = ["PixArtBlock", "PatchEmbed"]

    @register_to_config  # records PixArt's fields and MicroDiT's (its signature below) before the blocks are built
    def __init__(self, *args, **kwargs):
        micro = {name: kwargs.pop(name, default) for name, default in MICRODIT_DEFAULTS.items()}
        _validate(micro)
        super().__init__(*args, **kwargs)  # its blocks read MicroDiT's options from self.config (build_block)
        mixer = range(self.config.patch_mixer_layers)
        self.patch_mixer = nn.ModuleList(
            [self.pixart_block(feed_forward=self._moe(index, 4 * self.inner_dim)) for index in mixer]
        )

    # ----- construction -------------------------------------------------------------------------------------
    def build_block(self, index: int) -> PixArtBlock:
        """Backbone block ``index``: PixArt's, with layer-wise scaled widths and an expert-choice MoE in every
        ``experts_every_n``-th block."""
        cfg = self.config
        depth, inner, heads = cfg.num_layers, 4 * self.inner_dim, None
        if cfg.attention_multipliers is not None:
            heads = max(1, round(_linear_at(cfg.attention_multipliers, index, depth) * cfg.num_attention_heads))
        if cfg.ffn_multipliers is not None:
            inner = max(1, round(_linear_at(cfg.ffn_multipliers, index, depth) * self.inner_dim))
        feed_forward = self._moe(index, inner, last=depth - 1) or FeedForward(
            self.inner_dim, dropout=cfg.dropout, activation_fn=cfg.activation_fn, inner_dim=inner
        )
        return self.pixart_block(self_attention_spec(cfg, index), attention_heads=heads, feed_forward=feed_forward)

    def _moe(self, index: int, inner_dim: int, last: int | None = None) -> ExpertChoiceFeedForward | None:
        """An expert-choice MoE for block ``index`` (never block ``last``), or None for a dense MLP there."""
        cfg = self.config
        if cfg.num_experts is None or (index + 1) % cfg.experts_every_n or index == last:
            return None
        return ExpertChoiceFeedForward(self.inner_dim, cfg.num_experts, cfg.expert_capacity, inner_dim)

    # ----- forward pieces -----------------------------------------------------------------------------------
    def mix_and_mask(self, state: PixArtState) -> torch.Tensor:
        """Patch-mixer on all tokens then masking (deferred), or masking then the mixer (naive): (B, N, D) ->
        (B, K, D). The mixer runs with the context of all tokens, or of the kept ones (naive), and attends over
        every token it gets (no image-token ``attention_mask``)."""
        x, keep_indices, context = state.tokens, state.keep_indices, state.full_context
        naive = keep_indices is not None and not self.config.deferred_masking
        if naive:
            x, context = gather_tokens(x, keep_indices), state.context  # (B, K, D)
        if context.attention_mask is not None:
            context = replace(context, attention_mask=None)
        x = self.run_blocks(self.patch_mixer, x, context)  # (B, N or K, D)
        if keep_indices is None or naive:
            return x
        return gather_tokens(x, keep_indices)  # (B, K, D)

    def routing_stats(self) -> dict[str, float]:
        """Expert utilisation of the last forward, averaged over the MoE layers: ``token_coverage`` (share of tokens
        taken by at least one expert), ``experts_per_token`` and ``max_experts_per_token``; {} without experts."""
        return moe_routing_stats(self)


def _linear_at(bounds, index: int, depth: int) -> float:
    low, high = bounds
    return low if depth == 1 else low + (high - low) * index / (depth - 1)


def _validate(micro: dict) -> None:
    mixer = micro["patch_mixer_layers"]
    if isinstance(mixer, bool) or not isinstance(mixer, numbers.Integral) or mixer < 0:
        raise ValueError(f"patch_mixer_layers must be an int >= 0, got {mixer!r}.")
    check_positive_ints(experts_every_n=micro["experts_every_n"])
    check_positive_ints(optional=True, num_experts=micro["num_experts"])
    capacity = micro["expert_capacity"]
    if isinstance(capacity, bool) or not isinstance(capacity, numbers.Real) or not capacity > 0:
        raise ValueError(f"expert_capacity must be a number > 0, got {capacity!r}.")
    for name in ("attention_multipliers", "ffn_multipliers"):
        value = micro[name]
        if value is not None and (len(value) != 2 or min(value) <= 0):
            raise ValueError(f"{name} must be two positive numbers (first block, last block), got {value!r}.")


# diffusers reads a class's config fields (and their defaults) from the signature of its __init__, both when
# loading (the decorated function) and in register_to_config (the function it wraps).
MicroDiTTransformer.__init__.__signature__ = MicroDiTTransformer.__init__.__wrapped__.__signature__ = (
    inspect.signature(PixArtTransformer.__init__).replace(
        parameters=[
            *inspect.signature(PixArtTransformer.__init__).parameters.values(),
            *(inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in MICRODIT_DEFAULTS.items()),
        ]
    )
)

"""MicroDiT as published ("Stretching Each Dollar", arXiv 2407.15811; Sony's ``micro_diffusion`` ``DiT``): the
network of the released MicroDiT_XL_2 checkpoints, on the backbone contract.

Loads those checkpoints exactly through :func:`dit.convert.load_original_microdit`. The toolkit's older
:class:`~dit.models.microdit_transformer.MicroDiTTransformer` is PixArt's network with MicroDiT's training pieces
(patch mixer, deferred masking, expert-choice MoE); this one is the original network.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.utils import apply_lora_scale, logging
from torch import nn

from ..nn.attention import AttentionMask
from ..nn.attention.backends import AttentionBackend
from ..nn.blocks import SwiGLUFeedForward
from ..nn.context import BlockContext
from ..nn.embeddings import CaptionProjection, PatchEmbed, TimestepEmbedding, timestep_sinusoid
from ..nn.masking import gather_tokens
from ..nn.microdit_block import (
    MicroDiTBlock,
    MicroDiTCaptionBlock,
    NormProjection,
    attention_width,
    expert_hidden,
    swiglu_hidden,
)
from ..nn.moe import ExpertChoiceFeedForward, moe_routing_stats
from ..nn.normalization import add_output_head
from ..nn.packing import unpatchify
from .backbone import DiTBackbone, ForwardInputs, ForwardState
from .config_checks import check_positive_ints, check_prediction_record
from .inputs import check_guidance, text_tokens

__all__ = ["MicroDiTOriginalTransformer", "TIMESTEP_FREQUENCIES"]

logger = logging.get_logger(__name__)

#: Width of MicroDiT's sinusoidal timestep embedding (256 frequencies, [cos, sin]).
TIMESTEP_FREQUENCIES = 512


@dataclass
class MicroDiTOriginalState(ForwardState):
    """The forward state: the patch mixer's context (its width, all tokens or, naive masking, the kept ones), the
    kept patch indices (B, K) of token masking (None: all) and the token grid (h, w)."""

    mixer_context: BlockContext | None = None
    keep_indices: torch.Tensor | None = None
    grid: tuple[int, int] = (0, 0)


class MicroDiTOriginalTransformer(DiTBackbone):
    """MicroDiT (Sony's ``micro_diffusion`` ``DiT``) with diffusers' module names; loads the released checkpoints.

    Forward: ``model(x, timestep=c_noise, encoder_hidden_states=y, keep_indices=ids_keep)`` is the original's
    ``DiT(x, t, y)`` with the masking draw ``ids_keep``: ``c_noise = ln(sigma) / 4`` (EDM; the preconditioning
    ``c_in``, ``c_skip``, ``c_out`` with sigma_data 0.9 is outside the network), ``y`` (B, L, caption_channels) text
    features (the original's are open_clip DFN5B-CLIP-ViT-H-14-378 token features after ``ln_final``, 77 x 1024;
    any CLIP text model giving (B, 77, 1024) fits the shape), the output EDM's ``F`` (B, out_channels, H, W).

    Network: patch embedding + fixed 2D sin-cos positions; timestep -> 512 frequencies -> ``timestep_embedder``
    (GELU(tanh) MLP); captions -> ``caption_projection`` (MLP with a bias-free LayerNorm) -> ``caption_refiner``
    (a pre-norm transformer block over the caption tokens: the cross-attention context); condition ``c`` = timestep
    embedding + ``pooled_caption_projection`` of the mean caption token; ``patch_mixer`` blocks (width
    ``patch_mixer_dim``, joined to the backbone by ``patch_mixer_proj_in`` / ``_proj_out`` / ``_proj_text`` when
    narrower) on all tokens, then token masking, then the ``transformer_blocks`` (:class:`MicroDiTBlock`: per-block
    adaLN from GELU(tanh) of ``c``, QK-normed attentions, SwiGLU or expert-choice MoE feed-forwards) and the output
    head (GELU(tanh) adaLN on a bias-free LayerNorm, ``norm_out`` / ``proj_out``).

    Token masking (training): ``keep_indices`` (B, K) in any order (the original's shuffle order, or the trainer's
    ascending one: equal up to summation order); the backbone and the head run on the K kept tokens, the MoE takes
    its capacity from K, and the ``mask_token`` buffer fills the removed patches (zeros in released checkpoints).

    Beyond the original: latents of any size and aspect ratio (the original takes ``sample_size`` x ``sample_size``
    only), with PixArt's position interpolation (``arange(n) / (n / base) / interpolation_scale`` per axis, the
    original's table at the training grid); ``patch_mixer_layers=0`` (the original cannot build it);
    ``deferred_masking=False`` (masking before the mixer, for the ablation); ``use_text_mask=True`` (padded text
    tokens dropped from the attentions and the caption mean).

    Args:
        num_attention_heads: heads of a full-width attention; the token width is ``heads * head_dim``.
        attention_head_dim: width of one head (the original's ``head_dim``).
        in_channels: latent channels.
        out_channels: output channels; None: ``in_channels`` (the original's).
        num_layers: backbone blocks (``depth``).
        sample_size: the training latent side (``input_size``): the position table's base grid.
        patch_size: patch side in latent pixels.
        caption_channels: width of the text features.
        interpolation_scale: the position scale (``pos_interp_scale``: 1 at 256 px, 2 at 512 px).
        norm_eps: epsilon of every LayerNorm, the QK-norms included.
        attention_bias: biases on the attention, SwiGLU and mixer-map projections (``use_bias``; the experts have
            none).
        multiple_of: the SwiGLU and expert hidden widths are rounded up to a multiple of it.
        qkv_multipliers: self-attention width ratio per backbone block, or per group of ``num_layers / len``
            consecutive blocks (rounded up to a multiple of ``2 * attention_head_dim``); None: ``[1.0]``.
        ffn_multipliers: feed-forward width ratio (x token width) per block or group; None: ``[4.0]``.
        patch_mixer_layers: blocks of the patch mixer (0: none).
        patch_mixer_dim: the patch mixer's width; None: the token width (no maps).
        patch_mixer_qkv_ratio: the mixer's self-attention width ratio.
        patch_mixer_mlp_ratio: the mixer's feed-forward width ratio.
        num_experts: experts of the expert-choice MoE feed-forwards (backbone blocks ``i < num_layers - 1`` and
            mixer blocks ``i >= 1`` with ``(i + 1) % experts_every_n == 0``); None: SwiGLUs everywhere.
        expert_capacity: average experts per token (each takes ``int(capacity * T / E)`` of T tokens).
        experts_every_n: the MoE period.
        deferred_masking: mask after the patch mixer (MicroDiT); False: before it (naive masking).
        use_text_mask: read ``encoder_attention_mask``; False (the original): every text token is read and a given
            mask is ignored with a warning (released checkpoints attend over all 77 CLIP tokens).
        prediction_type: what the model predicts, as the trainer records it (None: unknown).
        noise_shift: the SNR shift of a discrete schedule the trainer used (None: none).
    """

    block_class = MicroDiTBlock
    _skip_layerwise_casting_patterns = ["pos_embed", "norm", "timestep_embedder"]
    supports_token_masking = True
    #: The unconditional caption is all zeros (:meth:`null_caption`), as the original's caption dropout and CFG.
    has_null_caption = True

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 64,
        in_channels: int = 4,
        out_channels: int | None = None,
        num_layers: int = 28,
        sample_size: int = 32,
        patch_size: int = 2,
        caption_channels: int = 1024,
        interpolation_scale: float = 1.0,
        norm_eps: float = 1e-6,
        attention_bias: bool = True,
        multiple_of: int = 256,
        qkv_multipliers: list[float] | None = None,
        ffn_multipliers: list[float] | None = None,
        patch_mixer_layers: int = 6,
        patch_mixer_dim: int | None = None,
        patch_mixer_qkv_ratio: float = 1.0,
        patch_mixer_mlp_ratio: float = 4.0,
        num_experts: int | None = 8,
        expert_capacity: float = 2.0,
        experts_every_n: int = 2,
        deferred_masking: bool = True,
        use_text_mask: bool = False,
        prediction_type: str | None = None,
        noise_shift: float | None = None,
    ):
        super().__init__()
        _validate(self.config)
        dim, p = num_attention_heads * attention_head_dim, patch_size
        self.inner_dim, self.mixer_dim = dim, patch_mixer_dim or dim
        self.out_channels = out_channels or in_channels
        self.gradient_checkpointing = False
        self._warned_text_mask = False

        self.pos_embed = PatchEmbed(p, in_channels, dim, sample_size // p, interpolation_scale)
        self.register_buffer("mask_token", torch.zeros(1, 1, p * p * self.out_channels))  # (1, 1, p*p*C)
        self.timestep_embedder = TimestepEmbedding(TIMESTEP_FREQUENCIES, dim, act_fn="gelu_tanh")
        self.caption_projection = CaptionProjection(caption_channels, dim, norm_eps=norm_eps)
        hidden = swiglu_hidden(dim, 4.0, multiple_of)
        self.caption_refiner = MicroDiTCaptionBlock(dim, attention_head_dim, hidden, attention_bias, norm_eps)
        self.pooled_caption_projection = CaptionProjection(dim, dim, norm_eps=norm_eps)
        narrow = self.mixer_dim != dim and patch_mixer_layers > 0
        maps = [NormProjection(*dims, attention_bias, norm_eps) if narrow else None
                for dims in ((dim, self.mixer_dim), (self.mixer_dim, dim), (dim, self.mixer_dim))]  # fmt: skip
        self.patch_mixer_proj_in, self.patch_mixer_proj_out, self.patch_mixer_proj_text = maps
        self.patch_mixer = nn.ModuleList([self._mixer_block(i) for i in range(patch_mixer_layers)])
        self.transformer_blocks = nn.ModuleList([self._backbone_block(i) for i in range(num_layers)])
        add_output_head(self, dim, p * p * self.out_channels, modulation="gelu_tanh", affine=True, bias=False,
                        eps=norm_eps)  # fmt: skip
        self.initialize_weights()

    # ----- construction -------------------------------------------------------------------------------------
    def _backbone_block(self, index: int) -> MicroDiTBlock:
        """Backbone block ``index``: layer-wise scaled self-attention and feed-forward, full-width cross-attention."""
        cfg, dim = self.config, self.inner_dim
        qkv = _ratio_at(cfg.qkv_multipliers or [1.0], index, cfg.num_layers)
        ffn = _ratio_at(cfg.ffn_multipliers or [4.0], index, cfg.num_layers)
        moe = index < cfg.num_layers - 1 and self._has_experts(index)
        return self._block(dim, attention_width(dim, qkv, cfg.attention_head_dim), ffn, moe)

    def _mixer_block(self, index: int) -> MicroDiTBlock:
        """Patch-mixer block ``index``: ``patch_mixer_dim`` wide, its text through ``patch_mixer_proj_text``."""
        cfg, dim = self.config, self.mixer_dim
        width = attention_width(dim, cfg.patch_mixer_qkv_ratio, cfg.attention_head_dim)
        return self._block(dim, width, cfg.patch_mixer_mlp_ratio, index >= 1 and self._has_experts(index))

    def _has_experts(self, index: int) -> bool:
        cfg = self.config
        return cfg.num_experts is not None and (index + 1) % cfg.experts_every_n == 0

    def _block(self, dim: int, attention_dim: int, ffn_ratio: float, moe: bool) -> MicroDiTBlock:
        cfg = self.config
        if moe:
            hidden = expert_hidden(dim, ffn_ratio, cfg.multiple_of)
            ff = ExpertChoiceFeedForward(
                dim, cfg.num_experts, cfg.expert_capacity, hidden, bias=False, approximate="none"
            )
        else:
            ff = SwiGLUFeedForward(dim, swiglu_hidden(dim, ffn_ratio, cfg.multiple_of), bias=cfg.attention_bias)
        return MicroDiTBlock(
            dim, cfg.attention_head_dim, attention_dim, dim, self.inner_dim, ff, cfg.attention_bias, cfg.norm_eps
        )

    def initialize_weights(self) -> None:
        """Training from scratch: DiT's Xavier-uniform linear layers with zero biases (the timestep MLP N(0, 0.02)),
        and, as the original, zeros in every adaLN modulation, the caption block's output projections and the output
        head (every block starts as the identity, the output at zero). The experts keep their own initialisation."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(self.timestep_embedder.linear_2.weight, std=0.02)
        zeroed = [block.adaln_modulation for block in (*self.patch_mixer, *self.transformer_blocks)]
        zeroed += [self.caption_refiner.attn1.to_out[0], self.caption_refiner.ff.net[2]]
        for module in [*zeroed, self.norm_out.linear, self.proj_out]:
            nn.init.zeros_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    # ----- what pipelines and the trainer read --------------------------------------------------------------
    @property
    def uses_text_mask(self) -> bool:
        """Whether ``encoder_attention_mask`` is read (``config.use_text_mask``); pipelines pass none otherwise."""
        return bool(self.config.use_text_mask)

    def null_caption(self, batch_size: int, length: int) -> torch.Tensor:
        """The unconditional caption: zeros (batch_size, length, caption_channels), as the original's."""
        return self.mask_token.new_zeros(batch_size, length, self.config.caption_channels)

    def routing_stats(self) -> dict[str, float]:
        """Expert utilisation of the last forward, averaged over the MoE layers (:func:`~dit.nn.moe.moe_routing_stats`)."""
        return moe_routing_stats(self)

    # ----- forward --------------------------------------------------------------------------------------------
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
        keep_indices: torch.Tensor | None = None,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """EDM's ``F`` for latents (the input already scaled by ``c_in``).

        Args:
            hidden_states: latents (B, in_channels, H, W), H and W divisible by ``patch_size``.
            encoder_hidden_states: text features (B, L, caption_channels); the null caption is zeros.
            timestep: EDM's ``c_noise = ln(sigma) / 4``, (B,) or a scalar.
            added_cond_kwargs: accepted for pipeline compatibility; any value other than None is an error (MicroDiT
                has no micro-conditions).
            cross_attention_kwargs: ``{"scale": s}`` scales loaded LoRA layers; other keys are ignored with a
                warning.
            encoder_attention_mask: text keep-mask (B, L) or bias (B, 1, L), read with ``use_text_mask`` only.
            return_dict: return ``Transformer2DModelOutput`` instead of a tuple.
            keep_indices: (B, K) row-major patch indices kept by token masking (training), in any order: the
                backbone runs on those K tokens and the removed patches get ``mask_token``.
        """
        inputs = ForwardInputs(
            hidden_states, encoder_hidden_states, timestep, encoder_attention_mask, added_cond_kwargs
        )
        return self.run_forward(inputs, return_dict, cross_attention_kwargs, keep_indices=keep_indices)

    def prepare(
        self, inputs: ForwardInputs, backend: AttentionBackend, keep_indices: torch.Tensor | None = None
    ) -> MicroDiTOriginalState:
        """Patch tokens with positions, the condition, the refined caption, and the contexts of the mixer and the
        backbone."""
        check_guidance(inputs.guidance, None, None)
        _check_no_micro_conditions(inputs.added_cond_kwargs)
        p = self.config.patch_size
        grid = (inputs.hidden_states.shape[-2] // p, inputs.hidden_states.shape[-1] // p)
        x = self.pos_embed(inputs.hidden_states)  # (B, N, D)
        n_all = x.shape[1]
        if keep_indices is not None:
            _check_keep_indices(keep_indices, x.shape[0], n_all)
        text, bias = text_tokens(None, inputs.encoder_hidden_states, self._text_mask(inputs), x.dtype)  # (B, L, C)
        caption, cond = self._caption_and_condition(inputs.timestep, text, bias, backend, x.dtype)  # (B, L, D), (B, D)
        condition = F.gelu(cond, approximate="tanh")  # (B, D): the input of every adaLN modulation
        n_kept = n_all if keep_indices is None else keep_indices.shape[1]
        kept_grid = grid if keep_indices is None else None
        context = self._context(caption, bias, condition, self.inner_dim, n_kept, kept_grid, backend)
        mixer_context = None
        if len(self.patch_mixer):
            naive = keep_indices is not None and not self.config.deferred_masking
            mixer_text = caption if self.patch_mixer_proj_text is None else self.patch_mixer_proj_text(caption)
            n_mixer, mixer_grid = (n_kept, kept_grid) if naive else (n_all, grid)
            mixer_context = self._context(mixer_text, bias, condition, self.mixer_dim, n_mixer, mixer_grid, backend)
        return MicroDiTOriginalState(x, context, cond, mixer_context, keep_indices, grid)

    def mix_and_mask(self, state: MicroDiTOriginalState) -> torch.Tensor:
        """The patch mixer on all tokens, then masking (deferred; naive: masking first), then the map back to the
        backbone's width: (B, N, D) -> (B, K, D)."""
        x, keep = state.tokens, state.keep_indices
        deferred = self.config.deferred_masking
        if keep is not None and not deferred:
            x = gather_tokens(x, keep)  # (B, K, D)
        if self.patch_mixer_proj_in is not None:
            x = self.patch_mixer_proj_in(x)  # (B, N, D_mixer)
        x = self.run_blocks(self.patch_mixer, x, state.mixer_context)  # (B, N or K, D_mixer)
        if keep is not None and deferred:
            x = gather_tokens(x, keep)  # (B, K, D_mixer), in the order of keep_indices
        if self.patch_mixer_proj_out is not None:
            x = self.patch_mixer_proj_out(x)  # (B, K, D)
        return x

    def unpatchify(self, hidden_states: torch.Tensor, state: MicroDiTOriginalState) -> torch.Tensor:
        """(B, K, p*p*C) -> (B, C, H, W), ``mask_token`` at the patches token masking removed."""
        x, keep = hidden_states, state.keep_indices
        if keep is not None:
            batch, tokens = x.shape[0], state.grid[0] * state.grid[1]
            filled = self.mask_token.to(x.dtype).expand(batch, tokens, -1)  # (B, N, p*p*C)
            x = torch.scatter(filled, 1, keep[:, :, None].expand(-1, -1, x.shape[-1]), x)  # (B, N, p*p*C)
        return unpatchify(x, state.grid, self.config.patch_size)  # (B, C, H, W)

    # ----- forward pieces -----------------------------------------------------------------------------------
    def _text_mask(self, inputs: ForwardInputs) -> torch.Tensor | None:
        """The text mask the model reads: the given one with ``use_text_mask``, else None (with a warning, once)."""
        mask = inputs.encoder_attention_mask
        if mask is None or self.config.use_text_mask:
            return mask
        if not self._warned_text_mask and not torch.compiler.is_compiling():
            logger.warning(
                f"{type(self).__name__} reads every text token, as the original MicroDiT (config use_text_mask="
                "False): the encoder_attention_mask given is ignored. Build the model with use_text_mask=True to "
                "drop padded tokens."
            )
            self._warned_text_mask = True
        return None

    def _caption_and_condition(
        self,
        timestep: torch.Tensor | float,
        text: torch.Tensor,
        bias: torch.Tensor | None,
        backend: AttentionBackend,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The refined caption tokens (B, L, D) and the condition ``c`` (B, D): the timestep embedding plus the
        pooled-caption embedding of the mean refined token (over the kept tokens with a text mask)."""
        batch, length = text.shape[:2]
        t = torch.as_tensor(timestep, device=text.device).reshape(-1).expand(batch)  # (B,)
        t_emb = self.timestep_embedder(timestep_sinusoid(t, TIMESTEP_FREQUENCIES).to(dtype))  # (B, D)
        heads = self.inner_dim // self.config.attention_head_dim
        mask = None if bias is None else AttentionMask.from_bias(bias, backend, heads, length)
        caption = self.caption_refiner(self.caption_projection(text), mask)  # (B, L, D)
        if mask is None:
            pooled = caption.mean(dim=1)  # (B, D)
        else:
            keep = mask.keep[:, :, None].to(caption.dtype)  # (B, L, 1)
            pooled = (caption * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)  # (B, D)
        return caption, t_emb + self.pooled_caption_projection(pooled)

    def _context(
        self,
        text: torch.Tensor,
        bias: torch.Tensor | None,
        condition: torch.Tensor,
        width: int,
        n_tokens: int,
        grid: tuple[int, int] | None,
        backend: AttentionBackend,
    ) -> BlockContext:
        """The context of blocks of ``width`` running on ``n_tokens`` image tokens (on ``grid``, None once tokens
        were dropped): text, its key mask in the backend's format, the activated condition."""
        heads = width // self.config.attention_head_dim
        mask = None if bias is None else AttentionMask.from_bias(bias, backend, heads, n_tokens)
        return BlockContext(encoder_hidden_states=text, encoder_attention_mask=mask, condition=condition, grid=grid)


def _ratio_at(ratios: list[float], index: int, depth: int) -> float:
    """The ratio of block ``index``: one per block, or each of ``len(ratios)`` covering ``depth / len`` blocks."""
    return ratios[index // (depth // len(ratios))]


def _check_no_micro_conditions(added_cond_kwargs: dict | None) -> None:
    given = sorted(k for k, v in (added_cond_kwargs or {}).items() if v is not None)
    if given:
        raise ValueError(f"MicroDiT takes no micro-conditions; added_cond_kwargs gave {given}.")


def _check_keep_indices(keep_indices: torch.Tensor, batch: int, n_tokens: int) -> None:
    if keep_indices.ndim != 2 or keep_indices.shape[0] != batch or not 0 < keep_indices.shape[1] <= n_tokens:
        raise ValueError(
            f"keep_indices must be (batch={batch}, K) with 0 < K <= {n_tokens} tokens, got {tuple(keep_indices.shape)}."
        )
    if keep_indices.dtype != torch.long:
        raise ValueError(f"keep_indices must be int64 patch indices, got {keep_indices.dtype}.")


def _validate(cfg) -> None:
    """Config values that would fail deep inside a layer, or build another network than the original's."""
    check_prediction_record(cfg.prediction_type, cfg.noise_shift)
    check_positive_ints(
        num_attention_heads=cfg.num_attention_heads, attention_head_dim=cfg.attention_head_dim,
        in_channels=cfg.in_channels, num_layers=cfg.num_layers, sample_size=cfg.sample_size,
        patch_size=cfg.patch_size, caption_channels=cfg.caption_channels, multiple_of=cfg.multiple_of,
        experts_every_n=cfg.experts_every_n,
    )  # fmt: skip
    check_positive_ints(optional=True, out_channels=cfg.out_channels, num_experts=cfg.num_experts,
                        patch_mixer_dim=cfg.patch_mixer_dim)  # fmt: skip
    dim, head_dim = cfg.num_attention_heads * cfg.attention_head_dim, cfg.attention_head_dim
    if dim % 4:
        raise ValueError(f"The token width {dim} must be divisible by 4 (the 2D sin-cos position table).")
    if cfg.sample_size % cfg.patch_size:
        raise ValueError(f"sample_size {cfg.sample_size} is not divisible by patch_size {cfg.patch_size}.")
    layers = cfg.patch_mixer_layers
    if isinstance(layers, bool) or not isinstance(layers, numbers.Integral) or layers < 0:
        raise ValueError(f"patch_mixer_layers must be an int >= 0, got {layers!r}.")
    mixer_dim = cfg.patch_mixer_dim or dim
    if mixer_dim % head_dim:
        raise ValueError(f"patch_mixer_dim {mixer_dim} is not a multiple of attention_head_dim {head_dim}.")
    if layers == 0 and mixer_dim != dim:
        raise ValueError("patch_mixer_dim is set but patch_mixer_layers is 0: a mixer width needs mixer blocks.")
    for name in ("qkv_multipliers", "ffn_multipliers"):
        _check_ratios(name, getattr(cfg, name), cfg.num_layers)
    for name in ("patch_mixer_qkv_ratio", "patch_mixer_mlp_ratio", "expert_capacity", "interpolation_scale",
                 "norm_eps"):  # fmt: skip
        _check_positive_number(name, getattr(cfg, name))


def _check_ratios(name: str, ratios, depth: int) -> None:
    if ratios is None:
        return
    if not isinstance(ratios, (list, tuple)) or not ratios or depth % len(ratios):
        raise ValueError(
            f"{name} must be None or a list of ratios, one per block or one per group of blocks (its length "
            f"dividing num_layers={depth}), got {ratios!r}."
        )
    for value in ratios:
        _check_positive_number(name, value)


def _check_positive_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}.")

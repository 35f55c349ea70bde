"""PixArt-α / PixArt-Σ backbone, a drop-in for diffusers' ``PixArtTransformer2DModel``."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput

# diffusers' pipeline loader looks the name `ModelMixin` up in the module that model_index.json records for
# a component (this one), so it must stay importable from here.
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import apply_lora_scale
from torch import nn

from ..nn.attention import AttentionMask, AttentionSpec
from ..nn.attention.backends import AttentionBackend
from ..nn.blocks import PixArtBlock
from ..nn.context import BlockContext
from ..nn.embeddings import CaptionProjection, PatchEmbed
from ..nn.masking import gather_tokens, scatter_tokens
from ..nn.normalization import AdaLayerNormSingle, add_output_head
from .attention_config import self_attention_spec
from .backbone import DiTBackbone, ForwardInputs, ForwardState
from .config_checks import check_kv_compression, check_positive_ints, check_prediction_record
from .inheritance import inherit_from
from .inputs import as_bias, check_control_size, check_guidance, guidance_condition, micro_conditions, text_tokens

__all__ = ["ModelMixin", "PixArtTransformer", "as_pixart_model"]


@dataclass
class PixArtState(ForwardState):
    """The forward state of the PixArt family: the context of all N tokens (``context`` is that of the K tokens the
    blocks run on), the kept patch indices (B, K) of token masking (None: all), and the latent size (H, W)."""

    full_context: BlockContext | None = None
    keep_indices: torch.Tensor | None = None
    size: tuple[int, int] = (0, 0)


class PixArtTransformer(DiTBackbone):
    """PixArt-α / PixArt-Σ diffusion transformer.

    Config fields, forward signature and state-dict keys are those of diffusers' ``PixArtTransformer2DModel``,
    so diffusers-format folders (also with ``_class_name`` ``Transformer2DModel``) load strictly, and the model
    drops into ``PixArtAlphaPipeline`` / ``PixArtSigmaPipeline`` / ``PixArtSigmaPAGPipeline``, with diffusers'
    attention-processor API (``attn_processors``, ``set_attn_processor``, ``fuse_qkv_projections``, ...). Beyond
    diffusers: LoRA through ``PeftAdapterMixin`` (scaled per call by ``cross_attention_kwargs={"scale": s}``), any
    latent H×W with a cached position table, masks converted once per forward, no tensor read on the host
    (``torch.compile(fullgraph=True)`` works), PixArt's learned null caption (``y_embedding``) kept when the config
    sets ``null_caption_length``, and token masking for micro-budget training (``keep_indices`` in ``forward``).

    Args:
        num_attention_heads: heads per attention layer.
        attention_head_dim: width of one head; the token width is ``heads * head_dim``.
        in_channels: latent channels.
        out_channels: output channels (``2 * in_channels`` with learned sigma); None means ``in_channels``.
        num_layers: number of transformer blocks.
        dropout: dropout in attention and MLP.
        norm_num_groups: unused (kept for config compatibility).
        cross_attention_dim: width of the text tokens entering cross-attention.
        attention_bias: bias on q/k/v projections.
        sample_size: training latent side; sets the position-table base grid and the default image size.
        patch_size: patch side in latent pixels.
        activation_fn: MLP activation, ``gelu-approximate`` for PixArt.
        num_embeds_ada_norm: must be set (kept for config compatibility).
        upcast_attention: unused (attention logits are accumulated in fp32 by the kernels).
        norm_type: must be ``ada_norm_single``.
        norm_elementwise_affine: affine LayerNorms in the blocks.
        norm_eps: LayerNorm epsilon in the blocks.
        interpolation_scale: position scale; None means ``max(sample_size // 64, 1)``.
        use_additional_conditions: resolution / aspect-ratio micro-conditions; None means ``sample_size == 128``.
        caption_channels: width of the text-encoder features (None: no caption projection).
        attention_type: must be ``default``.
        null_caption_length: tokens of the learned null caption ``y_embedding`` (None: none kept).
        kv_compress_ratio: PixArt-Σ key/value compression stride of the self-attention, an int >= 2 (None: off).
        kv_compress_mode: ``conv`` (depthwise conv + LayerNorm, PixArt-Σ), ``avg``, ``uniform`` or ``ave``
            (PixArt-Σ's mode of that name: nearest-neighbour subsampling, no parameters).
        kv_compress_layers: blocks that compress (None: the deep half, as PixArt-Σ).
        kv_compress_padding: grids whose sides do not divide by the ratio: ``replicate`` pads them (every token
            reaches a key cell); ``none`` drops the remainder rows/columns, as PixArt-Σ's original code
            (``Conv2d(kernel=stride=ratio)``), and is what :func:`dit.convert.load_original_pixart` sets.
        qk_norm: None, or ``layer_norm_across_heads``: PixArt-Σ's ``qk_norm=True``, an affine LayerNorm over the
            full width (eps 1e-5) on the self-attention's queries and keys, before KV compression.
        self_attention_type: ``softmax`` or ``linear`` (ReLU linear attention, LiT).
        linear_attention_heads: heads of linear self-attention (None: ``num_attention_heads // 4``, at least 1).
        attention_conv_kernel_size: depthwise value-convolution side in self-attention (None: off; LiT: 5).
        prediction_type: what the model predicts (None: unknown, taken as PixArt's ``epsilon``): ``epsilon``,
            ``v_prediction``, ``sample`` (x0) or ``flow`` (a rectified-flow velocity); the trainer records it, and a
            pipeline given ``scheduler=None`` samples with the matching scheduler
            (:func:`dit.pipelines.schedulers.default_scheduler`).
        noise_shift: the SNR shift of the discrete schedule the model was trained with (``objective.discrete.noise_shift``;
            None: PixArt's linear betas), for that default scheduler.
        time_cond_proj_dim: width of a ``timestep_cond`` added to the timestep embedding (an LCM student's
            guidance embedding, see :func:`dit.nn.embeddings.guidance_scale_embedding`); None: no such input.
        vae_scale_factor: image pixels per latent pixel, for the micro-conditions the model computes itself when
            ``added_cond_kwargs`` gives none (8 for PixArt's VAE).
    """

    block_class = PixArtBlock
    _no_split_modules = ["PixArtBlock", "PatchEmbed"]
    _skip_layerwise_casting_patterns = ["pos_embed", "norm", "adaln_single"]
    supports_token_masking = True
    supports_block_controls = True
    #: Config values a model converted by :meth:`from_pixart` gets unless the caller overrides them.
    _inherit_config: dict = {}
    #: Parameter-name fragments that are re-initialised rather than inherited (the layers a variant replaces).
    _inherit_skip: tuple[str, ...] = ()

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 4,
        out_channels: int | None = 8,
        num_layers: int = 28,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        cross_attention_dim: int | None = 1152,
        attention_bias: bool = True,
        sample_size: int = 128,
        patch_size: int = 2,
        activation_fn: str = "gelu-approximate",
        num_embeds_ada_norm: int | None = 1000,
        upcast_attention: bool = False,
        norm_type: str = "ada_norm_single",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-6,
        interpolation_scale: float | None = None,
        use_additional_conditions: bool | None = None,
        caption_channels: int | None = None,
        attention_type: str | None = "default",
        null_caption_length: int | None = None,
        kv_compress_ratio: int | None = None,
        kv_compress_mode: str = "conv",
        kv_compress_layers: list[int] | None = None,
        self_attention_type: str = "softmax",
        linear_attention_heads: int | None = None,
        attention_conv_kernel_size: int | None = None,
        time_cond_proj_dim: int | None = None,
        vae_scale_factor: int = 8,
        kv_compress_padding: str = "replicate",
        qk_norm: str | None = None,
        prediction_type: str | None = None,
        noise_shift: float | None = None,
    ):
        super().__init__()
        check_prediction_record(prediction_type, noise_shift)
        check_positive_ints(
            num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim, in_channels=in_channels,
            num_layers=num_layers, sample_size=sample_size, patch_size=patch_size, vae_scale_factor=vae_scale_factor,
        )  # fmt: skip
        check_positive_ints(
            optional=True, out_channels=out_channels, cross_attention_dim=cross_attention_dim,
            caption_channels=caption_channels, num_embeds_ada_norm=num_embeds_ada_norm,
            null_caption_length=null_caption_length, linear_attention_heads=linear_attention_heads,
            attention_conv_kernel_size=attention_conv_kernel_size, time_cond_proj_dim=time_cond_proj_dim,
        )  # fmt: skip
        check_kv_compression(kv_compress_ratio, kv_compress_layers, num_layers)
        inner_dim = num_attention_heads * attention_head_dim
        _validate_config(
            norm_type,
            num_embeds_ada_norm,
            attention_type,
            null_caption_length,
            caption_channels,
            cross_attention_dim,
            inner_dim,
        )
        self.inner_dim = inner_dim
        self.out_channels = in_channels if out_channels is None else out_channels
        if use_additional_conditions is None:
            use_additional_conditions = sample_size == 128
        self.use_additional_conditions = use_additional_conditions
        if interpolation_scale is None:
            interpolation_scale = max(sample_size // 64, 1)
        self.gradient_checkpointing = False

        self.pos_embed = PatchEmbed(patch_size, in_channels, inner_dim, sample_size // patch_size, interpolation_scale)
        self.transformer_blocks = nn.ModuleList([self.build_block(index) for index in range(num_layers)])
        add_output_head(self, inner_dim, patch_size * patch_size * self.out_channels)
        self.adaln_single = AdaLayerNormSingle(inner_dim, use_additional_conditions, time_cond_proj_dim)
        self.caption_projection = None
        if caption_channels is not None:
            self.caption_projection = CaptionProjection(caption_channels, inner_dim)
        if null_caption_length is not None:
            self.y_embedding = nn.Parameter(torch.randn(null_caption_length, caption_channels) / caption_channels**0.5)

    def build_block(self, index: int) -> PixArtBlock:
        """Block ``index`` of ``transformer_blocks`` (subclasses scale its widths or swap its MLP)."""
        return self.pixart_block(self_attention_spec(self.config, index))

    def pixart_block(
        self,
        self_attention: AttentionSpec | None = None,
        attention_heads: int | None = None,
        feed_forward: nn.Module | None = None,
    ) -> PixArtBlock:
        """A :class:`PixArtBlock` of this config with the given self-attention options, head count of both
        attentions and MLP (None: the config's)."""
        cfg = self.config
        return PixArtBlock(
            self.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim,
            cross_attention_dim=cfg.cross_attention_dim, dropout=cfg.dropout, activation_fn=cfg.activation_fn,
            attention_bias=cfg.attention_bias, norm_elementwise_affine=cfg.norm_elementwise_affine,
            norm_eps=cfg.norm_eps, self_attention=self_attention, attention_heads=attention_heads,
            feed_forward=feed_forward,
        )  # fmt: skip

    @classmethod
    def from_pixart(cls, source, **overrides):
        """Build this backbone from a PixArt model (a module, a transformer folder, or a pipeline folder), inheriting
        every weight with the same name and shape except those this class replaces.

        ``overrides`` change the config (e.g. ``kv_compress_ratio=2``). The returned model carries
        ``inheritance_report``: ``inherited`` (count), ``new`` (parameters it starts fresh, e.g. a KV-compression
        conv) and ``dropped`` (source parameters it has no use for); it is also logged.
        """
        return inherit_from(cls, as_pixart_model(source), overrides, cls._inherit_config, cls._inherit_skip)

    def null_caption(self, batch_size: int, length: int) -> torch.Tensor:
        """The learned null caption, ``(batch_size, length, caption_channels)``, for the unconditional CFG branch."""
        if not self.has_null_caption:
            raise ValueError("This model has no learned null caption (config.null_caption_length is None).")
        if length > self.y_embedding.shape[0]:
            raise ValueError(f"The null caption has {self.y_embedding.shape[0]} tokens; {length} were asked for.")
        return self.y_embedding[:length][None].expand(batch_size, -1, -1)

    @apply_lora_scale("cross_attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
        timestep_cond: torch.Tensor | None = None,
        block_controls: Callable[..., torch.Tensor] | None = None,
        keep_indices: torch.Tensor | None = None,
        guidance: torch.Tensor | float | None = None,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Predict noise (and variance channels) for latents.

        Args:
            hidden_states: latents (B, in_channels, H, W), H and W divisible by ``patch_size``.
            encoder_hidden_states: text features (B, L, caption_channels).
            timestep: (B,) or a scalar, integer or fractional.
            added_cond_kwargs: ``{"resolution": (B, 2), "aspect_ratio": (B, 1)}`` with micro-conditions; those not
                given are the image's, from the latent size times ``vae_scale_factor``.
            cross_attention_kwargs: ``{"scale": s}`` scales the loaded PEFT LoRA layers for this call (diffusers'
                ``apply_lora_scale``; 0 is the base model); other keys are ignored with diffusers' warning.
            attention_mask: image-token keep-mask (B, N) (1 = keep), or an additive bias (B, 1, N).
            encoder_attention_mask: text keep-mask (B, L) (1 = keep), or an additive bias (B, 1, L).
            return_dict: return ``Transformer2DModelOutput`` instead of a tuple.
            timestep_cond: (B, time_cond_proj_dim) added to the timestep embedding (LCM guidance embedding), as
                diffusers passes it; excludes ``guidance``.
            block_controls: called after every block as ``block_controls(index, hidden_states, context)`` with the
                forward's :class:`~dit.nn.context.BlockContext`; returns the hidden states for the next block.
                ControlNet adapters add their residuals here (:func:`dit.models.controlnet.block_controls`); None:
                nothing is injected.
            keep_indices: (B, K) row-major patch indices, ascending (training only, see :mod:`dit.nn.masking`): the
                blocks run on these K tokens of each sample only and the output is zero at every other patch.
            guidance: the classifier-free guidance scale g, (B,) or a scalar, of a model with ``time_cond_proj_dim``
                (an LCM student), embedded as ``guidance_scale_embedding(g - 1)``.
        """
        inputs = ForwardInputs(
            hidden_states, encoder_hidden_states, timestep, encoder_attention_mask, added_cond_kwargs, guidance,
            block_controls,
        )  # fmt: skip
        return self.run_forward(
            inputs, return_dict, cross_attention_kwargs,
            attention_mask=attention_mask, timestep_cond=timestep_cond, keep_indices=keep_indices,
        )  # fmt: skip

    def prepare(
        self,
        inputs: ForwardInputs,
        backend: AttentionBackend,
        attention_mask: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        keep_indices: torch.Tensor | None = None,
    ) -> PixArtState:
        """Patch tokens with positions, the adaLN-single modulation, text and masks: the blocks' context for all
        tokens, and (token masking) for the kept ones."""
        check_guidance(inputs.guidance, timestep_cond, self.config.time_cond_proj_dim)
        hidden_states = inputs.hidden_states
        height, width = hidden_states.shape[-2:]
        p = self.config.patch_size
        x = self.pos_embed(hidden_states)  # (B, N, D)
        t6, emb = self._modulation(inputs, timestep_cond, x.dtype)  # (B, 6D), (B, D)
        text, cross_bias = text_tokens(
            self.caption_projection, inputs.encoder_hidden_states, inputs.encoder_attention_mask, x.dtype
        )  # (B, L, D), (B, 1, 1, L)
        self_bias = as_bias(attention_mask, x.dtype)
        n_all = x.shape[1]
        if keep_indices is not None:
            if self_bias is not None or inputs.block_controls is not None:
                raise ValueError(
                    "keep_indices (token masking) cannot be combined with attention_mask or block_controls."
                )
            self._check_maskable(keep_indices, n_all)
        parts = (backend, text, cross_bias, t6)
        context = self._block_context(*parts, self_bias, (height // p, width // p), n_all)
        kept = context if keep_indices is None else self._block_context(*parts, None, None, keep_indices.shape[1])
        return PixArtState(x, kept, emb, full_context=context, keep_indices=keep_indices, size=(height, width))

    def unpatchify(self, hidden_states: torch.Tensor, state: PixArtState) -> torch.Tensor:
        """(B, K, p*p*C) -> (B, C, H, W), zero at the patches token masking dropped."""
        (height, width), p, c = state.size, self.config.patch_size, self.out_channels
        batch, h, w = hidden_states.shape[0], height // p, width // p
        x = hidden_states
        if state.keep_indices is not None:
            x = scatter_tokens(x, state.keep_indices, h * w)  # (B, N, p*p*C), zeros at the masked patches
        x = x.reshape(batch, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
        return x.reshape(batch, c, h * p, w * p)  # (B, C, H, W)

    def _modulation(self, inputs: ForwardInputs, timestep_cond: torch.Tensor | None, dtype: torch.dtype):
        """adaLN-single of the timestep, the micro-conditions (given, or the image's) and the guidance embedding:
        the shared modulation (B, 6D) and the condition embedding of the output head (B, D)."""
        hidden_states, added_cond_kwargs = inputs.hidden_states, inputs.added_cond_kwargs
        batch, device = hidden_states.shape[0], hidden_states.device
        timestep = torch.as_tensor(inputs.timestep, device=device).reshape(-1).expand(batch)  # (B,)
        if inputs.guidance is not None:
            dim = self.config.time_cond_proj_dim
            timestep_cond = guidance_condition(inputs.guidance, batch, dim, hidden_states.dtype, device)  # (B, dim)
        if self.use_additional_conditions:
            added_cond_kwargs = micro_conditions(added_cond_kwargs, hidden_states, self.config.vae_scale_factor)
        return self.adaln_single(
            timestep, added_cond_kwargs, batch_size=batch, hidden_dtype=dtype, timestep_cond=timestep_cond
        )  # (B, 6D), (B, D)

    def _block_context(
        self,
        backend: AttentionBackend,
        text: torch.Tensor | None,
        cross_bias: torch.Tensor | None,
        t6: torch.Tensor,
        self_bias: torch.Tensor | None,
        grid: tuple[int, int] | None,
        n_tokens: int,
    ) -> BlockContext:
        """The blocks' context for ``n_tokens`` image tokens on ``grid`` (None: tokens were dropped), masks made
        once, in every form the kernels read, from the (B, 1, 1, L) biases."""
        heads = self.config.num_attention_heads
        return BlockContext(
            encoder_hidden_states=text,  # (B, L, D)
            encoder_attention_mask=_mask(cross_bias, backend, heads, n_tokens),
            attention_mask=_mask(self_bias, backend, heads, n_tokens),
            shared_modulation=t6,  # (B, 6D)
            grid=grid,
        )

    def control_tokens(self, controlnet_cond: torch.Tensor, context: BlockContext) -> torch.Tensor:
        """A ControlNet's control latent (B, C, H, W) as tokens like the latents (PixArt-δ: this model's patch
        embedding with its position table): (B, N, D). ``context`` is the forward's, its ``grid`` the latents'."""
        check_control_size(controlnet_cond, context.grid, self.config.patch_size)
        return self.pos_embed(controlnet_cond)  # (B, N, D)

    def mix_and_mask(self, state: PixArtState) -> torch.Tensor:
        """Tokens (B, N, D) -> the tokens the blocks run on, (B, K, D) with ``keep_indices``.

        PixArt has no patch mixer: masking drops tokens right after the patch embedding (with positions added).
        """
        if state.keep_indices is None:
            return state.tokens
        return gather_tokens(state.tokens, state.keep_indices)  # (B, K, D)

    def _check_maskable(self, keep_indices: torch.Tensor, n_tokens: int) -> None:
        if self.needs_full_grid:
            raise ValueError(
                "Token masking drops tokens from the grid, but this model's self-attention needs the full grid "
                "(KV compression or a value convolution); train it unmasked."
            )
        if keep_indices.ndim != 2 or keep_indices.shape[1] > n_tokens:
            raise ValueError(f"keep_indices must be (batch, K <= {n_tokens}), got shape {tuple(keep_indices.shape)}.")


def _mask(bias: torch.Tensor | None, backend: AttentionBackend, heads: int, q_len: int) -> AttentionMask | None:
    return None if bias is None else AttentionMask.from_bias(bias, backend, heads, q_len)


def _validate_config(
    norm_type,
    num_embeds_ada_norm,
    attention_type,
    null_caption_length,
    caption_channels,
    cross_attention_dim,
    inner_dim,
) -> None:
    if norm_type != "ada_norm_single":
        raise NotImplementedError(f"PixArtTransformer implements norm_type='ada_norm_single' only, got {norm_type!r}.")
    if num_embeds_ada_norm is None:
        raise ValueError("num_embeds_ada_norm cannot be None with norm_type='ada_norm_single'.")
    if attention_type not in (None, "default"):
        raise NotImplementedError(f"attention_type={attention_type!r} is not supported; use 'default'.")
    if caption_channels is not None and cross_attention_dim not in (None, inner_dim):
        raise ValueError(
            f"cross_attention_dim={cross_attention_dim} must equal num_attention_heads * attention_head_dim = "
            f"{inner_dim}: the caption projection maps text to the token width."
        )
    if null_caption_length is not None and caption_channels is None:
        raise ValueError("null_caption_length needs caption_channels (the null caption lives in caption space).")


def as_pixart_model(source) -> nn.Module:
    """A PixArt-family module, or one loaded (strictly) from a transformer or pipeline folder."""
    if isinstance(source, nn.Module):
        return source
    path = os.fspath(source)
    subfolder = "transformer" if os.path.isfile(os.path.join(path, "model_index.json")) else None
    return PixArtTransformer.from_pretrained(path, subfolder=subfolder)

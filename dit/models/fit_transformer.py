"""FiT / FiTv2: a flexible-resolution diffusion transformer over variable-length token sequences."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput

# diffusers' pipeline loader looks the name `ModelMixin` up in the module that model_index.json records.
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import apply_lora_scale
from torch import nn

from ..nn.attention import AttentionMask
from ..nn.attention.backends import AttentionBackend
from ..nn.attention.rope import get_extrapolation, rotary_embedding
from ..nn.blocks import FiTBlock
from ..nn.context import BlockContext
from ..nn.embeddings import CaptionProjection, TimestepEmbedding, fractional_sincos, timestep_sinusoid
from ..nn.linear import Linear
from ..nn.normalization import AdaLNOutputNorm, add_output_head
from ..nn.packing import TokenLayout, pack, patchify, token_layout, unpack, unpatchify
from .backbone import DiTBackbone, ForwardInputs, ForwardState
from .config_checks import check_positive_ints, check_prediction_record, is_positive_int
from .inputs import check_control_size, check_guidance, text_tokens
from .mixins import RecordedPrediction

# FiTBlock is re-exported from dit.nn.blocks
__all__ = ["OUTPUT_HEADS", "TIMESTEP_CONVENTIONS", "FiTBlock", "FiTTransformer", "ModelMixin"]


def diffusers_time(timestep: torch.Tensor) -> torch.Tensor:
    """The timestep as given (diffusers' scale: ``1000 * sigma`` for flow matching, the DDPM step)."""
    return timestep


def sit_time(timestep: torch.Tensor) -> torch.Tensor:
    """SiT's time ``1 - timestep / 1000`` in [0, 1], 1 = data, from diffusers' flow timestep ``1000 * sigma``."""
    return 1 - timestep / 1000


def fit_v1_time(timestep: torch.Tensor) -> torch.Tensor:
    """``min(timestep, 1)``: the released FiT v1 forward clamps its DDPM timestep (0..999) to at most 1."""
    return timestep.clamp(max=1.0)


#: ``timestep_convention`` -> the time the timestep embedding sees, from the (B,) timesteps the model is given.
TIMESTEP_CONVENTIONS = {"diffusers": diffusers_time, "sit": sit_time, "fit_v1": fit_v1_time}
#: ``output_head`` -> the ``modulation`` of :func:`~dit.nn.normalization.add_output_head` (None: PixArt's table).
OUTPUT_HEADS = {"table": None, "silu": "silu"}


@dataclass
class FiTState(ForwardState):
    """The forward state of FiT: the token layout of the padded batch (each sample's tokens and where they go)."""

    layout: TokenLayout | None = None


class FiTTransformer(DiTBackbone):
    """FiT / FiTv2 flexible-resolution diffusion transformer (arXiv 2402.12376, 2410.13925), text- or class-conditioned.

    An image of any size is a variable-length sequence of ``p x p`` patch tokens (up to ``max_tokens``) placed by
    2D rotary position embedding, not a fixed position table. A batch of different sizes comes as one zero-padded
    canvas plus per-sample ``image_sizes``: each sample's valid region is packed into the first tokens of its row,
    real tokens attend only to real tokens (finite key bias, so padding never yields NaN), and the output is zero
    outside each sample's valid region. A sample's output does not depend on the other samples in its batch.

    Blocks (:class:`FiTBlock`): QK-norm + 2D-RoPE self-attention, cross-attention to text, SwiGLU, AdaLN-LoRA. Beyond
    the training grid, RoPE extrapolates training-free (``rope_extrapolation``, :mod:`dit.nn.attention.rope`), changeable
    at inference with :meth:`set_extrapolation`. Timesteps are in diffusers' scale (``t * num_train_timesteps``
    for rectified flow), as the flow-matching schedulers feed them; ``timestep_convention`` says what the timestep
    embedding makes of them (the published FiT checkpoints embed SiT's time, :func:`dit.convert.load_original_fit`).

    Args:
        num_attention_heads: heads per attention layer.
        attention_head_dim: width of one head (divisible by 4); token width is ``heads * head_dim``.
        in_channels: latent channels.
        out_channels: output channels; None means ``in_channels`` (velocity prediction, no learned sigma).
        num_layers: number of blocks (FiTv2-XL: 36).
        patch_size: patch side in latent pixels.
        sample_size: training latent side; the pipeline's default size and the default training grid.
        max_tokens: most image tokens per sample without extrapolation; None: ``train_grid`` h * w.
        train_grid: (h, w) in patches of the training resolution, the reference of the extrapolation scale factors
            and of the logit scale; None: ``sample_size // patch_size`` both ways (FiT: 16 x 16).
        caption_channels: width of the text-encoder features, projected to the token width (None: none).
        cross_attention_dim: width of the text tokens in cross-attention when there is no caption projection
            (None with ``caption_channels`` None: no cross-attention).
        num_classes: class-conditional with this many classes plus a null class (id ``num_classes``); None: off.
        mlp_ratio: SwiGLU hidden width is ``int(2/3 * mlp_ratio * width)`` (FiTv2: 4; FiT v1's large SwiGLU: 6).
        adaln_lora_dim: rank of each block's modulation branch; None: width // 4.
        qk_norm: per-head non-affine LayerNorm on queries and keys.
        attention_bias: bias on q/k/v projections.
        dropout: dropout in attention and feed-forward.
        norm_eps: LayerNorm epsilon.
        rope_theta: RoPE base.
        rope_extrapolation: a name of :data:`~dit.nn.attention.rope.EXTRAPOLATIONS`: ``none``, ``pi``, ``ntk``,
            ``ntk_by_parts``, ``yarn``, ``ntk_pro1``, ``ntk_pro2``, each also as ``vision_<name>`` (one scale per axis).
        attention_logit_scale: multiply logits by ``max(1, log(tokens) / log(train tokens))`` per sample.
        absolute_position: ``none`` (FiT: RoPE is the only position signal) or ``fractional``: add to each token the
            2D sin-cos of its place as a fraction of its own image, on the ``train_grid`` scale
            (:func:`dit.nn.embeddings.fractional_sincos`, PixArt's interpolated table per axis). Not in FiT; for
            captions that place things ("on the left"), which relative RoPE alone cannot anchor. Parameter-free,
            defined at every size, so it needs no extrapolation.
        output_head: ``table`` (PixArt's: ``scale_shift_table`` (2, D) plus the condition embedding) or ``silu``
            (DiT's and FiT's: ``norm_out.linear`` of SiLU(condition) -> shift, scale; keys ``norm_out.linear``,
            ``proj_out``).
        timestep_convention: what the timestep embedding sees of ``timestep`` (:data:`TIMESTEP_CONVENTIONS`):
            ``diffusers`` the timestep as given; ``sit`` SiT's time ``1 - timestep / 1000`` (1 = data), for FiTv2
            checkpoints run with diffusers' flow timesteps ``1000 * sigma``; ``fit_v1`` ``min(timestep, 1)``, what
            the released FiT v1 forward embeds of its DDPM timesteps (its clamp: every timestep >= 1 embeds as 1).
        prediction_type: what the model predicts (default ``flow``): ``epsilon``, ``v_prediction``, ``sample``
            (x0) or ``flow`` (a rectified-flow velocity); the trainer records it, and a pipeline given
            ``scheduler=None`` samples with the matching scheduler (:func:`dit.pipelines.schedulers.default_scheduler`).
        noise_shift: the SNR shift of the discrete schedule the model was trained with (``objective.discrete.noise_shift``;
            None: PixArt's linear betas), for that default scheduler.
    """

    block_class = FiTBlock
    _skip_layerwise_casting_patterns = ["x_embedder", "norm", "timestep_embedder", "class_embedder"]
    #: A rectified-flow velocity unless the config records otherwise: pipelines default to a flow scheduler.
    prediction_type = RecordedPrediction("flow")
    #: Trained at native sizes and aspect ratios: pipelines snap to patch multiples, not PixArt's aspect-ratio bins.
    native_resolution = True
    supports_image_sizes = True
    supports_block_controls = True

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 4,
        out_channels: int | None = None,
        num_layers: int = 36,
        patch_size: int = 2,
        sample_size: int = 32,
        max_tokens: int | None = None,
        train_grid: tuple[int, int] | list[int] | None = None,
        caption_channels: int | None = None,
        cross_attention_dim: int | None = None,
        num_classes: int | None = None,
        mlp_ratio: float = 4.0,
        adaln_lora_dim: int | None = None,
        qk_norm: bool = True,
        attention_bias: bool = True,
        dropout: float = 0.0,
        norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        rope_extrapolation: str = "none",
        attention_logit_scale: bool = False,
        absolute_position: str = "none",
        output_head: str = "table",
        timestep_convention: str = "diffusers",
        prediction_type: str | None = "flow",
        noise_shift: float | None = None,
    ):
        super().__init__()
        check_prediction_record(prediction_type, noise_shift)
        check_positive_ints(
            num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim, in_channels=in_channels,
            num_layers=num_layers, patch_size=patch_size, sample_size=sample_size,
        )  # fmt: skip
        check_positive_ints(
            optional=True, out_channels=out_channels, max_tokens=max_tokens, caption_channels=caption_channels,
            cross_attention_dim=cross_attention_dim, num_classes=num_classes, adaln_lora_dim=adaln_lora_dim,
        )  # fmt: skip
        _check_train_grid(train_grid)
        inner_dim = num_attention_heads * attention_head_dim
        _validate_config(attention_head_dim, caption_channels, cross_attention_dim, inner_dim, rope_extrapolation)
        if absolute_position not in ("none", "fractional"):
            raise ValueError(f"absolute_position must be 'none' or 'fractional', got {absolute_position!r}.")
        _check_choice("output_head", output_head, OUTPUT_HEADS)
        _check_choice("timestep_convention", timestep_convention, TIMESTEP_CONVENTIONS)
        self.inner_dim = inner_dim
        self.out_channels = in_channels if out_channels is None else out_channels
        side = sample_size // patch_size
        self.train_grid = (side, side) if train_grid is None else (int(train_grid[0]), int(train_grid[1]))
        self.max_tokens = max_tokens or self.train_grid[0] * self.train_grid[1]
        self.gradient_checkpointing = False

        text_dim = inner_dim if caption_channels is not None else cross_attention_dim
        self.x_embedder = Linear(patch_size * patch_size * in_channels, inner_dim)
        self.timestep_embedder = TimestepEmbedding(256, inner_dim)
        self.class_embedder = nn.Embedding(num_classes + 1, inner_dim) if num_classes else None
        self.caption_projection = CaptionProjection(caption_channels, inner_dim) if caption_channels else None
        self.adaln_shared = Linear(inner_dim, 6 * inner_dim)  # AdaLN-LoRA's shared (global) modulation
        self.transformer_blocks = nn.ModuleList(
            [
                FiTBlock(
                    inner_dim,
                    num_attention_heads,
                    attention_head_dim,
                    cross_attention_dim=text_dim,
                    ff_inner_dim=int(2 * mlp_ratio * inner_dim / 3),
                    adaln_lora_dim=adaln_lora_dim or inner_dim // 4,
                    qk_norm=qk_norm,
                    attention_bias=attention_bias,
                    dropout=dropout,
                    norm_eps=norm_eps,
                )
                for _ in range(num_layers)
            ]
        )
        add_output_head(self, inner_dim, patch_size * patch_size * self.out_channels, OUTPUT_HEADS[output_head])
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT/FiT init: Xavier-uniform linears with zero bias, N(0, 0.02) embeddings, and zero last layers (shared
        modulation, every block's ``adaln_lora.linear_2``, ``proj_out`` and the ``silu`` head's modulation), so every
        block starts as the identity."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for module in (self.timestep_embedder.linear_1, self.timestep_embedder.linear_2):
            nn.init.normal_(module.weight, std=0.02)
        if self.class_embedder is not None:
            nn.init.normal_(self.class_embedder.weight, std=0.02)
        zeroed = [self.adaln_shared, self.proj_out] + [block.adaln_lora.linear_2 for block in self.transformer_blocks]
        if isinstance(self.norm_out, AdaLNOutputNorm):
            zeroed.append(self.norm_out.linear)
        for module in zeroed:
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def train_tokens(self) -> int:
        """Image tokens of the training grid (``train_grid`` h * w), the reference of resolution-dependent shifts."""
        return self.train_grid[0] * self.train_grid[1]

    def set_extrapolation(self, method: str = "none", logit_scale: bool | None = None) -> None:
        """Choose the training-free RoPE extrapolation (and, if given, the attention logit scale) for later forwards.

        Recorded in the config, so a saved model keeps it. ``method``: a name of
        :data:`~dit.nn.attention.rope.EXTRAPOLATIONS`. Inside the training grid every method equals ``none``, except
        FiT's ``ntk_pro1`` / ``ntk_pro2`` temperatures, which scale the logits there too (as FiT's code).
        """
        get_extrapolation(method)  # unknown names fail here
        logit_scale = self.config.attention_logit_scale if logit_scale is None else bool(logit_scale)
        self.register_to_config(rope_extrapolation=method, attention_logit_scale=logit_scale)

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
        image_sizes: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        guidance: None = None,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Predict the velocity for a batch of latents of possibly different sizes.

        Args:
            hidden_states: latents (B, in_channels, H, W); with ``image_sizes``, each sample zero-padded at the
                bottom/right of the H x W canvas.
            encoder_hidden_states: text features (B, L, caption_channels or cross_attention_dim).
            timestep: (B,) or a scalar, in diffusers' scale (0..num_train_timesteps), embedded as the config's
                ``timestep_convention`` says.
            added_cond_kwargs: accepted for pipeline compatibility (PixArt's micro-conditions); not read.
            cross_attention_kwargs: ``{"scale": s}`` scales the loaded PEFT LoRA layers for this call (diffusers'
                ``apply_lora_scale``); other keys are ignored with diffusers' warning.
            encoder_attention_mask: text keep-mask (B, L) (1 = keep), or an additive bias (B, 1, L).
            return_dict: return ``Transformer2DModelOutput`` instead of a tuple.
            block_controls: called after every block as ``block_controls(index, hidden_states, context)`` with the
                forward's :class:`~dit.nn.context.BlockContext`; returns the hidden states for the next block.
            image_sizes: (B, 2) latent (height, width) of each sample, divisible by ``patch_size``; None: every
                sample fills H x W.
            class_labels: (B,) class ids of a class-conditional model; None (or id ``num_classes``): the null class.
            guidance: accepted as None only (the model does not embed a guidance scale: no ``time_cond_proj_dim``).

        Returns:
            (B, out_channels, H, W), zero outside each sample's valid region.
        """
        inputs = ForwardInputs(
            hidden_states, encoder_hidden_states, timestep, encoder_attention_mask, added_cond_kwargs, guidance,
            block_controls,
        )  # fmt: skip
        return self.run_forward(
            inputs, return_dict, cross_attention_kwargs, image_sizes=image_sizes, class_labels=class_labels
        )

    def prepare(
        self,
        inputs: ForwardInputs,
        backend: AttentionBackend,
        image_sizes: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
    ) -> FiTState:
        """Each sample's patches packed into one padded sequence, the condition, text, masks and rotary tables."""
        check_guidance(inputs.guidance, None, None)
        hidden_states = inputs.hidden_states
        layout = self._layout(hidden_states, image_sizes)
        x = self._embed(hidden_states, layout)  # (B, L, D)
        emb = self._condition(inputs.timestep, class_labels, hidden_states.shape[0], x.dtype, x.device)  # (B, D)
        text, cross_bias = text_tokens(
            self.caption_projection, inputs.encoder_hidden_states, inputs.encoder_attention_mask, x.dtype
        )  # (B, L', D), (B, 1, 1, L')
        context = self._block_context(backend, layout, text, cross_bias, emb, x.dtype)
        return FiTState(x, context, emb, layout=layout)

    def unpatchify(self, hidden_states: torch.Tensor, state: FiTState) -> torch.Tensor:
        """(B, L, p*p*C) back to each sample's place on the canvas: (B, C, H, W), zeros outside valid regions."""
        return unpatchify(unpack(hidden_states, state.layout), state.layout.grid, self.config.patch_size)

    def _block_context(
        self,
        backend: AttentionBackend,
        layout: TokenLayout,
        text: torch.Tensor | None,
        cross_bias: torch.Tensor | None,
        emb: torch.Tensor,
        dtype: torch.dtype,
    ) -> BlockContext:
        """The blocks' context: condition and shared modulation from ``emb`` (B, D), masks in the backend's format
        (a key mask over padding when the samples came with their own sizes), rotary tables of the tokens."""
        cfg, length = self.config, layout.positions.shape[1]
        heads = cfg.num_attention_heads
        cond = F.silu(emb)  # (B, D)
        self_mask = None
        if layout.padded:
            self_mask = AttentionMask.from_keep(layout.keep, dtype, backend, heads, length)
        rotary = rotary_embedding(
            layout.positions, layout.sizes, cfg.attention_head_dim, self.train_grid, cfg.rope_extrapolation,
            cfg.attention_logit_scale, cfg.rope_theta, dtype,
        )  # fmt: skip
        return BlockContext(
            encoder_hidden_states=text,  # (B, L', D)
            encoder_attention_mask=None
            if cross_bias is None
            else AttentionMask.from_bias(cross_bias, backend, heads, length),
            attention_mask=self_mask,
            shared_modulation=self.adaln_shared(cond),  # (B, 6D)
            condition=cond,  # (B, D)
            grid=layout.grid,
            rotary=rotary,
            image_sizes=layout.sizes,  # (B, 2)
        )

    def _embed(self, latents: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """Latents (B, C, H, W) laid out by ``layout`` -> tokens (B, L, D), zero at padding."""
        x = self.x_embedder(pack(patchify(latents, self.config.patch_size), layout))  # (B, L, D)
        if self.config.absolute_position == "fractional":
            x = x + fractional_sincos(layout.positions, layout.sizes, self.train_grid, self.inner_dim).to(x.dtype)
        return x * layout.keep[..., None].to(x.dtype)  # (B, L, D)

    def control_tokens(self, controlnet_cond: torch.Tensor, context: BlockContext) -> torch.Tensor:
        """A ControlNet's control latent (B, C, H, W) as tokens like the latents: this model's patch embedding
        (and absolute position, if any), (B, N, D). Every sample must fill the canvas: when the batch came with
        ``image_sizes`` (a self-attention mask in ``context``), they are read on the host and must all equal it."""
        grid = context.grid
        if context.attention_mask is not None:
            sizes = sorted({tuple(s) for s in context.image_sizes.tolist()})
            if sizes != [tuple(grid)]:
                raise ValueError(
                    "ControlNet on FiTTransformer takes batches of one image size that fills the canvas; this batch "
                    f"mixes {sizes} (patch grids) on a {grid[0]}x{grid[1]} canvas."
                )
        check_control_size(controlnet_cond, grid, self.config.patch_size)
        return self._embed(controlnet_cond, self._layout(controlnet_cond, None))  # (B, N, D)

    def _condition(self, timestep, class_labels, batch: int, dtype: torch.dtype, device) -> torch.Tensor:
        """Timestep embedding (of the ``timestep_convention``'s time) plus the class embedding (null class when no
        labels are given): (B, D)."""
        timestep = torch.as_tensor(timestep, device=device).reshape(-1).expand(batch)  # (B,)
        timestep = timestep if timestep.dtype == torch.float64 else timestep.float()  # no fp16 / int arithmetic
        time = TIMESTEP_CONVENTIONS[self.config.timestep_convention](timestep)  # (B,)
        emb = self.timestep_embedder(timestep_sinusoid(time).to(dtype))  # (B, D)
        if self.class_embedder is None:
            if class_labels is not None:
                raise ValueError("class_labels were given, but this model has no num_classes.")
            return emb
        if class_labels is None:
            class_labels = torch.full((batch,), self.config.num_classes, device=device)
        labels = torch.as_tensor(class_labels, device=device).reshape(-1).expand(batch)  # (B,)
        return emb + self.class_embedder(labels).to(dtype)

    def _layout(self, hidden_states: torch.Tensor, image_sizes) -> TokenLayout:
        """Check the per-sample sizes (the canvas is checked by ``check_inputs``) and lay the samples out as tokens.

        The sequence length comes from the canvas alone (capped at ``max_tokens`` without extrapolation), so it is
        the same for every batch on one canvas. The sizes are checked on the host in eager mode: keep them on the
        CPU (as the trainer does) and the check costs no device sync; compiled graphs skip it.
        """
        batch, _, height, width = hidden_states.shape
        p, device = self.config.patch_size, hidden_states.device
        grid = (height // p, width // p)
        if image_sizes is None:
            self._check_token_counts([grid])
            full = torch.full((batch, 2), grid[0], dtype=torch.long, device=device)  # (B, 2): no host copy
            full[:, 1] = grid[1]
            return token_layout(full, grid, padded=False)
        sizes = _as_sizes(image_sizes, batch)
        if not torch.compiler.is_compiling():
            self._check_sizes(sizes.tolist(), (height, width))
        length = grid[0] * grid[1]
        if self.config.rope_extrapolation == "none":
            length = min(length, self.max_tokens)
        return token_layout(sizes // p, grid, device, length)

    def _check_sizes(self, sizes: list[list[int]], canvas: tuple[int, int]) -> None:
        p = self.config.patch_size
        for h, w in sizes:
            if h % p or w % p or not (0 < h <= canvas[0] and 0 < w <= canvas[1]):
                raise ValueError(
                    f"Image size {h}x{w} must be positive, fit the {canvas[0]}x{canvas[1]} canvas and divide into "
                    f"{p}x{p} patches."
                )
        self._check_token_counts([(h // p, w // p) for h, w in sizes])

    def _check_token_counts(self, grids: list[tuple[int, int]]) -> None:
        if self.config.rope_extrapolation != "none":
            return
        p = self.config.patch_size
        for h, w in grids:
            if h * w > self.max_tokens:
                raise ValueError(
                    f"Image size {h * p}x{w * p} (latent) is {h * w} tokens, more than max_tokens={self.max_tokens}. "
                    "Enable a RoPE extrapolation (set_extrapolation('vision_ntk'), or the rope_extrapolation config) "
                    "to go beyond the training length."
                )


def _as_sizes(image_sizes, batch: int) -> torch.Tensor:
    """``image_sizes`` (a (B, 2) tensor on any device, or a sequence of (h, w) pairs) as a long tensor."""
    sizes = image_sizes if isinstance(image_sizes, torch.Tensor) else torch.tensor(image_sizes)
    if sizes.shape != (batch, 2):
        raise ValueError(f"image_sizes must be (batch={batch}, 2) latent (height, width), got {tuple(sizes.shape)}.")
    return sizes.long()


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}.")


def _check_train_grid(train_grid) -> None:
    """None, or the training grid (h, w) in patches: two positive ints."""
    if train_grid is None:
        return
    if not isinstance(train_grid, (list, tuple)) or len(train_grid) != 2 or not all(map(is_positive_int, train_grid)):
        raise ValueError(f"train_grid must be None or two positive ints (h, w), got {train_grid!r}.")


def _validate_config(head_dim, caption_channels, cross_attention_dim, inner_dim, rope_extrapolation) -> None:
    if head_dim % 4:
        raise ValueError(f"attention_head_dim must be divisible by 4 for 2D RoPE, got {head_dim}.")
    if caption_channels is not None and cross_attention_dim not in (None, inner_dim):
        raise ValueError(
            f"cross_attention_dim={cross_attention_dim} must equal num_attention_heads * attention_head_dim = "
            f"{inner_dim}: the caption projection maps text to the token width."
        )
    get_extrapolation(rope_extrapolation)

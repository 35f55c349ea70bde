"""The one attention module of the toolkit, an attention module of diffusers' (processors, QKV fusion, hooks)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention
from torch import nn

from ..linear import Linear
from .backends import AttentionBackend, get_backend
from .kv_compress import KVCompress
from .mask import AttentionMask
from .processors import AttentionSpec, DiTAttnProcessor, call_processor, warn_unused_kwargs
from .rope import RotaryEmbedding


class DiTAttention(Attention, AttentionModuleMixin):
    """Multi-head attention with diffusers' parameter names (``to_q``, ``to_k``, ``to_v``, ``to_out.0``).

    Self-attention when ``encoder_hidden_states`` is None, cross-attention otherwise. Variants are options of this
    one module, given as one typed :class:`~dit.nn.attention.processors.AttentionSpec` (checked where it is built),
    each a small pure op or submodule:

    - ``kernel="softmax"``: a registered backend (``sdpa`` by default, ``math`` as the plain reference,
      ``xformers`` on CUDA, or one of diffusers' dispatcher backends); ``kernel="linear"``: ReLU linear attention
      accumulated in fp32 (LiT).
    - ``kv_compress_ratio``: keys and values on a coarser grid (PixArt-Σ), queries untouched (:class:`KVCompress`).
    - ``conv_kernel_size``: a depthwise convolution of the values over the token grid added to the output (``dwc``,
      LiT's locality term; zero-initialised, so an inherited model starts from plain linear attention).
    - ``qk_norm``: ``True`` (or ``"layer_norm"``) is a non-affine LayerNorm over each head of the queries and keys
      (FiTv2), before any rotary embedding; it has no parameters, so the state dict is unchanged.
      ``"layer_norm_across_heads"`` (diffusers' name) is PixArt-Σ's: an affine LayerNorm over the full width
      (eps 1e-5, keys ``norm_q`` / ``norm_k``) on queries and keys before the heads are split and before KV
      compression. ``qk_norm_affine`` / ``qk_norm_eps`` change either kind's affine parameters and epsilon
      (MicroDiT: across heads, non-affine, eps 1e-6).
    - rotary position embedding (FiT's 2D RoPE, :mod:`dit.nn.attention.rope`): ``rotary=RotaryEmbedding(...)`` in
      ``forward`` rotates queries and keys of self-attention and applies its logit scale to the queries.

    Grid options need ``grid=(h, w)`` in ``forward``.

    It is an attention module of diffusers' (``Attention`` and ``AttentionModuleMixin``; ``Attention``'s constructor
    is not run, the attributes its processors read are set here), so diffusers finds and drives it: processors
    (``set_processor``, :class:`~dit.nn.attention.processors.DiTAttnProcessor` by default; any other is called as
    diffusers calls processors, e.g. PAG's), QKV fusion (``fuse_projections`` / ``unfuse_projections``; the state
    dict keeps its keys either way) and diffusers' hooks (pyramid attention broadcast, layer skip, ...).

    Args:
        query_dim: width of the query tokens.
        heads: number of heads.
        dim_head: width of one head.
        cross_attention_dim: width of the key/value tokens when it differs from ``query_dim``.
        bias: bias on the q/k/v projections.
        out_bias: bias on the output projection.
        dropout: dropout after the output projection.
        spec: the variant options (kernel, KV compression, value convolution, QK-norm); None: plain softmax
            attention. Its ``heads`` is the caller's business (the block that sizes this module).
    """

    _default_processor_cls = DiTAttnProcessor
    _available_processors = [DiTAttnProcessor]
    _supports_qkv_fusion = True

    def __init__(
        self,
        query_dim: int,
        heads: int,
        dim_head: int,
        cross_attention_dim: int | None = None,
        bias: bool = True,
        out_bias: bool = True,
        dropout: float = 0.0,
        spec: AttentionSpec | None = None,
    ):
        nn.Module.__init__(self)  # not Attention.__init__: the modules are built here, with the same names
        spec = AttentionSpec() if spec is None else spec
        if spec.needs_grid and cross_attention_dim is not None:
            raise ValueError("kv_compress_ratio and conv_kernel_size are self-attention options (they need a grid).")
        inner_dim = heads * dim_head
        kv_dim = cross_attention_dim or query_dim
        self.heads, self.kernel = heads, spec.kernel
        self.to_q = Linear(query_dim, inner_dim, bias=bias)
        self.to_k = Linear(kv_dim, inner_dim, bias=bias)
        self.to_v = Linear(kv_dim, inner_dim, bias=bias)
        self.to_out = nn.ModuleList([Linear(inner_dim, query_dim, bias=out_bias), nn.Dropout(dropout)])
        self.kv_compress = None
        if spec.kv_compress_ratio:
            ratio, mode, padding = spec.kv_compress_ratio, spec.kv_compress_mode, spec.kv_compress_padding
            self.kv_compress = KVCompress(inner_dim, ratio, mode, padding)
        self.dwc = None
        if spec.conv_kernel_size:
            size = spec.conv_kernel_size
            self.dwc = nn.Conv2d(inner_dim, inner_dim, size, padding=size // 2, groups=inner_dim)
            nn.init.zeros_(self.dwc.weight)
            nn.init.zeros_(self.dwc.bias)
        self.qk_norm = spec.qk_norm
        self.norm_q, self.norm_k = _qk_norms(spec, dim_head, inner_dim)
        self.backend: AttentionBackend = get_backend("sdpa")
        _set_diffusers_attributes(self, query_dim, dim_head, inner_dim, cross_attention_dim, bias, dropout)
        self.processor = DiTAttnProcessor()
        self.register_state_dict_post_hook(_state_dict_without_fused)
        self.register_load_state_dict_post_hook(_refresh_fused_after_load)

    @property
    def needs_grid(self) -> bool:
        return self.kv_compress is not None or self.dwc is not None

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        mask: AttentionMask | None = None,
        grid: tuple[int, int] | None = None,
        rotary: RotaryEmbedding | None = None,
        **cross_attention_kwargs: Any,
    ) -> torch.Tensor:
        """``hidden_states`` (B, N, C) attend to ``encoder_hidden_states`` (B, L, C') or to themselves.

        ``mask`` is the key mask, made once per forward by the model in every form the kernels read; ``grid``
        the (h, w) token grid of ``hidden_states``, needed by KV compression and the value convolution;
        ``rotary`` the per-token rotary tables (B, N, 1, D) and logit scale of self-attention. A processor that is
        not a :class:`DiTAttnProcessor` gets diffusers' arguments (``attention_mask`` as a (B, 1, Lk) bias) and
        ``cross_attention_kwargs``; the default one ignores them with diffusers' warning.
        """
        if isinstance(self.processor, DiTAttnProcessor):
            if cross_attention_kwargs:
                warn_unused_kwargs(self.processor, list(cross_attention_kwargs))
            return self.processor(self, hidden_states, encoder_hidden_states, mask, grid=grid, rotary=rotary)
        return call_processor(self, hidden_states, encoder_hidden_states, mask, rotary, cross_attention_kwargs)

    # ----- diffusers' attention-module API -----------------------------------------------------------------------
    def set_attention_backend(self, backend: str) -> None:
        """This module's softmax kernel by name (``sdpa``, ``math``, or a diffusers dispatcher backend); a model sets
        all of its modules with its own ``set_attention_backend`` (which also makes the masks in the kernel's format,
        so ``xformers`` is chosen there)."""
        chosen = get_backend(backend)
        if chosen.name == "xformers":
            raise ValueError(
                "Choose xformers on the model (model.set_attention_backend('xformers')): it needs its masks."
            )
        self.backend = chosen

    def set_use_memory_efficient_attention_xformers(self, valid: bool, attention_op=None) -> None:
        """A no-op: the model chooses the kernel of all its modules (its own method of this name is the one diffusers'
        ``enable_xformers_memory_efficient_attention`` calls first), so a recursive walk leaves that choice alone."""

    @torch.no_grad()
    def fuse_projections(self, fuse: bool = True) -> None:
        """Fuse ``to_q``/``to_k``/``to_v`` into ``to_qkv`` (self-attention) or ``to_k``/``to_v`` into ``to_kv``
        (cross-attention), diffusers' names; the default processor then makes one product. The separate projections
        stay and remain the weights the state dict holds (the fused layer's keys are left out of it, and loading a
        state dict re-fuses). ``unfuse_projections()`` (diffusers') removes the fused layer."""
        if not fuse:
            self.unfuse_projections()
            return
        if self.fused_projections:
            return
        weight, bias = _concatenated(self)  # (sum of outputs, C_in), (sum of outputs,) or None
        fused = Linear(
            weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype
        )
        _copy_into(fused, weight, bias)
        setattr(self, _fused_name(self), fused)
        self.fused_sizes = [layer.weight.shape[0] for layer in _sources(self)]
        self.fused_projections = True

    def fused_projection(self) -> nn.Module | None:
        """The fused projection the default processor uses, or None: not fused, or the separate projections are
        wrapped (PEFT adapters), so that their adapters count."""
        if not self.fused_projections or not all(isinstance(m, nn.Linear) for m in (self.to_q, self.to_k, self.to_v)):
            return None
        return getattr(self, _fused_name(self))


#: QK-norm kind -> (width it normalises, default affine, default eps)
_QK_NORM_DEFAULTS = {"layer_norm": ("head", False, 1e-6), "layer_norm_across_heads": ("inner", True, 1e-5)}


def _qk_norms(spec: AttentionSpec, dim_head: int, inner_dim: int) -> tuple[nn.Module | None, nn.Module | None]:
    """``norm_q`` and ``norm_k`` of ``spec``'s QK-norm (None, None without one): LayerNorms over one head or the full
    width, affine (weight and bias) and with the epsilon of the kind unless ``spec`` sets them."""
    if spec.qk_norm is None:
        return None, None
    width, affine, eps = _QK_NORM_DEFAULTS[spec.qk_norm]
    affine = affine if spec.qk_norm_affine is None else spec.qk_norm_affine
    eps = eps if spec.qk_norm_eps is None else spec.qk_norm_eps
    size = dim_head if width == "head" else inner_dim
    return tuple(nn.LayerNorm(size, eps=eps, elementwise_affine=affine, bias=affine) for _ in range(2))


def _set_diffusers_attributes(
    attn: DiTAttention, query_dim: int, dim_head: int, inner_dim: int, cross_attention_dim: int | None, bias, dropout
) -> None:
    """The attributes diffusers' ``Attention`` sets and its processors, hooks and mixins read; the options it has and
    this module has not (group/spatial/cross norms, added projections, residual, rescaling) are off."""
    attn.query_dim, attn.out_dim, attn.out_context_dim = query_dim, query_dim, query_dim
    attn.inner_dim = attn.inner_kv_dim = inner_dim
    attn.is_cross_attention = cross_attention_dim is not None
    attn.cross_attention_dim = cross_attention_dim or query_dim
    attn.use_bias, attn.dropout = bias, dropout
    attn.scale_qk, attn.scale = True, dim_head**-0.5
    attn.rescale_output_factor, attn.residual_connection = 1.0, False
    attn.upcast_attention = attn.upcast_softmax = attn.is_causal = attn.only_cross_attention = False
    attn.sliceable_head_dim = attn.heads
    attn.added_kv_proj_dim = attn.context_pre_only = None
    attn.added_proj_bias, attn.pre_only, attn._from_deprecated_attn_block = True, False, False
    for name in ("group_norm", "spatial_norm", "norm_cross", "add_q_proj", "add_k_proj", "add_v_proj"):
        setattr(attn, name, None)
    attn.norm_added_q = attn.norm_added_k = attn.to_add_out = None
    attn.fused_projections, attn.fused_sizes = False, None


def _fused_name(attn: DiTAttention) -> str:
    return "to_kv" if attn.is_cross_attention else "to_qkv"


def _sources(attn: DiTAttention) -> list[nn.Module]:
    return [attn.to_k, attn.to_v] if attn.is_cross_attention else [attn.to_q, attn.to_k, attn.to_v]


def _concatenated(attn: DiTAttention) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The separate projections' weights and biases, stacked in the fused layer's order."""
    sources = _sources(attn)
    weight = torch.cat([layer.weight for layer in sources])  # (sum of outputs, C_in)
    return weight, None if sources[0].bias is None else torch.cat([layer.bias for layer in sources])


@torch.no_grad()
def _copy_into(fused: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    fused.weight.copy_(weight)
    if bias is not None:
        fused.bias.copy_(bias)


def _state_dict_without_fused(attn: DiTAttention, state_dict: dict, prefix: str, local_metadata) -> None:
    """``state_dict`` hook: the fused layer is derived from the separate projections, whose keys the state dict keeps
    (so a fused model saves what an unfused one saves)."""
    if attn.fused_projections:
        for kind in ("weight", "bias"):
            state_dict.pop(f"{prefix}{_fused_name(attn)}.{kind}", None)


def _refresh_fused_after_load(attn: DiTAttention, incompatible_keys) -> None:
    """``load_state_dict`` hook: a fused module loads the unfused keys (what its state dict holds) and re-fuses
    them; the fused layer's own keys are not expected."""
    if not attn.fused_projections:
        return
    for key in [k for k in incompatible_keys.missing_keys if k.rpartition(".")[0].endswith(_fused_name(attn))]:
        incompatible_keys.missing_keys.remove(key)
    if attn.fused_projection() is not None:
        _copy_into(attn.fused_projection(), *_concatenated(attn))

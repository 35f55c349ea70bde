"""adaLN-single (one timestep MLP shared by every block, plus per-block learned offsets) and the adaLN output heads."""

from __future__ import annotations

import torch
from torch import nn

from .embeddings import CombinedTimestepSizeEmbeddings
from .linear import Linear


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift`` with (B, 1, D) modulation over (B, N, D) tokens, in one pass.

    ``x`` must be a temporary (a norm's output): without autograd it is overwritten instead of allocating.
    """
    if torch.is_grad_enabled() and (x.requires_grad or shift.requires_grad or scale.requires_grad):
        return torch.addcmul(shift, x, 1 + scale)
    return torch.addcmul(shift, x, 1 + scale, out=x)


class AdaLayerNormSingle(nn.Module):
    """PixArt's adaLN-single (keys ``emb.*`` and ``linear``).

    Returns ``(t6, emb)``: the six shared modulation vectors (B, 6D) and the raw condition embedding (B, D)
    that the output head uses.
    """

    def __init__(
        self, embedding_dim: int, use_additional_conditions: bool = False, time_cond_proj_dim: int | None = None
    ):
        super().__init__()
        self.emb = CombinedTimestepSizeEmbeddings(embedding_dim, use_additional_conditions, time_cond_proj_dim)
        self.silu = nn.SiLU()
        self.linear = Linear(embedding_dim, 6 * embedding_dim)

    def forward(
        self,
        timestep: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor | None] | None,
        batch_size: int,
        hidden_dtype: torch.dtype,
        timestep_cond: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        added = added_cond_kwargs or {}
        emb = self.emb(
            timestep,
            added.get("resolution"),
            added.get("aspect_ratio"),
            batch_size=batch_size,
            hidden_dtype=hidden_dtype,
            timestep_cond=timestep_cond,
        )  # (B, D)
        return self.linear(self.silu(emb)), emb  # (B, 6D), (B, D)


# ----- the adaLN output heads ---------------------------------------------------------------------------------
#: activations of a modulated output head's condition branch, by the name a config gives
HEAD_ACTIVATIONS = {"silu": nn.SiLU, "gelu_tanh": lambda: nn.GELU(approximate="tanh")}


class AdaLNOutputNorm(nn.Module):
    """The output norm of DiT / FiT / MicroDiT: a LayerNorm modulated by ``linear(activation(emb))`` -> (shift,
    scale), keys ``norm`` and ``linear`` (D -> 2D, shift first).

    Args:
        dim: token width.
        activation: ``silu`` (DiT, FiT) or ``gelu_tanh`` (MicroDiT), applied to the condition first.
        affine: the LayerNorm has a weight (MicroDiT's bias-free affine norm: ``affine=True, bias=False``).
        bias: the LayerNorm has a bias (with ``affine``).
        eps: LayerNorm epsilon.
    """

    def __init__(self, dim: int, activation: str = "silu", affine: bool = False, bias: bool = True, eps: float = 1e-6):
        super().__init__()
        if activation not in HEAD_ACTIVATIONS:
            raise ValueError(f"output head activation must be one of {sorted(HEAD_ACTIVATIONS)}, got {activation!r}.")
        self.act = HEAD_ACTIVATIONS[activation]()
        self.linear = Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=affine, bias=bias and affine)

    def forward(self, hidden_states: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """(B, N, D) tokens, (B, D) condition -> (B, N, D)."""
        shift, scale = self.linear(self.act(emb))[:, None].chunk(2, dim=-1)  # (B, 1, D) each
        return modulate(self.norm(hidden_states), shift, scale)


def add_output_head(
    model: nn.Module, dim: int, out_features: int, modulation: str | None = None, **norm_options: object
) -> None:
    """Give ``model`` an adaLN output head under diffusers' top-level keys, created in this order.

    ``modulation=None`` (PixArt): ``norm_out`` (non-affine LayerNorm), ``scale_shift_table`` (2, D) added to the
    raw condition embedding, and ``proj_out`` (D -> ``out_features``). ``modulation="silu"`` or ``"gelu_tanh"``
    (DiT, FiT, MicroDiT): ``norm_out`` an :class:`AdaLNOutputNorm` with that activation (``norm_options``: its
    ``affine``, ``bias``, ``eps``), then ``proj_out``.
    """
    if modulation is None:
        if norm_options:
            raise ValueError(f"the scale_shift_table head takes no norm options, got {sorted(norm_options)}.")
        model.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        model.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)
    else:
        model.norm_out = AdaLNOutputNorm(dim, modulation, **norm_options)
    model.proj_out = Linear(dim, out_features)


def output_head(model: nn.Module, hidden_states: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """The output head of :func:`add_output_head`: ``proj_out`` of ``norm_out`` modulated by the condition
    embedding ``emb`` (B, D): (B, N, D) -> (B, N, out_features)."""
    if isinstance(model.norm_out, AdaLNOutputNorm):
        return model.proj_out(model.norm_out(hidden_states, emb))
    shift, scale = (model.scale_shift_table[None] + emb[:, None]).chunk(2, dim=1)  # (B, 1, D) each
    return model.proj_out(modulate(model.norm_out(hidden_states), shift, scale))

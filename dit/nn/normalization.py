"""adaLN-single: one timestep MLP shared by every block, plus per-block learned offsets."""

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

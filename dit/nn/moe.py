"""Expert-choice mixture-of-experts feed-forward (MicroDiT's ``FeedForwardECMoe``)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .linear import Linear


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """Tokens each expert takes: ``int(capacity_factor * T / E)``, between 1 and ``T``."""
    return min(num_tokens, max(1, int(capacity_factor * num_tokens / num_experts)))


class ExpertChoiceFeedForward(nn.Module):
    """Expert-choice routing (Zhou et al. 2022): every expert picks its top-``k`` tokens by gate probability.

    Gate probabilities are a softmax over experts per token; expert ``e`` takes the ``k = int(capacity_factor * T /
    E)`` tokens of each sample with the highest probability for it, runs its 2-layer GELU MLP on them and adds the
    result weighted by that probability. A token may be taken by several experts or by none (then it passes through
    the block's residual only). Every expert does the same work, so no load-balancing loss is needed. The routing of
    the last forward is summarised by :meth:`routing_stats`.

    Args:
        dim: token width.
        num_experts: experts ``E``.
        capacity_factor: average experts per token (``k * E / T``); MicroDiT uses 2.
        inner_dim: hidden width of each expert MLP (default ``4 * dim``).
        bias: biases in the expert MLPs.
        approximate: the experts' GELU, ``tanh`` (the default) or ``none`` (exact, as MicroDiT's ``nn.GELU()``).
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        capacity_factor: float = 2.0,
        inner_dim: int | None = None,
        bias: bool = True,
        approximate: str = "tanh",
    ):
        super().__init__()
        if num_experts < 1 or capacity_factor <= 0:
            raise ValueError(f"Need num_experts >= 1 and capacity_factor > 0, got {num_experts}, {capacity_factor}.")
        if approximate not in ("tanh", "none"):
            raise ValueError(f"approximate must be 'tanh' or 'none' (exact GELU), got {approximate!r}.")
        inner = inner_dim or 4 * dim
        self.num_experts, self.capacity_factor, self.approximate = num_experts, capacity_factor, approximate
        self.gate = Linear(dim, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(num_experts, dim, inner) * dim**-0.5)  # (E, D, F)
        self.w2 = nn.Parameter(torch.randn(num_experts, inner, dim) * inner**-0.5)  # (E, F, D)
        self.b1 = nn.Parameter(torch.zeros(num_experts, 1, inner)) if bias else None  # (E, 1, F)
        self.b2 = nn.Parameter(torch.zeros(num_experts, 1, dim)) if bias else None  # (E, 1, D)
        self._stats: dict[str, torch.Tensor] = {}

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D)."""
        batch, tokens, dim = hidden_states.shape
        probs = self.gate(hidden_states).float().softmax(dim=-1)  # (B, T, E)
        k = expert_capacity(tokens, self.num_experts, self.capacity_factor)
        weight, index = probs.transpose(1, 2).topk(k, dim=-1)  # (B, E, k): each expert's tokens
        flat = index.flatten(1)  # (B, E*k)
        picked = hidden_states.gather(1, flat[:, :, None].expand(-1, -1, dim))  # (B, E*k, D)
        picked = picked.view(batch, self.num_experts, k, dim).transpose(0, 1).reshape(self.num_experts, -1, dim)
        hidden = torch.bmm(picked, self.w1.to(picked.dtype))  # (E, B*k, F)
        if self.b1 is not None:
            hidden = hidden + self.b1.to(hidden.dtype)
        out = torch.bmm(F.gelu(hidden, approximate=self.approximate), self.w2.to(picked.dtype))  # (E, B*k, D)
        if self.b2 is not None:
            out = out + self.b2.to(out.dtype)
        out = out.view(self.num_experts, batch, k, dim).transpose(0, 1)  # (B, E, k, D)
        out = (out * weight[..., None].to(out.dtype)).reshape(batch, -1, dim)  # (B, E*k, D)
        self._record(flat, tokens)
        combined = hidden_states.new_zeros(batch, tokens, dim)  # (B, T, D)
        return combined.scatter_add(1, flat[:, :, None].expand(-1, -1, dim), out)  # a token's experts summed

    def _record(self, flat_index: torch.Tensor, tokens: int) -> None:
        with torch.no_grad():
            counts = torch.zeros(flat_index.shape[0], tokens, device=flat_index.device)  # (B, T)
            counts.scatter_add_(1, flat_index, torch.ones_like(flat_index, dtype=counts.dtype))
            self._stats = {
                "token_coverage": (counts > 0).float().mean(),  # share of tokens seen by at least one expert
                "experts_per_token": counts.mean(),  # = k * E / T
                "max_experts_per_token": counts.max(),
            }

    def routing_stats(self) -> dict[str, float]:
        """The last forward's routing: share of tokens taken by >= 1 expert, mean and max experts per token."""
        return {name: float(value) for name, value in self._stats.items()}


def moe_routing_stats(model: nn.Module) -> dict[str, float]:
    """Expert utilisation of ``model``'s last forward, averaged over its :class:`ExpertChoiceFeedForward` layers
    (their :meth:`~ExpertChoiceFeedForward.routing_stats`); {} without experts or before a forward."""
    stats = [m.routing_stats() for m in model.modules() if isinstance(m, ExpertChoiceFeedForward)]
    stats = [s for s in stats if s]
    if not stats:
        return {}
    return {key: float(np.mean([s[key] for s in stats])) for key in stats[0]}

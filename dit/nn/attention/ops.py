"""Pure attention ops: head reshapes, key masks, and the softmax kernels.

One layout everywhere: queries, keys and values are ``(batch, tokens, heads, head_dim)``, as
``diffusers.models.attention_dispatch`` expects. A key mask arrives at the model boundary as a boolean
keep-mask ``(batch, key_tokens)`` and is turned into the kernel's own format once per forward
(:func:`keep_mask_to_bias`, :func:`xformers_bias`), never repeated per head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Additive bias of a discarded key, as PixArt and diffusers use it (exp(-1e4) is exactly 0 in fp32).
MASKED_BIAS = -10000.0


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, L, H*D)`` -> ``(B, L, H, D)`` (a view)."""
    return x.unflatten(-1, (heads, -1))


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``(B, L, H, D)`` -> ``(B, L, H*D)``."""
    return x.flatten(-2)


def keep_mask_to_bias(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean keep-mask ``(B, Lk)`` -> additive bias ``(B, 1, 1, Lk)`` broadcast over heads and queries."""
    bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device)  # (B, Lk)
    bias.masked_fill_(~keep, MASKED_BIAS)
    return bias[:, None, None, :]  # (B, 1, 1, Lk)


def math_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Reference softmax attention, computed in fp32. ``mask`` is an additive bias broadcastable to (B, H, Lq, Lk)."""
    scale = q.shape[-1] ** -0.5
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale  # (B, H, Lq, Lk)
    if mask is not None:
        scores = scores + mask.float()
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v.float())  # (B, Lq, H, D)
    return out.to(q.dtype)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """torch ``scaled_dot_product_attention``; without a mask it may take the flash kernel."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)  # (B, Lq, H, D)


def xformers_bias(bias: torch.Tensor, heads: int, q_len: int) -> torch.Tensor:
    """Expand a ``(B, 1, 1, Lk)`` bias for xformers, whose kernels need the key stride padded to a multiple of 8.

    The storage is allocated with ``Lk`` rounded up to 8 and sliced back, so a 300-token T5 mask works
    (diffusers' xformers path fails there).
    """
    batch, key_len = bias.shape[0], bias.shape[-1]
    padded = (key_len + 7) // 8 * 8
    storage = bias.new_full((batch, heads, q_len, padded), MASKED_BIAS)  # (B, H, Lq, Lk8)
    storage[..., :key_len] = bias
    return storage[..., :key_len]


def xformers_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """xformers memory-efficient attention (CUDA only); ``mask`` comes from :func:`xformers_bias`."""
    import xformers.ops

    return xformers.ops.memory_efficient_attention(q, k, v, attn_bias=mask)  # (B, Lq, H, D)


def relu_linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None = None, eps: float = 1e-6
) -> torch.Tensor:
    """ReLU-kernel linear attention ``relu(q) (sum_j relu(k_j)^T v_j) / (relu(q) sum_j relu(k_j)^T)``, O(N D^2).

    Everything is accumulated in fp32 and the result is a convex combination of value rows (weights >= 0 summing
    to 1, or 0 where a query meets no key), so it is bounded by ``max |v|`` and cannot overflow when cast back to
    fp16/bf16: no clipping is needed. ``keep`` (B, Lk) drops keys (padding).
    """
    qf, kf, vf = F.relu(q.float()), F.relu(k.float()), v.float()  # (B, L, H, D)
    if keep is not None:
        kf = kf * keep[:, :, None, None].to(kf.dtype)
    kv = torch.einsum("bkhd,bkhe->bhde", kf, vf)  # (B, H, D, E)
    numerator = torch.einsum("bqhd,bhde->bqhe", qf, kv)  # (B, Lq, H, E)
    denominator = torch.einsum("bqhd,bhd->bqh", qf, kf.sum(dim=1))  # (B, Lq, H)
    return (numerator / (denominator[..., None] + eps)).to(q.dtype)


def linear_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None = None, eps: float = 1e-6
) -> torch.Tensor:
    """The same formula computed the naive O(N^2) way, through the (Lq, Lk) similarity matrix (for tests)."""
    sim = torch.einsum("bqhd,bkhd->bhqk", F.relu(q.double()), F.relu(k.double()))  # (B, H, Lq, Lk)
    if keep is not None:
        sim = sim * keep[:, None, None, :].double()
    out = torch.einsum("bhqk,bkhd->bqhd", sim, v.double()) / (sim.sum(-1).transpose(1, 2)[..., None] + eps)
    return out.to(q.dtype)  # (B, Lq, H, D)


def tokens_to_grid(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(B, h*w, C)`` row-major tokens -> ``(B, C, h, w)``."""
    height, width = grid
    if x.shape[1] != height * width:
        raise ValueError(f"{x.shape[1]} tokens do not fill a {height}x{width} grid.")
    return x.transpose(1, 2).unflatten(-1, (height, width))


def grid_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B, h*w, C)`` row-major tokens."""
    return x.flatten(2).transpose(1, 2)

"""Masked keys skipped on the device: the ``sdpa_flex`` backend.

Attention without a mask runs torch SDPA (flash kernels on a GPU). Attention with a key mask (padded text keys in
cross-attention, padded image tokens of a mixed-size batch) runs FlexAttention over a ``BlockMask`` built on the
device from the mask, once per forward: key blocks that every query of a sample ignores are never loaded, and
nothing is read on the host, so it works where the mask is device data (diffusers' pipelines pass 300-token T5
masks on the GPU), under CUDA graphs and inside compiled graphs. Where the mask is still on the host, trimming it
is cheaper (:mod:`dit.nn.text_padding`; the backbones do it themselves for CPU masks).

Exact against SDPA with PixArt's additive bias: a masked key has weight ``exp(-1e4) = 0`` there, and a sample with
no kept key attends to all keys under the finite bias, so its block mask keeps every key.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .ops import MASKED_BIAS, sdpa_attention

#: FlexAttention's block size along queries and keys (a skipped key block is this many keys).
FLEX_BLOCK_SIZE = 128


@dataclass(frozen=True)
class FlexMask:
    """A key mask as the ``sdpa_flex`` kernel reads it: the FlexAttention ``block`` mask, and the additive ``bias``
    (B, 1, 1, Lk) for SDPA where FlexAttention cannot run (its backward on the CPU)."""

    block: BlockMask
    bias: torch.Tensor


@functools.cache
def _compiled_flex_attention():
    """FlexAttention compiled (once per process; torch compiles per shape at the first call)."""
    return torch.compile(flex_attention, fullgraph=True)


def attended_keys(bias: torch.Tensor) -> torch.Tensor:
    """The keys each sample reads under an additive bias (B, 1, 1, Lk): (B, Lk) bool. A sample that masks every
    key reads them all (its finite bias shifts every logit alike)."""
    keep = bias[:, 0, 0, :] > MASKED_BIAS / 2  # (B, Lk)
    return keep | ~keep.any(dim=-1, keepdim=True)  # (B, Lk)


def flex_mask(bias: torch.Tensor, heads: int, q_len: int) -> FlexMask:
    """The ``sdpa_flex`` form of a key bias (B, 1, 1, Lk) for ``q_len`` queries (``AttentionBackend.adapt_mask``)."""
    return FlexMask(block=flex_block_mask(bias, q_len), bias=bias)


def flex_block_mask(bias: torch.Tensor, q_len: int) -> BlockMask:
    """The ``BlockMask`` of a key bias (B, 1, 1, Lk) for ``q_len`` queries: made on the bias's device, no host read.

    Built from the key blocks directly (a few dozen small ops, where ``create_block_mask`` evaluates the mask at every
    query and key): per sample, the blocks every key of which is kept run unmasked, those with some kept keys run
    with the mask, the others are skipped; one mask serves every head.
    """
    keep = attended_keys(bias)  # (B, Lk)
    batch, n_keys = keep.shape
    n_blocks = -(-n_keys // FLEX_BLOCK_SIZE)
    padded = torch.nn.functional.pad(keep, (0, n_blocks * FLEX_BLOCK_SIZE - n_keys))  # (B, n * S), padding dropped
    blocks = padded.view(batch, n_blocks, FLEX_BLOCK_SIZE)  # (B, n, S)
    full, some = blocks.all(dim=-1), blocks.any(dim=-1)  # (B, n)
    q_blocks = -(-q_len // FLEX_BLOCK_SIZE)

    def key_kept(b, h, q_idx, kv_idx):
        return keep[b, kv_idx]

    partial_count, partial_index = _block_list(some & ~full, q_blocks)
    full_count, full_index = _block_list(full, q_blocks)
    return BlockMask.from_kv_blocks(
        partial_count, partial_index, full_count, full_index, BLOCK_SIZE=FLEX_BLOCK_SIZE, mask_mod=key_kept,
        seq_lengths=(q_len, n_keys), compute_q_blocks=torch.is_grad_enabled(),
    )  # fmt: skip


def _block_list(selected: torch.Tensor, q_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (B, n) selection of key blocks as BlockMask rows, the same for every query block: counts (B, 1, Q) and
    indices (B, 1, Q, n), the selected blocks first, in order."""
    count = selected.sum(dim=-1, dtype=torch.int32)  # (B,)
    index = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True).to(torch.int32)  # (B, n)
    batch, n_blocks = selected.shape
    count = count[:, None, None].expand(batch, 1, q_blocks).contiguous()  # (B, 1, Q)
    index = index[:, None, None, :].expand(batch, 1, q_blocks, n_blocks).contiguous()  # (B, 1, Q, n)
    return count, index


def sdpa_flex_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: FlexMask | None = None
) -> torch.Tensor:
    """SDPA without a mask; FlexAttention over the mask's block mask with one. All (B, L, H, D).

    The FlexAttention kernel is compiled at its first call per shape (torch's own eager path materialises every
    score); inside a graph being compiled the plain function is traced into it. On the CPU, where FlexAttention
    has no backward and inductor cannot lower it inside a larger graph, a forward that needs gradients or is being
    compiled runs SDPA with the bias (the same attention).
    """
    if mask is None:
        return sdpa_attention(q, k, v)  # (B, Lq, H, D)
    if q.device.type == "cpu" and (torch.compiler.is_compiling() or _needs_grad(q, k, v)):
        return sdpa_attention(q, k, v, mask.bias)  # (B, Lq, H, D)
    run = flex_attention if torch.compiler.is_compiling() else _compiled_flex_attention()
    out = run(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask.block)  # (B, H, Lq, D)
    return out.transpose(1, 2)  # (B, Lq, H, D)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)

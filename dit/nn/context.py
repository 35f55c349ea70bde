"""The per-forward context of the blocks: everything a block reads besides its hidden states, named."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention.mask import AttentionMask
from .attention.rope import RotaryEmbedding


@dataclass(frozen=True)
class BlockContext:
    """What every block of one forward shares, built once per forward by the backbone and handed unchanged to each
    block (``block(hidden_states, context)``), each ControlNet block and the ``block_controls`` hook. With token
    masking (training) the blocks after the masking get a second one, made at the same time for the kept tokens.

    Masks are :class:`~dit.nn.attention.mask.AttentionMask` objects, each built once per forward in every form the
    kernels read, for the number of tokens the blocks run on. A frozen dataclass: gradient checkpointing
    (non-reentrant) and ``torch.compile`` take it as a block argument like a tuple. The fields a family does not use
    stay None (a backbone's contract says which it fills, see :class:`~dit.models.backbone.DiTBackbone`).

    Args:
        encoder_hidden_states: text tokens (B, L, D_text) after the caption projection; None without text.
        encoder_attention_mask: cross-attention key mask over the L text tokens; None: all kept.
        attention_mask: self-attention key mask over the N image tokens; None: all kept.
        shared_modulation: the six modulation vectors (B, 6D) every block offsets by its own: PixArt's adaLN-single
            output (each block adds its ``scale_shift_table``), FiT's AdaLN-LoRA shared part (each block adds its
            low-rank ``adaln_lora`` of ``condition``).
        condition: the activated condition (B, D), input of each block's modulation: FiT's SiLU(c) (its low-rank
            ``adaln_lora``), MicroDiT's GELU_tanh(c) (its per-block adaLN); None for the PixArt family.
        grid: (h, w) token grid of the hidden states, in patches (FiT: the padded canvas); None once token masking
            dropped tokens.
        rotary: rotary tables (B, N, 1, Dh) and logit scale of the N tokens (FiT); None for PixArt.
        image_sizes: (B, 2) grid (h, w) in patches of each sample, on the tokens' device (FiT); None for PixArt.
    """

    encoder_hidden_states: torch.Tensor | None = None
    encoder_attention_mask: AttentionMask | None = None
    attention_mask: AttentionMask | None = None
    shared_modulation: torch.Tensor | None = None
    condition: torch.Tensor | None = None
    grid: tuple[int, int] | None = None
    rotary: RotaryEmbedding | None = None
    image_sizes: torch.Tensor | None = None

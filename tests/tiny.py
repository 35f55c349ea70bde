"""Tiny configs and helpers for tests (the tiny T5, tokenizer and VAE live in :mod:`dit.tiny`)."""

from __future__ import annotations

import torch
from diffusers import PixArtTransformer2DModel

from dit import PixArtTransformer
from dit.tiny import tiny_t5, tiny_tokenizer, tiny_vae  # noqa: F401  (re-exported for the tests)

# α-1024-MS style: micro-conditions on (sample_size 128 would switch them on by default; set explicitly here)
ALPHA = dict(
    num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8, num_layers=2,
    cross_attention_dim=24, sample_size=8, caption_channels=32, use_additional_conditions=True,
    interpolation_scale=2,
)  # fmt: skip
# Σ style: no micro-conditions, 300-token text in the real model
SIGMA = dict(
    num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8, num_layers=2,
    cross_attention_dim=24, sample_size=8, caption_channels=32, use_additional_conditions=False,
    interpolation_scale=1,
)  # fmt: skip
CONFIGS = {"alpha": ALPHA, "sigma": SIGMA}
# FiT: 4x4-patch training grid (sample_size 8, patch 2), up to 48 tokens per image (e.g. a 12x16 latent)
FIT = dict(
    num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2, patch_size=2, sample_size=8,
    max_tokens=48, caption_channels=32,
)  # fmt: skip


def randomize_(model: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Give every parameter non-trivial random values (default inits zero some paths)."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def diffusers_and_ours(config: dict, seed: int = 0) -> tuple[PixArtTransformer2DModel, PixArtTransformer]:
    """diffusers' PixArtTransformer2DModel with random weights and ours with the very same weights."""
    torch.manual_seed(seed)
    reference = randomize_(PixArtTransformer2DModel(**config)).eval()
    ours = PixArtTransformer(**config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def added_cond(batch: int, height: int = 64, width: int = 64) -> dict[str, torch.Tensor]:
    return {
        "resolution": torch.tensor([[float(height), float(width)]]).repeat(batch, 1),
        "aspect_ratio": torch.tensor([[height / width]]).repeat(batch, 1),
    }

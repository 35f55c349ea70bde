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


def assert_fp32_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-5) -> None:
    """Parity in fp32: ``max |actual - expected| <= tolerance * max(1, max |expected|)``.

    The tolerance is scaled by the output's magnitude because rounding differences grow with the largest values
    through a network: our modulation and gated residuals are fused multiply-adds (``addcmul``, one rounding)
    where diffusers multiplies and adds (two), which on AVX-512 CPUs moves outputs of magnitude ~10 by ~1.3e-5
    (measured: 0.9-1.9e-6 with diffusers' order of operations, up to 1.26e-5 with ours). A wrong formula misses
    by orders of magnitude more.
    """
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(1.0, expected.abs().max().item())
    difference = (actual - expected).abs().max().item()
    assert difference <= tolerance * scale, f"max |diff| {difference:.3g} > {tolerance:g} x {scale:.3g}"


# ----- one forward of every backbone variant, for compile, sync and placement checks ------------------------------
FORWARD_VARIANTS = ["alpha-mask", "sigma-mask", "sigma-kv", "lit", "fit-mixed", "microdit-masked"]


def variant_model(name: str) -> torch.nn.Module:
    """A tiny model of backbone variant ``name`` (see :data:`FORWARD_VARIANTS`), fp32, on the CPU."""
    from dit import FiTTransformer, LiTTransformer, MicroDiTTransformer

    torch.manual_seed(0)
    if name == "alpha-mask":
        return PixArtTransformer(**ALPHA).eval()
    if name == "sigma-mask":
        return PixArtTransformer(**SIGMA).eval()
    if name == "sigma-kv":
        return PixArtTransformer(**SIGMA, kv_compress_ratio=2, kv_compress_layers=[0, 1]).eval()
    if name == "lit":
        return LiTTransformer(**SIGMA).eval()
    if name == "fit-mixed":
        return FiTTransformer(**FIT).eval()
    if name == "microdit-masked":
        return MicroDiTTransformer(**SIGMA, num_experts=2, patch_mixer_layers=1).train()
    raise KeyError(name)


def variant_inputs(name: str, device: torch.device | str = "cpu", text_length: int = 12, real: int = 7) -> dict:
    """Keyword inputs of one forward of ``name``: batch 2, a non-square 8x12 latent, text of ``text_length`` tokens
    of which ``real`` (and 3) are kept. Per-sample image sizes stay host data (a CPU tensor), as the trainer has them."""
    from dit.masking import keep_indices_from_scores, kept_count

    gen = torch.Generator().manual_seed(1)
    mask = torch.zeros(2, text_length, dtype=torch.long)
    mask[0, :3], mask[1, :real] = 1, 1
    inputs = {
        "hidden_states": torch.randn(2, 4, 8, 12, generator=gen),
        "encoder_hidden_states": torch.randn(2, text_length, 32, generator=gen),
        "timestep": torch.tensor([10.0, 500.0]),
        "encoder_attention_mask": mask,
    }
    if name == "alpha-mask":
        inputs["added_cond_kwargs"] = added_cond(2, 64, 96)
    if name == "microdit-masked":
        inputs["keep_indices"] = keep_indices_from_scores(torch.rand(2, 24, generator=gen), kept_count(24, 0.5))
    inputs = _to_device(inputs, device)
    if name == "fit-mixed":
        inputs["image_sizes"] = torch.tensor([[8, 4], [4, 12]])
    return inputs


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value

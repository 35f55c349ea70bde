"""A backbone forward's inputs, shared by every family: checks that name the problem, text tokens and masks made
once per forward, PixArt-α's micro-conditions from the latent size, and the LCM guidance embedding."""

from __future__ import annotations

import torch
from torch import nn

from ..nn.attention.ops import keep_mask_to_bias
from ..nn.embeddings import guidance_scale_embedding
from ..nn.text_padding import trim_text_padding


def check_inputs(model: nn.Module, hidden_states, encoder_hidden_states, timestep) -> None:
    """Raise a ValueError naming the problem unless the latents, text and timestep fit ``model``'s config."""
    cfg = model.config
    if hidden_states.ndim != 4:
        raise ValueError(
            f"hidden_states must be (batch, channels, height, width), got shape {tuple(hidden_states.shape)}."
        )
    if hidden_states.shape[1] != cfg.in_channels:
        raise ValueError(f"hidden_states has {hidden_states.shape[1]} channels; this model takes {cfg.in_channels}.")
    height, width = hidden_states.shape[-2:]
    if height % cfg.patch_size or width % cfg.patch_size:
        raise ValueError(f"Latent size {height}x{width} is not divisible by the patch size {cfg.patch_size}.")
    if timestep is None:
        raise ValueError("timestep is required.")
    _check_text(model, hidden_states.shape[0], encoder_hidden_states)


def _check_text(model: nn.Module, batch: int, encoder_hidden_states) -> None:
    if encoder_hidden_states is None:
        if model.transformer_blocks and model.transformer_blocks[0].attn2 is not None:
            raise ValueError("encoder_hidden_states is required: this model has cross-attention to text.")
        return
    if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != batch:
        raise ValueError(
            f"encoder_hidden_states must be (batch={batch}, tokens, width), "
            f"got shape {tuple(encoder_hidden_states.shape)}."
        )
    if encoder_hidden_states.shape[-1] != model.text_embed_dim:
        raise ValueError(
            f"encoder_hidden_states has width {encoder_hidden_states.shape[-1]}; this model's text embedding "
            f"width (caption_channels / cross_attention_dim) is {model.text_embed_dim}."
        )


def check_control_size(controlnet_cond: torch.Tensor, grid: tuple[int, int], patch_size: int) -> None:
    """Raise a ValueError naming both sizes unless the control latent covers the token ``grid`` (h, w) exactly."""
    size, expected = tuple(controlnet_cond.shape[-2:]), (grid[0] * patch_size, grid[1] * patch_size)
    if size != expected:
        raise ValueError(
            f"The control latent is {size[0]}x{size[1]}; the model's latents are {expected[0]}x{expected[1]}. "
            "Control images must have the size of the generated image."
        )


def as_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A keep-mask (B, L) or additive bias (B, 1, L) -> additive bias (B, 1, 1, L); None stays None.

    Pure tensor ops, no read on the host: a mask that keeps everything still becomes a (zero) bias.
    """
    if mask is None:
        return None
    if mask.ndim == 2:
        return keep_mask_to_bias(mask.bool(), dtype)
    if mask.ndim == 3:
        return mask.to(dtype)[:, None]  # (B, 1, 1, L)
    raise ValueError(f"A mask must be (batch, tokens) or a bias (batch, 1, tokens), got shape {tuple(mask.shape)}.")


def text_tokens(
    caption_projection: nn.Module | None,
    encoder_hidden_states: torch.Tensor | None,
    mask: torch.Tensor | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The text tokens (B, L, D) through ``caption_projection`` (if any) and their bias (B, 1, 1, L), once per
    forward.

    A keep-mask that is host data (a CPU tensor: diffusers' pipelines on the CPU, a GPU model given a CPU mask) has
    its padding trimmed here first (:func:`dit.nn.text_padding.trim_text_padding`; exact, reading it costs no
    sync). A mask on an accelerator is never read: pipelines and the trainer trim before it moves, and the
    ``sdpa_flex`` attention backend skips its padded key blocks on the device. Inside a compiled graph nothing is
    trimmed (the length would depend on data).
    """
    if encoder_hidden_states is not None and mask is not None and mask.shape[-1] != encoder_hidden_states.shape[1]:
        raise ValueError(
            f"encoder_attention_mask has shape {tuple(mask.shape)}; expected {tuple(encoder_hidden_states.shape[:2])}."
        )
    if _host_mask(encoder_hidden_states, mask):
        encoder_hidden_states, mask = trim_text_padding(encoder_hidden_states, mask)  # (B, L', C), (B, L')
    tokens = encoder_hidden_states
    if caption_projection is not None and tokens is not None:
        tokens = caption_projection(tokens)  # (B, L, D)
    return tokens, as_bias(mask, dtype)


def _host_mask(encoder_hidden_states: torch.Tensor | None, mask: torch.Tensor | None) -> bool:
    """Whether ``mask`` is a keep-mask (B, L) on the host that can be trimmed without a device sync."""
    return (
        encoder_hidden_states is not None
        and mask is not None
        and mask.ndim == 2
        and mask.device.type == "cpu"
        and not torch.compiler.is_compiling()
    )


def micro_conditions(
    added_cond_kwargs: dict | None, latents: torch.Tensor, vae_scale_factor: int
) -> dict[str, torch.Tensor]:
    """PixArt-α's ``resolution`` (B, 2) and ``aspect_ratio`` (B, 1): those given in ``added_cond_kwargs``, else the
    image's from the latent size (pixels = latent x ``vae_scale_factor``), filled on the latents' device in their
    dtype (no host-to-device copy). Given ones of batch 1 are broadcast over the batch, as the original PixArt's
    ``SizeEmbedder`` repeats them (PixArt-δ's CFG batch passes one ``data_info`` for both halves)."""
    batch = latents.shape[0]
    given = {k: _batched(k, v, batch) for k, v in (added_cond_kwargs or {}).items() if v is not None}
    if "resolution" in given and "aspect_ratio" in given:
        return given
    height, width = latents.shape[-2] * vae_scale_factor, latents.shape[-1] * vae_scale_factor
    like = {"dtype": latents.dtype, "device": latents.device}
    resolution = torch.cat([torch.full((batch, 1), height, **like), torch.full((batch, 1), width, **like)], dim=1)
    return {"resolution": resolution, "aspect_ratio": torch.full((batch, 1), height / width, **like), **given}


def _batched(name: str, value, batch: int):
    """A micro-condition (B or 1, k) with batch 1 expanded to ``batch``; any other batch is an error. Other keys and
    values that are not 2-D tensors are passed on unchanged."""
    if name not in ("resolution", "aspect_ratio") or not isinstance(value, torch.Tensor) or value.ndim != 2:
        return value
    if value.shape[0] not in (1, batch):
        raise ValueError(
            f"added_cond_kwargs[{name!r}] has shape {tuple(value.shape)}: give one row per sample ({batch}) or one "
            "row for the whole batch."
        )
    return value.expand(batch, -1)  # (B, k)


def guidance_condition(
    guidance: torch.Tensor | float, batch: int, dim: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """LCM's embedding of the guidance scale ``g`` (B,) or a scalar: ``guidance_scale_embedding(g - 1)`` (B, dim) in
    ``dtype``. A Python number is subtracted in double precision, a tensor in its own dtype (as pipelines and the
    trainer always did)."""
    if isinstance(guidance, torch.Tensor):
        w = (guidance.to(device, non_blocking=True) - 1).reshape(-1).expand(batch)  # (B,)
    else:
        w = torch.full((batch,), guidance - 1.0, device=device)  # (B,)
    return guidance_scale_embedding(w, dim).to(dtype)  # (B, dim)


def check_guidance(guidance, timestep_cond, time_cond_proj_dim: int | None) -> None:
    """``guidance`` needs a model with ``time_cond_proj_dim`` and excludes an explicit ``timestep_cond``."""
    if guidance is None:
        return
    if time_cond_proj_dim is None:
        raise ValueError(
            "guidance was given, but this model does not embed the guidance scale (its config has no "
            "time_cond_proj_dim): use classifier-free guidance instead."
        )
    if timestep_cond is not None:
        raise ValueError("Pass either guidance (the scale, embedded by the model) or timestep_cond, not both.")

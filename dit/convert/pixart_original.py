"""Original PixArt-α / PixArt-Σ repository checkpoints -> this toolkit's (= diffusers') keys.

The learned null caption ``y_embedder.y_embedding`` is kept (diffusers' converter drops it), so the pipeline
can use it as the unconditional branch of classifier-free guidance exactly as PixArt's own inference does.
"""

from __future__ import annotations

import os
import re

import torch

from ..checkpoint import check_keys, load_state_dict_file
from ..models.pixart_transformer import PixArtTransformer

# original prefix -> diffusers prefix, for the tensors that are renamed only
_RENAMES = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
    "csize_embedder.mlp.0": "adaln_single.emb.resolution_embedder.linear_1",
    "csize_embedder.mlp.2": "adaln_single.emb.resolution_embedder.linear_2",
    "ar_embedder.mlp.0": "adaln_single.emb.aspect_ratio_embedder.linear_1",
    "ar_embedder.mlp.2": "adaln_single.emb.aspect_ratio_embedder.linear_2",
    "t_block.1": "adaln_single.linear",
    "y_embedder.y_proj.fc1": "caption_projection.linear_1",
    "y_embedder.y_proj.fc2": "caption_projection.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.scale_shift_table": "scale_shift_table",
    "y_embedder.y_embedding": "y_embedding",
}
_BLOCK_RENAMES = {
    "scale_shift_table": "scale_shift_table",
    "attn.proj": "attn1.to_out.0",
    "cross_attn.q_linear": "attn2.to_q",
    "cross_attn.proj": "attn2.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
    "attn.sr": "attn1.kv_compress.conv",  # PixArt-Σ KV compression (conv mode): shared by K and V
    "attn.norm": "attn1.kv_compress.norm",
}
_SPLITS = {
    "attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "cross_attn.kv_linear": ("attn2.to_k", "attn2.to_v"),
}
_DROPPED = {"pos_embed"}  # the fixed-grid table; the toolkit computes it for any grid
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)$|blocks\.(\d+)\.(scale_shift_table)$")


def _convert_block_key(key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    match = _BLOCK_KEY.match(key)
    if match is None:
        raise KeyError(f"Unrecognised block key {key!r} in the original checkpoint.")
    index, name, kind = (
        (match.group(1), match.group(2), match.group(3)) if match.group(1) else (match.group(4), match.group(5), None)
    )
    prefix, suffix = f"transformer_blocks.{index}.", (f".{kind}" if kind else "")
    if name in ("attn.q_norm", "attn.k_norm"):
        raise NotImplementedError(
            f"{key!r}: QK-norm PixArt checkpoints are not supported yet (no released one uses it)."
        )
    if name in _SPLITS:
        targets = _SPLITS[name]
        if tensor.shape[0] % len(targets):
            raise ValueError(
                f"{key!r} with shape {tuple(tensor.shape)} cannot be split into {len(targets)} projections."
            )
        return {prefix + t + suffix: part for t, part in zip(targets, tensor.chunk(len(targets), dim=0))}
    if name not in _BLOCK_RENAMES:
        raise KeyError(f"Unrecognised block key {key!r} in the original checkpoint.")
    return {prefix + _BLOCK_RENAMES[name] + suffix: tensor}


def convert_pixart_original_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and split q/k/v of) an original PixArt state dict to diffusers keys, keeping ``y_embedding``."""
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key in _DROPPED:
            continue
        if key.startswith("blocks."):
            converted.update(_convert_block_key(key, tensor))
            continue
        stem, _, kind = key.rpartition(".")
        if key in _RENAMES:
            converted[_RENAMES[key]] = tensor
        elif stem in _RENAMES:
            converted[f"{_RENAMES[stem]}.{kind}"] = tensor
        else:
            raise KeyError(f"Unrecognised key {key!r} in the original PixArt checkpoint.")
    return converted


def infer_pixart_config(
    state_dict: dict[str, torch.Tensor],
    sample_size: int = 128,
    attention_head_dim: int = 72,
    interpolation_scale: float | None = None,
) -> dict:
    """The ``PixArtTransformer`` config of an original checkpoint (converted keys), as diffusers' converters set it.

    ``sample_size`` is the latent side of the training resolution (image side / 8): 32, 64, 128 or 256;
    ``interpolation_scale`` defaults to PixArt's ``lewei_scale`` for that resolution (0.5, 1, 2, 4).
    """
    proj = state_dict["pos_embed.proj.weight"]  # (D, C, p, p)
    inner_dim, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    if inner_dim % attention_head_dim:
        raise ValueError(f"Width {inner_dim} is not a multiple of attention_head_dim={attention_head_dim}.")
    blocks = {int(k.split(".")[1]) for k in state_dict if k.startswith("transformer_blocks.")}
    caption = state_dict["caption_projection.linear_1.weight"]  # (D, C_text)
    null = state_dict.get("y_embedding")
    compressed = sorted(int(k.split(".")[1]) for k in state_dict if k.endswith("attn1.kv_compress.conv.weight"))
    kv_compress = {}
    if compressed:
        ratio = state_dict[f"transformer_blocks.{compressed[0]}.attn1.kv_compress.conv.weight"].shape[-1]
        kv_compress = {"kv_compress_ratio": ratio, "kv_compress_mode": "conv", "kv_compress_layers": compressed}
    return {
        "num_attention_heads": inner_dim // attention_head_dim,
        "attention_head_dim": attention_head_dim,
        "in_channels": in_channels,
        "out_channels": state_dict["proj_out.weight"].shape[0] // (patch * patch),
        "num_layers": len(blocks),
        "cross_attention_dim": inner_dim,
        "sample_size": sample_size,
        "patch_size": patch,
        "interpolation_scale": sample_size / 64 if interpolation_scale is None else interpolation_scale,
        "use_additional_conditions": "adaln_single.emb.resolution_embedder.linear_1.weight" in state_dict,
        "caption_channels": caption.shape[1],
        "null_caption_length": None if null is None else null.shape[0],
        **kv_compress,
    }


def load_original_pixart(
    path: str | os.PathLike,
    sample_size: int = 128,
    attention_head_dim: int = 72,
    interpolation_scale: float | None = None,
    allow_pickle: bool = False,
    torch_dtype: torch.dtype | None = None,
):
    """Build a :class:`~dit.PixArtTransformer` from an original PixArt checkpoint file (strict).

    Args:
        path: ``.safetensors`` file, or ``.pth`` with ``allow_pickle=True``.
        sample_size: latent side of the checkpoint's resolution (image side / 8).
        attention_head_dim: 72 for every released PixArt model.
        interpolation_scale: position scale; None means PixArt's for ``sample_size``.
        allow_pickle: opt in to reading a pickle checkpoint.
        torch_dtype: cast the weights to this dtype.
    """
    state_dict = convert_pixart_original_state_dict(load_state_dict_file(path, allow_pickle=allow_pickle))
    model = PixArtTransformer(**infer_pixart_config(state_dict, sample_size, attention_head_dim, interpolation_scale))
    check_keys(model.state_dict().keys(), state_dict.keys(), where=f"converted checkpoint {os.fspath(path)!r}")
    model.load_state_dict(state_dict, strict=True)
    return model.to(torch_dtype) if torch_dtype is not None else model

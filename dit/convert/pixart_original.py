"""Original PixArt-α / PixArt-Σ repository checkpoints -> this toolkit's (= diffusers') keys.

The learned null caption ``y_embedder.y_embedding`` is kept (diffusers' converter drops it), so the pipeline
can use it as the unconditional branch of classifier-free guidance as PixArt-α's inference does (PixArt-Σ's
inference encodes the empty prompt instead; Σ training overwrites ``y_embedding`` with that encoding).

What a state dict cannot show is given to :func:`load_original_pixart`: the parameter-free KV compression
(``uniform`` / ``ave``) as the original ``kv_compress_config``, and which weights of a training checkpoint
(``use_ema``). The position scale is read from the original's fixed ``pos_embed`` table when it is present.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Mapping

import torch

from ..checkpoint import PICKLE_SUFFIXES, check_keys, load_state_dict_file, read_pickle
from ..models.pixart_transformer import PixArtTransformer
from ..nn.embeddings import sincos_2d

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
    "attn.q_norm": "attn1.norm_q",  # PixArt-Σ qk_norm=True: LayerNorm over the full width
    "attn.k_norm": "attn1.norm_k",
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


def position_scale_of(pos_embed: torch.Tensor) -> float | None:
    """The position scale (``lewei_scale`` / ``pe_interpolation``) an original fixed ``pos_embed`` table
    (1, g*g, D) was computed with, or None when it is not such a sin-cos table (e.g. zeros).

    The column position of token 1 is ``1 / scale``; it is read from the lowest frequency (whose angle stays
    below π) and the whole table is checked against the one that scale gives.
    """
    table = pos_embed.reshape(-1, pos_embed.shape[-1]).double()  # (g*g, D)
    tokens, dim = table.shape
    side = math.isqrt(tokens)
    if side * side != tokens or side < 2 or dim % 4:
        return None
    quarter = dim // 4
    angle = torch.atan2(table[1, quarter - 1], table[1, 2 * quarter - 1]).item()  # the column half, last frequency
    position = angle * 10000 ** ((quarter - 1) / quarter)
    if not position > 0:
        return None
    scale = round(1.0 / position, 5)
    expected = sincos_2d(dim, side, side, side, scale).double()  # (g*g, D)
    return scale if torch.allclose(table, expected, atol=1e-4) else None


def infer_pixart_config(
    state_dict: dict[str, torch.Tensor],
    sample_size: int = 128,
    attention_head_dim: int = 72,
    interpolation_scale: float | None = None,
) -> dict:
    """The ``PixArtTransformer`` config of an original checkpoint (converted keys), as diffusers' converters set it.

    ``sample_size`` is the latent side of the training resolution (image side / 8): 32, 64, 128 or 256;
    ``interpolation_scale`` defaults to PixArt's ``lewei_scale`` for that resolution (0.5, 1, 2, 4), but PixArt-α's
    256 model used 1: :func:`load_original_pixart` reads it from the checkpoint's ``pos_embed`` when present.
    Conv KV compression (the only kind with parameters) gets ``kv_compress_padding="none"``, the original's.
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
        kv_compress = {
            "kv_compress_ratio": ratio,
            "kv_compress_mode": "conv",
            "kv_compress_layers": compressed,
            "kv_compress_padding": "none",
        }
    qk_norm = (
        {"qk_norm": "layer_norm_across_heads"} if any(k.endswith("attn1.norm_q.weight") for k in state_dict) else {}
    )
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
        **qk_norm,
    }


def read_original_checkpoint(
    checkpoint: str | os.PathLike | Mapping, use_ema: bool = False, allow_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """The original-key state dict of a checkpoint: a file path, a state dict, or a training checkpoint's dict.

    Released checkpoints hold ``{"state_dict": ...}``; training ones (``save_checkpoint``) also
    ``"state_dict_ema"``, which ``use_ema=True`` takes. A pickle file is read with ``weights_only=True``; one that
    needs code to load (a pickled class or function) needs ``allow_pickle=True`` (:func:`~dit.checkpoint.read_pickle`).
    """
    if isinstance(checkpoint, Mapping):
        state = checkpoint
    elif os.fspath(checkpoint).endswith(PICKLE_SUFFIXES):
        state = read_pickle(checkpoint, allow_pickle=allow_pickle)
    else:
        state = load_state_dict_file(checkpoint, allow_pickle=allow_pickle)
    key = "state_dict_ema" if use_ema else "state_dict"
    if use_ema and key not in state:
        raise KeyError(
            "use_ema=True, but the checkpoint has no 'state_dict_ema' entry (a training checkpoint of the original "
            f"code has one); it has {sorted(state)[:5]}..."
        )
    if key in state and isinstance(state[key], Mapping):
        state = state[key]
    return dict(state)


def kv_compress_config(kv_compress: Mapping | None) -> dict:
    """Our config fields for an original ``kv_compress_config`` ({"sampling", "scale_factor", "kv_compress_layer"}),
    with the original's behaviour on grids not divisible by the ratio (``kv_compress_padding="none"``)."""
    if not kv_compress or kv_compress.get("sampling") is None or kv_compress.get("scale_factor", 1) == 1:
        return {"kv_compress_ratio": None}
    layers = kv_compress.get("kv_compress_layer")
    return {
        "kv_compress_ratio": int(kv_compress["scale_factor"]),
        "kv_compress_mode": kv_compress["sampling"],
        "kv_compress_layers": None if layers is None else [int(i) for i in layers],
        "kv_compress_padding": "none",
    }


def load_original_pixart(
    checkpoint: str | os.PathLike | Mapping,
    sample_size: int = 128,
    attention_head_dim: int = 72,
    interpolation_scale: float | None = None,
    allow_pickle: bool = False,
    torch_dtype: torch.dtype | None = None,
    kv_compress: Mapping | bool | None = None,
    use_ema: bool = False,
):
    """Build a :class:`~dit.PixArtTransformer` from an original PixArt checkpoint (strict).

    Args:
        checkpoint: ``.safetensors`` file, ``.pth`` (read weights-only), or the loaded dict (a state dict, or
            ``{"state_dict": ..., "state_dict_ema": ...}``).
        sample_size: latent side of the checkpoint's resolution (image side / 8).
        attention_head_dim: 72 for every released PixArt model.
        interpolation_scale: position scale; None reads it from the checkpoint's ``pos_embed`` table, else
            PixArt's for ``sample_size``.
        allow_pickle: opt in to unpickling in full a ``.pth`` that weights-only loading cannot read (it can run code).
        torch_dtype: cast the weights to this dtype.
        kv_compress: the original model's ``kv_compress_config`` (``{"sampling": "conv" | "ave" | "uniform",
            "scale_factor": r, "kv_compress_layer": [...]}``), which ``ave`` and ``uniform`` need since they leave no
            parameters; ``False`` says there is none. None: inferred from the conv parameters, with a warning when
            the checkpoint has none (it may have been trained with ``ave`` / ``uniform``).
        use_ema: take a training checkpoint's ``state_dict_ema`` (the EMA weights) instead of ``state_dict``.
    """
    original = read_original_checkpoint(checkpoint, use_ema=use_ema, allow_pickle=allow_pickle)
    if interpolation_scale is None and "pos_embed" in original:
        interpolation_scale = position_scale_of(original["pos_embed"])
    state_dict = convert_pixart_original_state_dict(original)
    config = infer_pixart_config(state_dict, sample_size, attention_head_dim, interpolation_scale)
    if kv_compress is None and config.get("kv_compress_ratio") is None:
        warnings.warn(
            "This PixArt checkpoint has no KV-compression parameters, so it is loaded without KV compression; "
            "if it was trained with the parameter-free 'ave' or 'uniform' compression, pass its "
            "kv_compress={'sampling': ..., 'scale_factor': ..., 'kv_compress_layer': [...]} (kv_compress=False "
            "silences this).",
            UserWarning,
            stacklevel=2,
        )
    elif isinstance(kv_compress, Mapping) or kv_compress is False:
        config.update(kv_compress_config(kv_compress or None))
    model = PixArtTransformer(**config)
    where = "converted checkpoint" + (f" {os.fspath(checkpoint)!r}" if not isinstance(checkpoint, Mapping) else "")
    check_keys(model.state_dict().keys(), state_dict.keys(), where=where)
    model.load_state_dict(state_dict, strict=True)
    return model.to(torch_dtype) if torch_dtype is not None else model

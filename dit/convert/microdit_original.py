"""Sony's MicroDiT checkpoints (``micro_diffusion`` ``DiT``, e.g. the released MicroDiT_XL_2 ``.pt`` files) ->
:class:`~dit.models.microdit_original.MicroDiTOriginalTransformer`.

A released checkpoint is a plain ``DiT`` state dict (``model.dit.load_state_dict(torch.load(path))`` in the
original's README); a file that also holds the VAE and the text encoder is a ``LatentDiffusion`` state dict, whose
``dit.`` keys are the network's (the others are not read). The state dict cannot tell every width rule apart, so
the original constructor's keyword arguments come with it (``original_config``: a dict, a YAML file of them, or
the name of a published size, :data:`ORIGINAL_CONFIGS`). The training grid and the position scale are read from the
checkpoint's fixed ``pos_embed`` table (what the original computes with after ``load_state_dict``).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping

import numpy as np
import torch
import yaml

from ..checkpoint import check_keys
from ..models.microdit_original import MicroDiTOriginalTransformer
from .pixart_original import position_scale_of, read_original_checkpoint

__all__ = [
    "ORIGINAL_CONFIGS",
    "config_from_original",
    "convert_microdit_original_state_dict",
    "load_original_microdit",
]

#: The original ``DiT`` constructor's keyword arguments of the published sizes, by the original's names (its
#: ``dit.py`` factory functions). ``input_size`` and ``pos_interp_scale`` come from the checkpoint's table.
ORIGINAL_CONFIGS: dict[str, dict] = {
    "MicroDiT_XL_2": dict(
        in_channels=4, patch_size=2, dim=1024, depth=28, head_dim=64, multiple_of=256, caption_channels=1024,
        norm_eps=1e-6, qkv_multipliers=np.linspace(0.5, 1.0, 28).tolist(),
        ffn_multipliers=np.linspace(0.5, 4.0, 28).tolist(), use_patch_mixer=True, patch_mixer_depth=6,
        patch_mixer_dim=768, patch_mixer_qkv_ratio=1.0, patch_mixer_mlp_ratio=4.0, use_bias=False, num_experts=8,
        expert_capacity=2.0, experts_every_n=2,
    ),
}  # fmt: skip
#: Original constructor arguments -> this class's config fields (renamed only).
_RENAMED = {
    "input_size": "sample_size", "patch_size": "patch_size", "in_channels": "in_channels", "depth": "num_layers",
    "head_dim": "attention_head_dim", "multiple_of": "multiple_of", "caption_channels": "caption_channels",
    "pos_interp_scale": "interpolation_scale", "norm_eps": "norm_eps", "qkv_multipliers": "qkv_multipliers",
    "ffn_multipliers": "ffn_multipliers", "patch_mixer_dim": "patch_mixer_dim",
    "patch_mixer_qkv_ratio": "patch_mixer_qkv_ratio", "patch_mixer_mlp_ratio": "patch_mixer_mlp_ratio",
    "use_bias": "attention_bias", "num_experts": "num_experts", "expert_capacity": "expert_capacity",
    "experts_every_n": "experts_every_n",
}  # fmt: skip
#: Arguments taken but not part of the network: ``depth_init`` scales the original's random initialisation only.
_INIT_ONLY = {"depth_init"}
_REQUIRED = sorted({*_RENAMED, "dim", "patch_mixer_depth"} - {"input_size", "pos_interp_scale"})
_OPTIONAL = {"input_size", "pos_interp_scale", "use_patch_mixer", *_INIT_ONLY}

# ----- keys -------------------------------------------------------------------------------------------------------
_TOP = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "timestep_embedder.linear_1",
    "t_embedder.mlp.2": "timestep_embedder.linear_2",
    "y_embedder.y_proj.fc1": "caption_projection.linear_1",
    "y_embedder.y_proj.norm": "caption_projection.norm",
    "y_embedder.y_proj.fc2": "caption_projection.linear_2",
    "pooled_y_emb_process.fc1": "pooled_caption_projection.linear_1",
    "pooled_y_emb_process.norm": "pooled_caption_projection.norm",
    "pooled_y_emb_process.fc2": "pooled_caption_projection.linear_2",
    "patch_mixer_map_xin.0": "patch_mixer_proj_in.norm",
    "patch_mixer_map_xin.1": "patch_mixer_proj_in.linear",
    "patch_mixer_map_xout.0": "patch_mixer_proj_out.norm",
    "patch_mixer_map_xout.1": "patch_mixer_proj_out.linear",
    "patch_mixer_map_y.0": "patch_mixer_proj_text.norm",
    "patch_mixer_map_y.1": "patch_mixer_proj_text.linear",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
    "final_layer.norm_final": "norm_out.norm",
}
_BLOCK = {
    "norm1": "norm1", "norm2": "norm2", "norm3": "norm3", "attn.proj": "attn1.to_out.0",
    "cross_attn.q_linear": "attn2.to_q", "cross_attn.proj": "attn2.to_out.0", "adaLN_modulation.1": "adaln_modulation",
    "mlp.w3": "ff.net.2", "mlp.gate": "ff.gate",
}  # fmt: skip
_SPLITS = {
    "attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "cross_attn.kv_linear": ("attn2.to_k", "attn2.to_v"),
}
_EXPERTS = {"mlp.w1": "ff.w1", "mlp.w2": "ff.w2"}  # (E, D, F) / (E, F, D) parameters, no ".weight"
_SWIGLU = ("mlp.w1", "mlp.w2")  # gate / value rows of one SwiGLU projection
_PREFIXES = {"blocks": "transformer_blocks", "patch_mixer": "patch_mixer", "y_emb_preprocess": "caption_refiner"}
_BLOCK_KEY = re.compile(r"(blocks\.\d+|patch_mixer\.\d+|y_emb_preprocess)\.(.+?)(?:\.(weight|bias))?$")
_NOT_CONVERTED = {"pos_embed"}  # the fixed table: the model computes it (checked against it when loading)


def convert_microdit_original_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an original MicroDiT ``DiT`` state dict to this toolkit's keys: fused ``qkv`` / ``kv_linear`` split into
    ``to_q`` / ``to_k`` / ``to_v``, SwiGLU ``w1`` (gate) and ``w2`` (value) stacked into ``ff.net.0.proj`` (value rows
    first, as :class:`~dit.nn.blocks.SwiGLUProjection` reads them), ``w3`` to ``ff.net.2``; the ``pos_embed`` table is
    left out. An unknown key is a KeyError naming it."""
    converted: dict[str, torch.Tensor] = {}
    swiglu: dict[tuple[str, str | None], dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        if key in _NOT_CONVERTED:
            continue
        if key == "mask_token":
            converted[key] = tensor
        elif (match := _BLOCK_KEY.match(key)) is not None:
            _convert_block_key(key, match, tensor, converted, swiglu)
        else:
            stem, _, kind = key.rpartition(".")
            if stem not in _TOP or kind not in ("weight", "bias"):
                raise KeyError(f"Unrecognised key {key!r} in the original MicroDiT checkpoint.")
            converted[f"{_TOP[stem]}.{kind}"] = tensor
    for (prefix, kind), parts in swiglu.items():
        if set(parts) != set(_SWIGLU):
            raise KeyError(f"{prefix}.mlp has {sorted(parts)} but not both of {list(_SWIGLU)} (a SwiGLU needs both).")
        suffix = f".{kind}" if kind else ""
        converted[f"{prefix}.ff.net.0.proj{suffix}"] = torch.cat([parts["mlp.w2"], parts["mlp.w1"]])  # value, gate
    return converted


def _convert_block_key(key, match, tensor, converted: dict, swiglu: dict) -> None:
    block, name, kind = match.groups()
    head, _, index = block.partition(".")
    prefix = _PREFIXES[head] + (f".{index}" if index else "")
    suffix = f".{kind}" if kind else ""
    if name in _SPLITS:
        targets = _SPLITS[name]
        if tensor.shape[0] % len(targets):
            raise ValueError(
                f"{key!r} of shape {tuple(tensor.shape)} cannot be split into {len(targets)} projections."
            )
        converted.update({f"{prefix}.{t}{suffix}": part for t, part in zip(targets, tensor.chunk(len(targets)))})
    elif name in _EXPERTS and kind is None:
        converted[f"{prefix}.{_EXPERTS[name]}"] = tensor
    elif name in _SWIGLU:
        swiglu.setdefault((prefix, kind), {})[name] = tensor
    elif name in _BLOCK and kind is not None:
        converted[f"{prefix}.{_BLOCK[name]}{suffix}"] = tensor
    else:
        raise KeyError(f"Unrecognised block key {key!r} in the original MicroDiT checkpoint.")


# ----- config -----------------------------------------------------------------------------------------------------
def config_from_original(original: Mapping) -> dict:
    """This class's config for the original ``DiT`` constructor's keyword arguments (``input_size`` and
    ``pos_interp_scale`` included): renamed, ``dim`` as heads x ``head_dim``, ``use_patch_mixer=False`` as 0 mixer
    blocks; the output has the input's channels, every text token is read, and the model records EDM's F as its
    prediction (so pipelines sample it with an EDM scheduler), as in the original."""
    kwargs = dict(original)
    unknown = sorted(set(kwargs) - set(_REQUIRED) - _OPTIONAL)
    if unknown:
        raise ValueError(
            f"Unknown original MicroDiT argument(s) {unknown}; the DiT constructor arguments read here are "
            f"{sorted({*_REQUIRED, *_OPTIONAL})}."
        )
    missing = sorted({*_REQUIRED, "input_size", "pos_interp_scale"} - set(kwargs))
    if missing:
        raise ValueError(f"The original MicroDiT config lacks {missing} (its defaults are not known here: give them).")
    dim, head_dim = kwargs.pop("dim"), kwargs["head_dim"]
    if dim % head_dim:
        raise ValueError(f"dim {dim} is not a multiple of head_dim {head_dim}.")
    layers = kwargs.pop("patch_mixer_depth") if kwargs.pop("use_patch_mixer", True) else 0
    config = {_RENAMED[k]: v for k, v in kwargs.items() if k not in _INIT_ONLY}
    for name in ("qkv_multipliers", "ffn_multipliers"):
        config[name] = [float(r) for r in config[name]]
    if layers == 0:
        config["patch_mixer_dim"] = None
    return {
        **config, "num_attention_heads": dim // head_dim, "patch_mixer_layers": layers,
        "out_channels": kwargs["in_channels"], "use_text_mask": False, "prediction_type": "edm",
    }  # fmt: skip


def _original_kwargs(original_config, overrides: dict) -> dict:
    """The original constructor's arguments: a published size by name, a dict, or a YAML file of them, with
    ``overrides``."""
    if isinstance(original_config, str) and original_config in ORIGINAL_CONFIGS:
        kwargs = dict(ORIGINAL_CONFIGS[original_config])
    elif isinstance(original_config, Mapping):
        kwargs = dict(original_config)
    elif isinstance(original_config, (str, os.PathLike)) and os.path.isfile(original_config):
        with open(original_config) as file:
            kwargs = yaml.safe_load(file)
        if not isinstance(kwargs, Mapping):
            raise ValueError(f"{os.fspath(original_config)!r} must hold a mapping of DiT constructor arguments.")
        kwargs = dict(kwargs)
    else:
        raise ValueError(
            f"original_config must be a dict of the original DiT constructor's arguments, a YAML file of them, or one "
            f"of {sorted(ORIGINAL_CONFIGS)}; got {original_config!r}."
        )
    return {**kwargs, **overrides}


def _with_positions(kwargs: dict, state_dict: Mapping[str, torch.Tensor]) -> dict:
    """``input_size`` and ``pos_interp_scale`` from the checkpoint's ``pos_embed`` table (the values the original
    computes with once loaded); given ones must agree with it. Without a table both must be given."""
    table = state_dict.get("pos_embed")
    if table is None or "patch_size" not in kwargs:
        return kwargs  # both given, or an error naming what is missing follows
    tokens, side = table.shape[-2], math.isqrt(table.shape[-2])
    scale = position_scale_of(table)
    if side * side != tokens or scale is None:
        raise ValueError(
            f"The checkpoint's pos_embed {tuple(table.shape)} is not the 2D sin-cos table of a square grid; "
            "MicroDiTOriginalTransformer computes that table and cannot hold another."
        )
    found = {"input_size": side * kwargs["patch_size"], "pos_interp_scale": scale}
    for name, value in found.items():
        if name in kwargs and not math.isclose(kwargs[name], value, rel_tol=1e-6):
            raise ValueError(
                f"original_config gives {name}={kwargs[name]!r}, but the checkpoint's pos_embed table is that of "
                f"{name}={value!r} ({side}x{side} patches); the original computes with the table, so pass {value!r}."
            )
    return {**kwargs, **found}


def _network_state(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``DiT`` state dict: a plain one as it is, or the ``dit.`` keys of a ``LatentDiffusion`` state dict (also
    inside a Composer training checkpoint's ``state.model``)."""
    composer = state_dict.get("state")
    if isinstance(composer, Mapping) and isinstance(composer.get("model"), Mapping):
        state_dict = composer["model"]
    wrapped = {k[len("dit.") :]: v for k, v in state_dict.items() if k.startswith("dit.")}
    if not wrapped:
        return dict(state_dict)
    bare = sorted(k for k in state_dict if k.split(".")[0] in {"blocks", "x_embedder", "final_layer", "t_embedder"})
    if bare:
        raise KeyError(f"The checkpoint mixes 'dit.'-prefixed keys with bare DiT keys ({bare[:3]}, ...).")
    return wrapped


def load_original_microdit(
    checkpoint: str | os.PathLike | Mapping,
    original_config: str | os.PathLike | Mapping,
    allow_pickle: bool = False,
    torch_dtype: torch.dtype | None = None,
    **overrides,
) -> MicroDiTOriginalTransformer:
    """Build a :class:`~dit.models.microdit_original.MicroDiTOriginalTransformer` from an original MicroDiT
    checkpoint, strictly (every key converted and used, shapes checked).

    Args:
        checkpoint: a ``.safetensors`` file, a ``.pt`` (the released files, read weights-only), or the loaded
            dict: a plain ``DiT`` state dict, a ``LatentDiffusion`` one (``dit.`` keys), ``{"state_dict": ...}``, or a
            Composer training checkpoint's dict (``{"state": {"model": ...}}``).
        original_config: the original ``DiT`` constructor's keyword arguments (a dict or a YAML file), or a published
            size by name: ``"MicroDiT_XL_2"`` (:data:`ORIGINAL_CONFIGS`).
        allow_pickle: unpickle in full a checkpoint that weights-only loading cannot read (it runs code from the file).
        torch_dtype: cast the weights to this dtype.
        overrides: original constructor arguments replacing ``original_config``'s, e.g. ``in_channels=16`` for the
            released 16-channel model (``dit_16_channel_37M_real_and_synthetic_data.pt``).
    """
    original = _network_state(read_original_checkpoint(checkpoint, allow_pickle=allow_pickle))
    config = config_from_original(_with_positions(_original_kwargs(original_config, overrides), original))
    state_dict = convert_microdit_original_state_dict(original)
    with torch.device("meta"):
        model = MicroDiTOriginalTransformer(**config)
    where = "converted MicroDiT checkpoint" + (
        "" if isinstance(checkpoint, Mapping) else f" {os.fspath(checkpoint)!r}"
    )
    expected = model.state_dict()
    check_keys(expected.keys(), state_dict.keys(), where=where)
    wrong = [f"{k}: {tuple(v.shape)} (model {tuple(expected[k].shape)})" for k, v in state_dict.items()
             if v.shape != expected[k].shape]  # fmt: skip
    if wrong:
        raise ValueError(
            f"The {where} does not fit the config {config}: {len(wrong)} tensor(s) of another shape: "
            + "; ".join(wrong[:10])
        )
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.to(torch_dtype) if torch_dtype is not None else model

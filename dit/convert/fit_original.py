"""Original FiT / FiTv2 checkpoints (``whlzy/FiT``; released as ``InfImagine/FiT`` and ``InfImagine/FiTv2``) -> a
:class:`~dit.FiTTransformer`.

The original network is described by its constructor arguments (the ``diffusion.network_config.params`` of its YAML);
every one is mapped, checked against what :class:`~dit.FiTTransformer` can hold, or named as not needed. The weights
map one to one, with four exact rewrites:

- tokens: FiT flattens a patch as ``(c p1 p2)``, ours as ``(p1 p2 c)``: the columns of the patch embedding and the
  rows of the output projection are permuted;
- time: FiTv2 (``use_sit``) embeds SiT's time ``t`` (1 = data) and predicts the velocity ``data - noise``; the
  converted model takes diffusers' flow timestep ``1000 * sigma`` (``timestep_convention="sit"`` embeds ``1 - sigma``)
  and predicts ``noise - data`` (the output projection's sign is flipped), the project's flow convention;
- FiT v1's per-block full adaLN (``adaln_type: normal``) becomes AdaLN-LoRA of rank D with an identity ``linear_1``
  and a zero shared modulation (exact; one D x D matmul per block more than the original);
- the SwiGLU's ``fc1_x`` / ``fc1_g`` become one projection ``[hidden | gate]`` and ``attn.qkv`` is split in thirds.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..checkpoint import check_keys
from ..models.fit_transformer import FiTTransformer
from .pixart_original import read_original_checkpoint

__all__ = ["convert_fit_original_state_dict", "fit_config", "load_original_fit", "read_fit_config"]

#: FiT's constructor arguments (``fit/model/fit_model.py``) and their defaults.
ORIGINAL_DEFAULTS = {
    "context_size": 256, "patch_size": 2, "in_channels": 4, "hidden_size": 1152, "depth": 28, "num_heads": 16,
    "mlp_ratio": 4.0, "class_dropout_prob": 0.1, "num_classes": 1000, "learn_sigma": True, "use_sit": False,
    "use_checkpoint": False, "use_swiglu": False, "use_swiglu_large": False, "rel_pos_embed": "rope",
    "norm_type": "layernorm", "q_norm": None, "k_norm": None, "qk_norm_weight": False, "qkv_bias": True,
    "ffn_bias": True, "adaln_bias": True, "adaln_type": "normal", "adaln_lora_dim": None, "rope_theta": 10000.0,
    "custom_freqs": "normal", "max_pe_len_h": None, "max_pe_len_w": None, "decouple": False, "ori_max_pe_len": None,
    "online_rope": False, "add_rel_pe_to_v": False, "pretrain_ckpt": None, "ignore_keys": None, "finetune": None,
    "time_shifting": 1,
}  # fmt: skip
#: Arguments the converted model does not need: training and memory options; the grid an offline original fixes
#: its extrapolated frequencies for and its online switch (the converted model computes them per sample, the same
#: at that grid); ``abs_pos_embed``, which the published YAMLs give and the constructor swallows unused.
NOT_NEEDED = {
    "use_checkpoint", "pretrain_ckpt", "ignore_keys", "finetune", "max_pe_len_h", "max_pe_len_w", "online_rope",
    "abs_pos_embed",
}  # fmt: skip
#: Settings FiTTransformer cannot hold: argument -> the values it can.
SUPPORTED = {
    "use_swiglu": (True,), "rel_pos_embed": ("rope",), "norm_type": ("layernorm",), "q_norm": (None, "layernorm"),
    "k_norm": (None, "layernorm"), "qk_norm_weight": (False,), "ffn_bias": (True,), "adaln_bias": (True,),
    "adaln_type": ("normal", "lora"), "add_rel_pe_to_v": (False,), "time_shifting": (1,),
}  # fmt: skip
#: FiT's ``custom_freqs`` -> our ``rope_extrapolation`` (``decouple=True``: the ``vision_`` variant).
EXTRAPOLATION_NAMES = {
    "normal": "none", "linear": "pi", "ntk-aware": "ntk", "ntk-by-parts": "ntk_by_parts", "yarn": "yarn",
    "ntk-aware-pro1": "ntk_pro1", "ntk-aware-pro2": "ntk_pro2",
}  # fmt: skip

_RENAMES = {
    "x_embedder.proj": "x_embedder",
    "t_embedder.mlp.0": "timestep_embedder.linear_1",
    "t_embedder.mlp.2": "timestep_embedder.linear_2",
    "y_embedder.embedding_table": "class_embedder",
    "global_adaLN_modulation.1": "adaln_shared",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
_BLOCK_RENAMES = {"attn.proj": "attn1.to_out.0", "mlp.fc2": "ff.net.2"}
#: the per-block modulation by adaln_type: FiT's layer -> ours
_MODULATION = {
    "lora": {"adaLN_modulation.1": "adaln_lora.linear_1", "adaLN_modulation.2": "adaln_lora.linear_2"},
    "normal": {"adaLN_modulation.1": "adaln_lora.linear_2"},
}


# ----- the config -----------------------------------------------------------------------------------------------
def read_fit_config(original_config: Mapping | str | os.PathLike) -> dict:
    """The original constructor arguments, from a dict or a YAML file: the whole YAML (``diffusion.network_config``),
    a ``{target, params}`` network config, or the arguments themselves. Where the YAML gives the diffusion process
    (``transport`` / ``noise_scheduler``), it must be the one the converted model assumes."""
    if isinstance(original_config, (str, os.PathLike)):
        import yaml

        path = Path(original_config)
        if not path.is_file():
            raise FileNotFoundError(f"No FiT config file at {os.fspath(path)!r}.")
        original_config = yaml.safe_load(path.read_text())
    if not isinstance(original_config, Mapping):
        raise TypeError(f"original_config must be a mapping or a YAML path, got {type(original_config).__name__}.")
    config, diffusion = dict(original_config), {}
    if "diffusion" in config:
        diffusion = config["diffusion"] or {}
        config = diffusion.get("network_config") or {}
    if "network_config" in config:
        config = config["network_config"] or {}
    if "params" in config or "target" in config:
        target = config.get("target")
        if target is not None and not str(target).endswith(".FiT"):
            raise ValueError(f"The network config's target is {target!r}, not FiT (fit.model.fit_model.FiT).")
        config = dict(config.get("params") or {})
    unknown = sorted(set(config) - set(ORIGINAL_DEFAULTS) - NOT_NEEDED)
    if unknown or not config:
        raise ValueError(
            "original_config must hold FiT's constructor arguments (the YAML's diffusion.network_config.params); "
            + (f"unknown argument(s): {', '.join(map(str, unknown))}." if unknown else "found none.")
        )
    _check_diffusion(diffusion, {**ORIGINAL_DEFAULTS, **config}["use_sit"])
    return config


def _check_diffusion(diffusion: Mapping, use_sit: bool) -> None:
    """The YAML's diffusion process, where it gives one: SiT's linear path with velocity (FiTv2) or DDPM epsilon."""
    transport = diffusion.get("transport") or {}
    scheduler = diffusion.get("noise_scheduler") or {}
    found = {
        "transport.path_type": (transport.get("path_type"), "Linear"),
        "transport.prediction": (transport.get("prediction"), "velocity"),
        "noise_scheduler.prediction_type": (scheduler.get("prediction_type"), "epsilon"),
    }
    for name, (value, expected) in found.items():
        if value is not None and value != expected:
            raise ValueError(f"The YAML's diffusion.{name} is {value!r}; the converter supports {expected!r} only.")
    if (use_sit and scheduler) or (not use_sit and transport):
        raise ValueError(f"use_sit={use_sit}, but the YAML describes the other diffusion process.")


def _checked(config: Mapping) -> dict:
    """The arguments with FiT's defaults filled in, checked against what FiTTransformer can hold."""
    args = {**ORIGINAL_DEFAULTS, **config}
    for name, allowed in SUPPORTED.items():
        if args[name] not in allowed:
            raise ValueError(f"FiT's {name}={args[name]!r} is not supported (FiTTransformer holds {allowed}).")
    if args["q_norm"] != args["k_norm"]:
        raise ValueError(f"q_norm={args['q_norm']!r} and k_norm={args['k_norm']!r} differ; FiTTransformer norms both.")
    if args["learn_sigma"] and args["use_sit"]:
        raise ValueError("learn_sigma and use_sit together (the original refuses them too).")
    if not args["class_dropout_prob"] > 0:
        raise ValueError("class_dropout_prob 0: the original has no null class, which FiTTransformer needs.")
    if args["adaln_type"] == "lora" and not args["adaln_lora_dim"]:
        raise ValueError("adaln_type 'lora' needs adaln_lora_dim (the published FiTv2 configs: hidden_size / 4).")
    if args["hidden_size"] % args["num_heads"]:
        raise ValueError(f"hidden_size {args['hidden_size']} is not a multiple of num_heads {args['num_heads']}.")
    freqs = str(args["custom_freqs"]).lower()
    if freqs not in EXTRAPOLATION_NAMES:
        raise ValueError(f"custom_freqs {args['custom_freqs']!r} is not one of {sorted(EXTRAPOLATION_NAMES)}.")
    if freqs != "normal" and not args["ori_max_pe_len"]:
        raise ValueError(f"custom_freqs {freqs!r} needs ori_max_pe_len, the training grid's side in tokens.")
    return {**args, "custom_freqs": freqs}


def _feed_forward_ratio(args: Mapping) -> float:
    """Our ``mlp_ratio`` for FiT's SwiGLU width: ``int(D * r) * 2 // 3`` (v2), ``int(D * r)`` (``use_swiglu_large``)."""
    width, hidden = args["hidden_size"], int(args["hidden_size"] * args["mlp_ratio"])
    hidden = hidden if args["use_swiglu_large"] else hidden * 2 // 3
    ratio = 1.5 * hidden / width
    if int(2 * ratio * width / 3) != hidden:
        raise ValueError(f"FiT's SwiGLU width {hidden} cannot be written as FiTTransformer's mlp_ratio.")
    return ratio


def fit_config(original_config: Mapping) -> dict:
    """The :class:`~dit.FiTTransformer` config of FiT's constructor arguments (``read_fit_config``'s output).

    ``max_tokens`` is the training ``context_size`` (the original has no length check: beyond it, set an
    extrapolation or raise ``max_tokens``); ``train_grid`` is ``ori_max_pe_len`` square (the extrapolations'
    reference), else the square of ``context_size``.
    """
    args = _checked(original_config)
    width, heads, patch = args["hidden_size"], args["num_heads"], args["patch_size"]
    side = math.isqrt(args["context_size"])
    train = args["ori_max_pe_len"] or side
    method = EXTRAPOLATION_NAMES[args["custom_freqs"]]
    sit = args["use_sit"]
    return {
        "num_attention_heads": heads,
        "attention_head_dim": width // heads,
        "in_channels": args["in_channels"],
        "out_channels": 2 * args["in_channels"] if args["learn_sigma"] else None,
        "num_layers": args["depth"],
        "patch_size": patch,
        "sample_size": side * patch,
        "max_tokens": args["context_size"],
        "train_grid": [train, train],
        "num_classes": args["num_classes"],
        "mlp_ratio": _feed_forward_ratio(args),
        "adaln_lora_dim": args["adaln_lora_dim"] if args["adaln_type"] == "lora" else width,
        "qk_norm": args["q_norm"] == "layernorm",
        "attention_bias": args["qkv_bias"],
        "norm_eps": 1e-6,
        "rope_theta": float(args["rope_theta"]),
        "rope_extrapolation": f"vision_{method}" if args["decouple"] and method != "none" else method,
        "output_head": "silu",
        "timestep_convention": "sit" if sit else "fit_v1",
        "prediction_type": "flow" if sit else "epsilon",
    }


# ----- the weights ----------------------------------------------------------------------------------------------
def _tokens_last(weight: torch.Tensor, channels: int, patch: int, dim: int) -> torch.Tensor:
    """Reorder ``weight``'s axis ``dim`` (p*p*C long) from FiT's ``(c p1 p2)`` to our ``(p1 p2 c)``."""
    shape = weight.shape
    split = weight.reshape(*shape[:dim], channels, patch, patch, *shape[dim + 1 :])  # (..., C, p, p, ...)
    return split.movedim(dim, dim + 2).reshape(shape)  # (..., p, p, C, ...) flattened


def _block(index: str, name: str, kind: str, tensor: torch.Tensor, adaln_type: str) -> dict[str, torch.Tensor]:
    prefix = f"transformer_blocks.{index}."
    renames = {**_BLOCK_RENAMES, **_MODULATION[adaln_type]}
    if name == "attn.qkv":
        q, k, v = tensor.chunk(3, dim=0)
        return {f"{prefix}attn1.to_q.{kind}": q, f"{prefix}attn1.to_k.{kind}": k, f"{prefix}attn1.to_v.{kind}": v}
    if name not in renames:
        raise KeyError(f"Unrecognised key blocks.{index}.{name}.{kind} in the original FiT checkpoint.")
    return {f"{prefix}{renames[name]}.{kind}": tensor}


def convert_fit_original_state_dict(
    state_dict: Mapping[str, torch.Tensor], original_config: Mapping
) -> dict[str, torch.Tensor]:
    """An original FiT state dict in :class:`~dit.FiTTransformer` keys (the model of :func:`fit_config`), with the
    token order permuted, FiTv2's output sign flipped to ``noise - data`` and FiT v1's full adaLN as rank-D LoRA.

    Every original key is used; an unrecognised one raises ``KeyError`` naming it. ``original_config``: FiT's
    constructor arguments (:func:`read_fit_config`).
    """
    args = _checked(original_config)
    converted, swiglu = {}, {}
    for key, tensor in state_dict.items():
        stem, _, kind = key.rpartition(".")
        if key.startswith("blocks."):
            _, index, name = stem.split(".", 2)
            if name in ("mlp.fc1_x", "mlp.fc1_g"):
                swiglu[(index, name, kind)] = tensor
            else:
                converted.update(_block(index, name, kind, tensor, args["adaln_type"]))
        elif stem in _RENAMES:
            converted[f"{_RENAMES[stem]}.{kind}"] = tensor
        else:
            raise KeyError(f"Unrecognised key {key!r} in the original FiT checkpoint.")
    converted.update(_join_swiglu(swiglu))
    _rewrite(converted, args)
    return converted


def _join_swiglu(parts: dict[tuple[str, str, str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's ``fc2(silu(fc1_g x) * fc1_x x)`` as one projection ``[fc1_x | fc1_g]`` (ours: hidden * silu(gate))."""
    joined = {}
    for index, name, kind in parts:
        other = "mlp.fc1_g" if name == "mlp.fc1_x" else "mlp.fc1_x"
        if (index, other, kind) not in parts:
            raise KeyError(f"blocks.{index}.{name}.{kind} has no blocks.{index}.{other}.{kind} in the checkpoint.")
        hidden, gate = parts[(index, "mlp.fc1_x", kind)], parts[(index, "mlp.fc1_g", kind)]
        joined[f"transformer_blocks.{index}.ff.net.0.proj.{kind}"] = torch.cat([hidden, gate], dim=0)
    return joined


def _rewrite(converted: dict[str, torch.Tensor], args: Mapping) -> None:
    """The exact rewrites: token order, FiTv2's output sign, FiT v1's identity LoRA and zero shared modulation."""
    channels, patch = args["in_channels"], args["patch_size"]
    out_channels = 2 * channels if args["learn_sigma"] else channels
    sign = -1.0 if args["use_sit"] else 1.0
    if "x_embedder.weight" in converted:
        converted["x_embedder.weight"] = _tokens_last(converted["x_embedder.weight"], channels, patch, dim=1)
    for kind in ("weight", "bias"):
        key = f"proj_out.{kind}"
        if key in converted:
            converted[key] = sign * _tokens_last(converted[key], out_channels, patch, dim=0)
    if args["adaln_type"] == "normal":
        width = args["hidden_size"]
        reference = converted.get("x_embedder.weight", torch.empty(0))
        like = {"dtype": reference.dtype, "device": reference.device}
        converted["adaln_shared.weight"] = torch.zeros(6 * width, width, **like)
        converted["adaln_shared.bias"] = torch.zeros(6 * width, **like)
        for index in range(args["depth"]):
            converted[f"transformer_blocks.{index}.adaln_lora.linear_1.weight"] = torch.eye(width, **like)
            converted[f"transformer_blocks.{index}.adaln_lora.linear_1.bias"] = torch.zeros(width, **like)


# ----- the loader -----------------------------------------------------------------------------------------------
def load_original_fit(
    checkpoint: str | os.PathLike | Mapping,
    original_config: Mapping | str | os.PathLike,
    *,
    allow_pickle: bool = False,
    torch_dtype: torch.dtype | None = None,
    **overrides,
) -> FiTTransformer:
    """Build a :class:`~dit.FiTTransformer` from an original FiT / FiTv2 checkpoint (strict).

    The converted model follows the project's conventions: ``model(latent, timestep=..., class_labels=...,
    image_sizes=...)`` on latents (B, 4, H, W), a zero-padded canvas with each sample's ``image_sizes``.

    - FiTv2 (``use_sit: true``): ``timestep = 1000 * sigma`` with sigma the noise level, output ``noise - data``
      (a rectified-flow velocity, ``prediction_type="flow"``): the original's ``t`` is ``1 - sigma`` and its output
      is minus ours, so our flow pipelines, schedulers and trainer use it unchanged.
    - FiT v1: DDPM ``epsilon`` and the learned variance (``out_channels`` 8: the 4 epsilon channels, then the 4
      variance ones), linear betas, ``timestep`` the DDPM step 0..999. **The released forward clamps the timestep**
      (``t = clamp(time_shifting * t / (1 + (time_shifting - 1) * t), max=1)``, ``time_shifting`` 1), so every
      timestep >= 1 embeds as 1 and the network sees only t = 0 or 1 (a fractional t below 1 as itself). The
      converted model does the same (``timestep_convention="fit_v1"``); ``timestep_convention="diffusers"`` embeds the
      raw step instead (not what the released code runs: it changes the outputs).

    FiT's classifier-free guidance acts on latent channels 0-2 only (``forward_with_cfg``): guide with
    ``guidance_channels=3`` (:func:`dit.pipelines.guidance.classifier_free_guidance`) to sample as the original does.
    The original attends padding rows to each other where ours masks them; real tokens get the same output, and
    both are 0 at padding. FiT's offline extrapolation fixes its frequencies for one grid (``max_pe_len_h/w``); the
    converted model computes them per sample, the same at that grid.

    Args:
        checkpoint: ``.safetensors``, a pickle (``.bin`` / ``.pt``, read weights-only), or the state dict.
        original_config: the original model's constructor arguments: a dict or a YAML path; the whole YAML (its
            ``diffusion.network_config.params``), the network config (``{target, params}``) or the arguments.
        allow_pickle: unpickle in full a checkpoint that weights-only loading cannot read (it runs code from the file).
        torch_dtype: cast the weights to this dtype.
        overrides: :class:`~dit.FiTTransformer` config fields over the converted ones, e.g. ``rope_extrapolation``
            (sample beyond the training grid), ``max_tokens``, ``timestep_convention``.
    """
    args = read_fit_config(original_config)
    original = read_original_checkpoint(checkpoint, allow_pickle=allow_pickle)
    state_dict = convert_fit_original_state_dict(original, args)
    model = FiTTransformer(**{**fit_config(args), **overrides})
    where = "converted FiT checkpoint" + (f" {os.fspath(checkpoint)!r}" if not isinstance(checkpoint, Mapping) else "")
    expected = model.state_dict()
    check_keys(expected.keys(), state_dict.keys(), where=where)
    wrong = [f"{k} {tuple(v.shape)} (model: {tuple(expected[k].shape)})" for k, v in state_dict.items()
             if v.shape != expected[k].shape]  # fmt: skip
    if wrong:
        raise ValueError(f"The {where} does not fit original_config: {'; '.join(wrong[:10])}.")
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    return model.to(torch_dtype) if torch_dtype is not None else model

"""PixArt-δ ControlNet checkpoints -> a :class:`~dit.PixArtTransformer` and a :class:`~dit.ControlNetAdapter`.

Two published formats hold the same network (control block ``j`` is a trained copy of base block ``j``; it starts
from base block 0's output plus ``before_proj`` of the control latent embedded by the base's own patch embedding,
and feeds ``after_proj`` of its state to base block ``j + 1``, unscaled):

- the original (PixArt-α repository, ``ControlPixArtHalf`` / ``ControlPixArtMSHalf``; released as
  ``PixArt-XL-2-{512,1024}-ControlNet.pth`` under ``"state_dict"``): one state dict of ``base_model.<PixArt key>``
  and ``controlnet.<j>.{before_proj (j = 0), copied_block.<PixArt block key>, after_proj}``;
- diffusers' research project (``examples/research_projects/pixart``, ``PixArtControlNetAdapterModel``): the
  adapter alone, ``controlnet_blocks.<j>.{before_proj (j = 0), transformer_block.<diffusers block key>,
  after_proj}`` with a config ``{"num_layers": n}``, run on a diffusers PixArt transformer.

Both become an adapter at positions ``0..n-1``, run with ``conditioning_scale`` 1.0.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import load_state_dict_file
from ..models.controlnet import ControlNetAdapter
from ..models.pixart_transformer import as_pixart_model
from .pixart_original import convert_pixart_original_state_dict, load_original_pixart, read_original_checkpoint

__all__ = [
    "convert_pixart_controlnet_original_state_dict",
    "convert_pixart_controlnet_research_state_dict",
    "load_original_pixart_controlnet",
]

_ORIGINAL_KEY = re.compile(r"controlnet\.(\d+)\.(before_proj|after_proj|copied_block)\.(.+)$")
_RESEARCH_KEY = re.compile(r"controlnet_blocks\.(\d+)\.(before_proj|after_proj|transformer_block)\.(.+)$")
_RESEARCH_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
#: load_original_pixart's options that describe the base of an original checkpoint, with their defaults here
_BASE_OPTIONS = {
    "sample_size": 128,
    "attention_head_dim": 72,
    "interpolation_scale": None,
    "kv_compress": False,
    "use_ema": False,
}


def _unknown(key: str, source: str) -> KeyError:
    return KeyError(
        f"Unrecognised key {key!r} in the {source} (only control block 0 has before_proj; each block has "
        "after_proj and its copied base block)."
    )


def convert_pixart_controlnet_original_state_dict(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split an original ``ControlPixArt(MS)Half`` state dict into the base's original-key state dict (``base_model.``
    stripped, for :func:`~dit.convert.load_original_pixart`) and the adapter's state dict in
    :class:`~dit.ControlNetAdapter` keys (the copied blocks renamed and their q/k/v split as base blocks are)."""
    base, adapter, copies = {}, {}, {}
    for key, tensor in state_dict.items():
        if key.startswith("base_model."):
            base[key[len("base_model.") :]] = tensor
            continue
        match = _ORIGINAL_KEY.match(key)
        if match is None or (match.group(2) == "before_proj" and match.group(1) != "0"):
            raise _unknown(key, "original PixArt-δ ControlNet checkpoint")
        j, part, rest = match.groups()
        if part == "copied_block":
            copies[f"blocks.{j}.{rest}"] = tensor
        else:
            adapter[f"{part}.{rest}" if part == "before_proj" else f"controlnet_blocks.{j}.{part}.{rest}"] = tensor
    for key, tensor in convert_pixart_original_state_dict(copies).items():
        _, j, rest = key.split(".", 2)  # transformer_blocks.<j>.<block key>
        adapter[f"controlnet_blocks.{j}.transformer_block.{rest}"] = tensor
    return base, adapter


def convert_pixart_controlnet_research_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``PixArtControlNetAdapterModel`` state dict in :class:`~dit.ControlNetAdapter` keys: only block 0's
    ``before_proj`` moves (to the adapter's top level); the blocks already have diffusers' (= our) keys."""
    converted = {}
    for key, tensor in state_dict.items():
        match = _RESEARCH_KEY.match(key)
        if match is None or (match.group(2) == "before_proj" and match.group(1) != "0"):
            raise _unknown(key, "diffusers research PixArt ControlNet adapter")
        converted[f"before_proj.{match.group(3)}" if match.group(2) == "before_proj" else key] = tensor
    return converted


def _read_research_folder(folder: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """The weights of a ``PixArtControlNetAdapterModel`` folder, checked against its config's ``num_layers``."""
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if "num_layers" not in config:
        hint = " (a ControlNetAdapter folder: use ControlNetAdapter.from_pretrained)" if "positions" in config else ""
        raise ValueError(
            f"{folder} is not a diffusers research PixArt ControlNet adapter folder: it needs a config.json with "
            f"num_layers{hint}."
        )
    weights = [folder / name for name in _RESEARCH_WEIGHTS if (folder / name).is_file()]
    if not weights:
        raise FileNotFoundError(f"No {' or '.join(_RESEARCH_WEIGHTS)} in {folder}.")
    state = load_state_dict_file(weights[0], allow_pickle=allow_pickle)
    blocks = {key.split(".")[1] for key in state if key.startswith("controlnet_blocks.")}
    if len(blocks) != config["num_layers"]:
        raise ValueError(f"{folder}'s config has num_layers={config['num_layers']}; its weights hold {len(blocks)}.")
    return state


def _read(checkpoint, use_ema: bool, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], str]:
    """The checkpoint's state dict and its format, ``original`` or ``research``; a ValueError for anything else."""
    if not isinstance(checkpoint, Mapping) and os.path.isdir(checkpoint):
        state = _read_research_folder(Path(checkpoint), allow_pickle)
    else:
        state = read_original_checkpoint(checkpoint, use_ema=use_ema, allow_pickle=allow_pickle)
    if any(key.startswith("base_model.") for key in state):
        return state, "original"
    if any(key.startswith("controlnet_blocks.") for key in state):
        return state, "research"
    if any(key.startswith("controlnet.") for key in state):
        raise ValueError(
            "This checkpoint has controlnet.* keys but no base_model.* keys: an original PixArt-δ ControlNet "
            "checkpoint holds the full ControlPixArt(MS)Half state dict, base included."
        )
    looks_like = ""
    if any(key.startswith(("blocks.", "x_embedder.")) for key in state):
        looks_like = " It looks like a plain PixArt checkpoint: load it with dit.convert.load_original_pixart."
    elif any(key.startswith("transformer_blocks.") for key in state):
        looks_like = " It looks like a transformer: pass it as transformer= with the adapter as the checkpoint."
    raise ValueError(
        "Not a PixArt-δ ControlNet checkpoint: expected base_model.* and controlnet.* keys (original "
        f"ControlPixArtHalf / ControlPixArtMSHalf) or controlnet_blocks.* keys (diffusers research "
        f"PixArtControlNetAdapterModel); found {sorted(state)[:5]}...{looks_like}"
    )


def load_original_pixart_controlnet(
    checkpoint: str | os.PathLike | Mapping,
    transformer: nn.Module | str | os.PathLike | None = None,
    sample_size: int = 128,
    attention_head_dim: int = 72,
    interpolation_scale: float | None = None,
    allow_pickle: bool = False,
    torch_dtype: torch.dtype | None = None,
    kv_compress: Mapping | bool | None = False,
    use_ema: bool = False,
) -> tuple[nn.Module, ControlNetAdapter]:
    """Load a published PixArt-δ ControlNet as ``(transformer, adapter)`` (strict: every key used).

    Run the pair with ``transformer(..., block_controls=block_controls(transformer, adapter, control_latent))``; a
    control latent of batch 1 and micro-conditions of batch 1 are broadcast over the batch, as in the original.

    Args:
        checkpoint: an original checkpoint (``.safetensors``, ``.pth`` read weights-only, or the loaded
            dict, ``{"state_dict": ...}`` or the state dict itself), whose base is converted as
            :func:`~dit.convert.load_original_pixart` does; or a diffusers research-project
            ``PixArtControlNetAdapterModel`` (its folder, weights file or state dict), which needs ``transformer``.
        transformer: the base a research adapter runs on (a toolkit backbone, or a transformer / pipeline folder);
            None for an original checkpoint, which holds its base.
        sample_size, attention_head_dim, interpolation_scale, use_ema: as for
            :func:`~dit.convert.load_original_pixart` (512 model: ``sample_size=64``; 1024: 128); original
            checkpoints only.
        allow_pickle: unpickle in full a checkpoint that weights-only loading cannot read (it runs code from the file).
        torch_dtype: cast the weights to this dtype (a research adapter's ``transformer`` module is cast in place).
        kv_compress: as for :func:`~dit.convert.load_original_pixart`, but ``False`` (none) by default: PixArt-δ's
            base is PixArt-α, which has no KV compression. Original checkpoints only.
    """
    state, kind = _read(checkpoint, use_ema=use_ema, allow_pickle=allow_pickle)
    where = "converted ControlNet" + (f" {os.fspath(checkpoint)!r}" if not isinstance(checkpoint, Mapping) else "")
    if kind == "original":
        if transformer is not None:
            raise ValueError(
                "An original PixArt-δ ControlNet checkpoint holds its own base (base_model.*); transformer= is for "
                "diffusers research adapters only."
            )
        base_state, adapter_state = convert_pixart_controlnet_original_state_dict(state)
        base = load_original_pixart(
            base_state, sample_size, attention_head_dim, interpolation_scale, torch_dtype=torch_dtype,
            kv_compress=kv_compress,
        )  # fmt: skip
        return base, ControlNetAdapter.from_state_dict(base, adapter_state, where=where)
    base_options = dict(sample_size=sample_size, attention_head_dim=attention_head_dim,
                        interpolation_scale=interpolation_scale, kv_compress=kv_compress, use_ema=use_ema)  # fmt: skip
    return _research_pair(state, transformer, torch_dtype, base_options, where)


def _research_pair(
    state: dict[str, torch.Tensor], transformer, torch_dtype: torch.dtype | None, base_options: dict, where: str
) -> tuple[nn.Module, ControlNetAdapter]:
    """A research adapter on ``transformer``; ``base_options`` (which describe an original's base) must be unset."""
    changed = sorted(name for name, value in base_options.items() if value != _BASE_OPTIONS[name])
    if changed:
        raise ValueError(
            f"{', '.join(changed)} describe the base of an original checkpoint; a diffusers research adapter runs on "
            "the transformer= you give."
        )
    if transformer is None:
        raise ValueError(
            "This is a diffusers research PixArtControlNetAdapterModel, which holds no base: pass the PixArt "
            "transformer it was trained on as transformer= (a PixArtTransformer, or its folder)."
        )
    base = as_pixart_model(transformer)
    if torch_dtype is not None:
        base = base.to(torch_dtype)
    adapter_state = convert_pixart_controlnet_research_state_dict(state)
    return base, ControlNetAdapter.from_state_dict(base, adapter_state, where=where)

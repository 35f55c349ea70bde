"""Named size presets of every backbone family: the published sizes and the tiny ones of the tests and MicroShapes.

A preset is a backbone class name and the keyword arguments of its constructor, as DiT's ``DiT_models`` and flux's
``configs`` name theirs. The configs are exactly those the code builds (benchmarks, tests, the shipped MicroShapes
models); ``tests/models/test_presets.py`` checks that each builds and that the published sizes have their documented
parameter counts.

    from dit.models.presets import build_preset, preset_config

    with torch.device("meta"):
        model = build_preset("PixArt-XL-2-1024")            # PixArt-α XL/2 at 1024 px, 611M parameters
    config = preset_config("tiny-pixart", num_layers=4)     # a fresh dict, overrides applied
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
from torch import nn

from .registry import backbone_class

__all__ = ["PRESETS", "Preset", "build_preset", "preset", "preset_config"]


@dataclass(frozen=True)
class Preset:
    """One named size of a backbone family.

    Args:
        cls: the backbone class name (:func:`dit.models.registry.backbone_class`).
        config: its constructor's keyword arguments (read-only; :func:`preset_config` gives a copy).
        source: one line: what the size is and where its numbers come from.
        params: the documented parameter count of the published model, or None (tiny and toolkit sizes).
        params_tolerance: the relative difference from ``params`` that this toolkit's class may have (its structure
            is not always the original's, see ``source``).
    """

    cls: str
    config: Mapping = field(repr=False)
    source: str
    params: int | None = None
    params_tolerance: float = 0.01

    def __post_init__(self) -> None:
        object.__setattr__(self, "config", MappingProxyType(dict(self.config)))


# ----- published sizes -------------------------------------------------------------------------------------------
#: PixArt-α/Σ XL/2: 28 blocks of 16 heads x 72, T5-XXL captions (diffusers' conversion scripts write these fields).
_PIXART_XL = dict(
    num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
    cross_attention_dim=1152, patch_size=2, caption_channels=4096,
)  # fmt: skip
_PIXART_512 = dict(_PIXART_XL, sample_size=64, interpolation_scale=1, use_additional_conditions=False)
_PIXART_SIGMA_1024 = dict(_PIXART_XL, sample_size=128, interpolation_scale=2, use_additional_conditions=False)
#: FiTv2-XL/2 (configs/fitv2/config_fitv2_xl.yaml): 36 blocks of 16 x 72, ImageNet classes, a 16x16 grid at 256 px.
_FITV2_XL = dict(
    num_attention_heads=16, attention_head_dim=72, in_channels=4, num_layers=36, patch_size=2, sample_size=32,
    num_classes=1000, mlp_ratio=4.0, adaln_lora_dim=288, qk_norm=True, output_head="silu", timestep_convention="sit",
)  # fmt: skip
#: MicroDiT_XL_2 (micro_diffusion dit.py) at 512 px: 28 blocks of 16 x 64, a 6-block mixer, 8 experts, layer-wise
#: scaling, DFN5B-CLIP captions (1024 wide).
_MICRODIT_XL = dict(
    num_attention_heads=16, attention_head_dim=64, in_channels=4, out_channels=4, num_layers=28,
    cross_attention_dim=1024, sample_size=64, patch_size=2, caption_channels=1024, use_additional_conditions=False,
    interpolation_scale=2, patch_mixer_layers=6, num_experts=8, expert_capacity=2.0, experts_every_n=2,
    attention_multipliers=(0.5, 1.0), ffn_multipliers=(0.5, 4.0),
)  # fmt: skip
#: MicroDiT_XL_2 as published (MicroDiTOriginalTransformer, the released checkpoints' network) at 512 px: 1024 wide,
#: 28 blocks, self-attention / FFN widths linspace(0.5, 1) / linspace(0.5, 4) x 1024, a 6-block 768-wide mixer.
_MICRODIT_XL_ORIGINAL = dict(
    num_attention_heads=16, attention_head_dim=64, in_channels=4, out_channels=4, num_layers=28, sample_size=64,
    patch_size=2, caption_channels=1024, interpolation_scale=2.0, norm_eps=1e-6, attention_bias=False, multiple_of=256,
    qkv_multipliers=np.linspace(0.5, 1.0, 28).tolist(), ffn_multipliers=np.linspace(0.5, 4.0, 28).tolist(),
    patch_mixer_layers=6, patch_mixer_dim=768, patch_mixer_qkv_ratio=1.0, patch_mixer_mlp_ratio=4.0, num_experts=8,
    expert_capacity=2.0, experts_every_n=2, use_text_mask=False, prediction_type="edm",
)  # fmt: skip
_PIXART_PARAMS = dict(params=600_000_000, params_tolerance=0.03)  # the papers' "0.6B"

_PUBLISHED = {
    "PixArt-XL-2-512": Preset(
        "PixArtTransformer", _PIXART_512,
        "PixArt-α/Σ XL/2 at 512 px (PixArt-XL-2-512x512, PixArt-Sigma-XL-2-512-MS): no micro-conditions; 0.6B",
        **_PIXART_PARAMS,
    ),
    "PixArt-XL-2-1024": Preset(
        "PixArtTransformer", dict(_PIXART_SIGMA_1024, use_additional_conditions=True),
        "PixArt-α XL/2 at 1024 px (PixArt-XL-2-1024-MS): resolution and aspect-ratio micro-conditions; 0.6B",
        **_PIXART_PARAMS,
    ),
    "PixArt-Sigma-XL-2-1024": Preset(
        "PixArtTransformer", _PIXART_SIGMA_1024,
        "PixArt-Σ XL/2 at 1024 px (PixArt-Sigma-XL-2-1024-MS): no micro-conditions; 0.6B", **_PIXART_PARAMS,
    ),
    "LiT-XL-2-1024": Preset(
        "LiTTransformer", _PIXART_SIGMA_1024,
        "LiT text-to-image (arXiv 2501.12976), converted from PixArt-Σ 0.6B: 4-head ReLU linear self-attention "
        "(the paper's XL/2 head count) and a 5x5 depthwise value convolution",
        **_PIXART_PARAMS,
    ),
    "FiTv2-XL-2": Preset(
        "FiTTransformer", _FITV2_XL,
        "FiTv2-XL/2 (arXiv 2410.13925) as published (load_original_fit loads its checkpoint into it): q/k LayerNorm, "
        "AdaLN-LoRA rank 288, SwiGLU, FiT's Linear(SiLU(c)) output head, SiT time embedded as 1 - sigma; 671M",
        params=671_000_000, params_tolerance=0.01,
    ),
    "MicroDiT-XL-2": Preset(
        "MicroDiTTransformer", _MICRODIT_XL,
        "MicroDiT_XL_2 (arXiv 2407.15811): 1.16B in the original, which has per-block adaLN, SwiGLU and a 768-wide "
        "mixer where this class has adaLN-single, GELU MLPs and a full-width mixer (fixtures/microdit_original)",
        params=1_160_000_000, params_tolerance=0.15,
    ),
    "MicroDiT-XL-2-original": Preset(
        "MicroDiTOriginalTransformer", _MICRODIT_XL_ORIGINAL,
        "MicroDiT_XL_2 as published (Sony's micro_diffusion DiT at 512 px, the released checkpoints' network, "
        "dit.convert.load_original_microdit): 1.16B",
        params=1_160_000_000, params_tolerance=0.01,
    ),
}  # fmt: skip

# ----- tiny sizes: tests, notebooks, smoke runs --------------------------------------------------------------------
#: PixArt-Σ style (no micro-conditions), 2 blocks of 2 heads x 12, 32-wide captions, 8x8 latents of 4 channels.
_TINY = dict(
    num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8, num_layers=2,
    cross_attention_dim=24, sample_size=8, caption_channels=32, use_additional_conditions=False,
    interpolation_scale=1,
)  # fmt: skip
#: FiT: 4x4-patch training grid (sample_size 8, patch 2), up to 48 tokens per image (e.g. a 12x16 latent).
_TINY_FIT = dict(
    num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2, patch_size=2, sample_size=8,
    max_tokens=48, caption_channels=32,
)  # fmt: skip

_TINY_PRESETS = {
    "tiny-pixart": Preset("PixArtTransformer", _TINY, "PixArt-Σ-style tiny model (dit.tiny's pipeline, the tests)"),
    "tiny-pixart-alpha": Preset(
        "PixArtTransformer", dict(_TINY, use_additional_conditions=True, interpolation_scale=2),
        "PixArt-α-1024-MS-style tiny model: micro-conditions, interpolation scale 2",
    ),
    "tiny-lit": Preset("LiTTransformer", _TINY, "tiny LiT: tiny-pixart with linear self-attention"),
    "tiny-microdit": Preset(
        "MicroDiTTransformer", dict(_TINY, num_experts=2, patch_mixer_layers=1),
        "tiny MicroDiT: tiny-pixart with a 1-block patch mixer and 2 experts",
    ),
    "tiny-fit": Preset("FiTTransformer", _TINY_FIT, "tiny FiT: up to 48 tokens of 2x2 patches, 32-wide captions"),
    "tiny-microdit-original": Preset(
        "MicroDiTOriginalTransformer",
        dict(num_attention_heads=4, attention_head_dim=8, in_channels=4, num_layers=3, sample_size=8, patch_size=2,
             caption_channels=32, multiple_of=16, attention_bias=False, qkv_multipliers=[0.5, 0.75, 1.0],
             ffn_multipliers=[1.0, 2.0, 4.0], patch_mixer_layers=2, patch_mixer_dim=16, num_experts=2),
        "tiny MicroDiT as published: layer-wise scaling, a 2-block 16-wide mixer, 2 experts in block 1 of each",
    ),
}  # fmt: skip

# ----- MicroShapes: the shipped models' sizes (configs/microshapes*.yaml) ------------------------------------------
_MICROSHAPES = dict(
    num_attention_heads=4, attention_head_dim=32, in_channels=8, out_channels=8, num_layers=6,
    cross_attention_dim=128, sample_size=32, patch_size=4, caption_channels=64, use_additional_conditions=False,
    interpolation_scale=1,
)  # fmt: skip
_MICROSHAPES_FIT = dict(
    num_attention_heads=4, attention_head_dim=32, in_channels=8, num_layers=6, patch_size=4, sample_size=32,
    max_tokens=64, train_grid=[8, 8], caption_channels=64, qk_norm=True, mlp_ratio=4.0,
    absolute_position="fractional",
)  # fmt: skip

_MICROSHAPES_PRESETS = {
    "microshapes": Preset(
        "PixArtTransformer", _MICROSHAPES,
        "the shipped MicroShapes model (dit/assets/microshapes; configs/microshapes.yaml)",
    ),
    "microshapes-microdit": Preset(
        "MicroDiTTransformer",
        dict(_MICROSHAPES, patch_mixer_layers=1, deferred_masking=True, num_experts=4, expert_capacity=2.0),
        "MicroShapes with MicroDiT's mixer and experts (configs/microshapes_microdit.yaml)",
    ),
    "microshapes-fit": Preset(
        "FiTTransformer", _MICROSHAPES_FIT, "MicroShapes at flexible sizes (configs/microshapes_fit.yaml)"
    ),
    "microshapes-microdit-original": Preset(
        "MicroDiTOriginalTransformer",
        dict(num_attention_heads=4, attention_head_dim=32, in_channels=8, out_channels=8, num_layers=6, sample_size=32,
             patch_size=4, caption_channels=64, interpolation_scale=1.0, attention_bias=False, multiple_of=32,
             patch_mixer_layers=1, num_experts=4, expert_capacity=2.0, use_text_mask=True),
        "MicroShapes with MicroDiT as published (configs/microshapes_microdit_original.yaml)",
    ),
}  # fmt: skip

#: Every preset by name.
PRESETS: dict[str, Preset] = {**_PUBLISHED, **_TINY_PRESETS, **_MICROSHAPES_PRESETS}


def preset(name: str) -> Preset:
    """The preset called ``name``; a ValueError listing the known ones otherwise."""
    if name not in PRESETS:
        raise ValueError(f"{name!r} is not a size preset; choose one of {sorted(PRESETS)}.")
    return PRESETS[name]


def preset_config(name: str, **overrides) -> dict:
    """A fresh copy of preset ``name``'s config with ``overrides`` applied (any constructor argument)."""
    return {**copy.deepcopy(dict(preset(name).config)), **overrides}


def build_preset(name: str, **overrides) -> nn.Module:
    """Preset ``name``'s backbone with ``overrides`` applied, randomly initialised (on the current default device:
    ``with torch.device("meta"):`` builds an XL model without memory)."""
    return backbone_class(preset(name).cls)(**preset_config(name, **overrides))

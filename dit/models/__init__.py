"""Backbones (each a :class:`DiTBackbone`, one per file), ControlNet adapters and the named size presets."""

from .backbone import DiTBackbone
from .controlnet import ControlNetAdapter, MultiControlNetAdapter
from .fit_transformer import FiTTransformer
from .lit_transformer import LiTTransformer
from .microdit_original import MicroDiTOriginalTransformer
from .microdit_transformer import MicroDiTTransformer
from .pixart_transformer import PixArtTransformer
from .presets import PRESETS, build_preset, preset_config

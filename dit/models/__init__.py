"""Backbones and ControlNet adapters, one per file (each exposes ``ModelMixin`` for diffusers' pipeline loader)."""

from .controlnet import ControlNetAdapter, MultiControlNetAdapter
from .fit_transformer import FiTTransformer
from .lit_transformer import LiTTransformer
from .microdit_transformer import MicroDiTTransformer
from .pixart_transformer import PixArtTransformer

"""Backbones and ControlNet adapters, one per file (each exposes ``ModelMixin`` for diffusers' pipeline loader)."""

from .controlnet import ControlNetAdapter, MultiControlNetAdapter
from .lit_transformer import LiTTransformer
from .pixart_transformer import PixArtTransformer

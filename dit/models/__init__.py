"""Backbones, one per file (each file exposes ``ModelMixin`` for diffusers' pipeline loader)."""

from .lit_transformer import LiTTransformer
from .pixart_transformer import PixArtTransformer

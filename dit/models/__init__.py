"""Backbones, one per file (each file exposes ``ModelMixin`` for diffusers' pipeline loader)."""

from .pixart_transformer import PixArtTransformer

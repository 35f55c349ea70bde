"""The backbone classes of the toolkit by name: what a training config's ``model.cls`` and a ControlNet adapter's
``transformer_class`` may name (never an arbitrary import path from a file)."""

from __future__ import annotations

from .fit_transformer import FiTTransformer
from .lit_transformer import LiTTransformer
from .microdit_transformer import MicroDiTTransformer
from .pixart_transformer import PixArtTransformer

BACKBONES: dict[str, type] = {
    cls.__name__: cls for cls in (PixArtTransformer, LiTTransformer, MicroDiTTransformer, FiTTransformer)
}


def backbone_class(name: str) -> type:
    """The backbone class called ``name``; a ValueError listing the known ones otherwise."""
    if name not in BACKBONES:
        raise ValueError(f"{name!r} is not a backbone class of dit.models; choose one of {sorted(BACKBONES)}.")
    return BACKBONES[name]

"""The backbone classes of the toolkit by name: what a training config's ``model.cls``, a ControlNet adapter's
``transformer_class`` and a saved folder's ``_class_name`` may name (never an arbitrary import path from a file).

Every subclass of :class:`~dit.models.backbone.DiTBackbone` is listed when its class is defined (a family defined
outside the toolkit too, once its module is imported); this module imports the built-in families."""

from __future__ import annotations

import json
import os

from torch import nn

from .backbone import BACKBONES

# the built-in families, listed in BACKBONES when their classes are defined
from .fit_transformer import FiTTransformer  # noqa: F401, E402
from .lit_transformer import LiTTransformer  # noqa: F401, E402
from .microdit_transformer import MicroDiTTransformer  # noqa: F401, E402
from .pixart_transformer import PixArtTransformer  # noqa: F401, E402

__all__ = ["BACKBONES", "FOLDER_ALIASES", "backbone_class", "load_backbone"]

#: ``_class_name`` values of diffusers-format folders that load as one of our classes.
FOLDER_ALIASES = {"Transformer2DModel": "PixArtTransformer", "PixArtTransformer2DModel": "PixArtTransformer"}


def backbone_class(name: str) -> type:
    """The backbone class called ``name``; a ValueError listing the known ones otherwise."""
    name = FOLDER_ALIASES.get(name, name)
    if name not in BACKBONES:
        raise ValueError(f"{name!r} is not a backbone class of dit.models; choose one of {sorted(BACKBONES)}.")
    return BACKBONES[name]


def load_backbone(source) -> nn.Module:
    """A backbone module as given, or loaded (strictly) from a transformer or pipeline folder as the class its
    ``config.json`` names (``_class_name``; diffusers' PixArt names load as :class:`PixArtTransformer`)."""
    if isinstance(source, nn.Module):
        return source
    path = os.fspath(source)
    subfolder = "transformer" if os.path.isfile(os.path.join(path, "model_index.json")) else None
    config_path = os.path.join(path, subfolder or "", "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path} is neither a transformer folder nor a pipeline folder (no {config_path}).")
    with open(config_path) as file:
        name = json.load(file).get("_class_name", "PixArtTransformer")
    return backbone_class(name).from_pretrained(path, subfolder=subfolder)

"""Weight inheritance within the PixArt family: a variant (LiT, KV compression, MicroDiT) built from a trained
PixArt model keeps every weight with the same name and shape except those it replaces."""

from __future__ import annotations

import torch
from diffusers.utils import logging
from torch import nn

logger = logging.get_logger(__name__)


def inherit_from(cls: type, source: nn.Module, overrides: dict, config: dict, skip: tuple[str, ...]) -> nn.Module:
    """A ``cls`` built from ``source``'s config updated by ``config`` (the class's own values) and ``overrides``,
    holding every ``source`` weight with the same name and shape unless its name contains a fragment of ``skip``.

    The model carries ``inheritance_report`` (also logged): ``inherited`` (count), ``new`` (parameters it starts
    fresh) and ``dropped`` (source parameters it has no use for). It takes ``source``'s device and dtype.
    """
    source_config = {k: v for k, v in source.config.items() if not k.startswith("_")}
    model = cls(**{**source_config, **config, **overrides})
    theirs, mine = source.state_dict(), model.state_dict()
    take = {
        key: value
        for key, value in theirs.items()
        if key in mine and mine[key].shape == value.shape and not any(part in key for part in skip)
    }
    model.load_state_dict(take, strict=False)
    model.inheritance_report = {
        "inherited": len(take),
        "new": sorted(set(mine) - set(take)),
        "dropped": sorted(set(theirs) - set(take)),
    }
    logger.info("%s.from_pixart: %s", cls.__name__, model.inheritance_report)
    like = next(source.parameters())
    if like.dtype == torch.float32 and like.device.type == "cpu":
        return model
    return model.to(like.device, like.dtype)

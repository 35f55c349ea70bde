"""Tools over every model of :mod:`dit.models`: regional compilation, and loading a PixArt-family model (a
distillation teacher, a source of inherited weights).

The pieces the classes are made of live in :mod:`~dit.models.mixins` (attention backend, block runner, strict I/O,
capabilities), :mod:`~dit.models.config_checks` and :mod:`~dit.models.inputs`.
"""

from __future__ import annotations

import torch

from .activation_checkpointing import COMPILE_OPTIONS
from .pixart_transformer import as_pixart_model

__all__ = ["as_pixart_model", "compile_repeated_blocks"]


def compile_repeated_blocks(module: torch.nn.Module, **compile_kwargs) -> int:
    """Compile, in place, every repeated block inside ``module`` (regional compilation, as diffusers'
    ``ModelMixin.compile_repeated_blocks``): the block classes are those any submodule names in
    ``_repeated_blocks``, so a ControlNet run (base and adapter) or a trainer's wrapper is covered too.

    All blocks of one class share one compiled graph; parameter names and state dicts are unchanged. Keyword
    arguments go to ``torch.compile`` (``fullgraph=True`` turns any graph break into an error); they are recorded on
    each block, so selective activation checkpointing can compile its checkpoint of the block with the same ones
    (:mod:`~dit.models.activation_checkpointing`). Returns the number of blocks compiled; a module with none is an
    error.
    """
    names = {name for sub in module.modules() for name in getattr(sub, "_repeated_blocks", ())}
    blocks = [sub for sub in module.modules() if type(sub).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(module).__name__} holds no repeated block to compile (no _repeated_blocks found).")
    for block in blocks:
        block.compile(**compile_kwargs)
        setattr(block, COMPILE_OPTIONS, dict(compile_kwargs))
    return len(blocks)

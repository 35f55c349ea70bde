"""Softmax attention backends: one plain dict from name to kernel, no if/elif ladders in the blocks."""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .ops import math_attention, sdpa_attention, xformers_attention, xformers_bias


def _same_mask(bias: torch.Tensor, heads: int, q_len: int) -> torch.Tensor:
    return bias


@dataclass(frozen=True)
class AttentionBackend:
    """A softmax kernel and the function that turns a ``(B, 1, 1, Lk)`` bias into the mask it takes.

    Args:
        name: registry name.
        kernel: ``(q, k, v, mask) -> out``, all ``(B, L, H, D)``.
        adapt_mask: ``(bias, heads, q_len) -> mask``; called once per forward, not per block or head.
        needs_cuda: the kernel only runs on CUDA tensors.
    """

    name: str
    kernel: Callable[..., torch.Tensor]
    adapt_mask: Callable[[torch.Tensor, int, int], torch.Tensor] = _same_mask
    needs_cuda: bool = False


BACKENDS: dict[str, AttentionBackend] = {
    "sdpa": AttentionBackend("sdpa", sdpa_attention),
    "math": AttentionBackend("math", math_attention),
    "xformers": AttentionBackend("xformers", xformers_attention, xformers_bias, needs_cuda=True),
}

_warned: set[str] = set()


def get_backend(name: str) -> AttentionBackend:
    """The backend registered as ``name``; an unknown name is an error that lists the known ones."""
    if name not in BACKENDS:
        raise ValueError(f"Unknown attention backend {name!r}; choose one of {sorted(BACKENDS)}.")
    return BACKENDS[name]


def resolve_backend(name: str, device: torch.device) -> AttentionBackend:
    """``name`` if it can run on ``device``, else SDPA with one warning (never an ImportError)."""
    backend = get_backend(name)
    if name == "xformers":
        reason = None
        if device.type != "cuda":
            reason = f"xformers needs CUDA, the model is on {device.type}"
        elif importlib.util.find_spec("xformers") is None:
            reason = "xformers is not installed (pip install 'dit-toolkit[xformers]')"
        if reason is not None:
            if name not in _warned:
                warnings.warn(f"{reason}; falling back to torch SDPA attention.", stacklevel=3)
                _warned.add(name)
            return BACKENDS["sdpa"]
    return backend

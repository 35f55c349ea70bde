"""Fused Triton kernels: LiT's ReLU linear attention, KV-compression pooling and LiT's token-layout depthwise conv.

Optional (``pip install "dit[triton]"``): the kernels run on CUDA tensors when triton is installed; the torch ops in
:mod:`dit.nn.attention` stay the fallback on every other device and the reference the kernels are tested against.
Under ``TRITON_INTERPRET=1`` (set before triton is imported) the kernels also run on CPU tensors, which is how CI
tests them.

``DIT_TRITON`` chooses: ``auto`` (default, see :func:`use_kernels`), ``0`` (never), ``1`` (whenever triton is
installed: CUDA tensors, and CPU tensors when interpreting). :func:`set_kernels` (or the ``with`` block
:func:`kernel_mode`) does the same from Python.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Iterator

import torch

_MODES = ("auto", "0", "1")
#: ``auto`` serves a call only from this many tokens (batch x tokens): on an H200 (bf16, PixArt-XL width) a layer of
#: up to 4096 tokens is bound by the host, where the kernels' launches cost more than the torch ops, and from 16384
#: tokens the kernels win (the figures: bench/results/gpu_attention.json, gpu_lit.json).
AUTO_MIN_TOKENS = 16384
_override: str | None = None


@functools.cache
def triton_installed() -> bool:
    """Whether ``import triton`` would work (checked once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether triton runs kernels through its interpreter (``TRITON_INTERPRET=1``, CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def set_kernels(mode: str | None) -> None:
    """Force the Triton kernels on (``"1"``), off (``"0"``) or back to ``DIT_TRITON`` / ``auto`` (``None``)."""
    global _override
    if mode is not None and mode not in _MODES:
        raise ValueError(f"Unknown Triton kernel mode {mode!r}; choose one of {_MODES}.")
    _override = mode


@contextlib.contextmanager
def kernel_mode(mode: str | None) -> Iterator[None]:
    """:func:`set_kernels` for a ``with`` block, restoring ``DIT_TRITON`` / ``auto`` after it."""
    set_kernels(mode)
    try:
        yield
    finally:
        set_kernels(None)


def _mode() -> str:
    mode = _override or os.environ.get("DIT_TRITON", "auto")
    if mode not in _MODES:
        raise ValueError(f"DIT_TRITON={mode!r}; choose one of {_MODES}.")
    return mode


def use_kernels(*tensors: torch.Tensor, batch_tokens: int = 0) -> bool:
    """Whether the Triton kernels serve these tensors (``batch_tokens``: batch x tokens of the call).

    Never under ``torch.compile`` (inductor fuses the torch ops itself). ``auto``: CUDA tensors, from
    :data:`AUTO_MIN_TOKENS` tokens, and only where autograd does not record: a LiT-XL training step at 1024 px batch 2
    was slower with them on an H200 (bench/results/gpu_lit.json, ``train``), so training takes them only with
    ``DIT_TRITON=1``.
    """
    if torch.compiler.is_compiling():
        return False
    mode = _mode()
    if mode == "0" or not triton_installed():
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if mode == "1":
        return on_cuda or interpreting()
    recording = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return auto_serves(on_cuda, recording, batch_tokens)


def auto_serves(on_cuda: bool, recording: bool, batch_tokens: int) -> bool:
    """``auto``'s rule: CUDA, no autograd recording, at least :data:`AUTO_MIN_TOKENS` tokens."""
    return on_cuda and not recording and batch_tokens >= AUTO_MIN_TOKENS

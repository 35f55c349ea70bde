"""Softmax attention backends: one plain dict from name to kernel, no if/elif ladders in the blocks; diffusers'
backend names (``flash``, ``flex``, ``native``, ``_native_cudnn``, ``sage``, ...) run through its dispatcher."""

from __future__ import annotations

import functools
import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .flex import flex_mask, sdpa_flex_attention
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
    # SDPA where nothing is masked, FlexAttention skipping masked key blocks on the device where keys are
    "sdpa_flex": AttentionBackend("sdpa_flex", sdpa_flex_attention, flex_mask),
}

_warned: set[str] = set()


def get_backend(name: str) -> AttentionBackend:
    """The backend registered as ``name``, else diffusers' dispatcher backend of that name (checked as diffusers
    checks it: an unusable one, e.g. ``flash`` without flash-attn, is an error saying why); an unknown name is an error
    that lists the known ones."""
    if name in BACKENDS:
        return BACKENDS[name]
    if name not in diffusers_backend_names():
        raise ValueError(
            f"Unknown attention backend {name!r}; choose one of {sorted(BACKENDS)} or diffusers' "
            f"{sorted(diffusers_backend_names()) or '(diffusers has no attention dispatcher here)'}."
        )
    return _diffusers_backend(name)


def backend_problem(name: str) -> str | None:
    """Why the backend ``name`` cannot be used here (unknown, or diffusers cannot run it), or None: what a command
    line or config check reports before anything loads."""
    try:
        get_backend(name)
    except (ValueError, RuntimeError) as error:
        return str(error)
    return None


@functools.cache
def diffusers_backend_names() -> frozenset[str]:
    """The backend names of diffusers' attention dispatcher (``AttentionBackendName``); empty without one."""
    try:
        from diffusers.models.attention_dispatch import AttentionBackendName
    except ImportError:
        return frozenset()
    return frozenset(member.value for member in AttentionBackendName)


@functools.cache
def _diffusers_backend(name: str) -> AttentionBackend:
    """diffusers' backend ``name`` as a kernel: ``dispatch_attention_fn(q, k, v, attn_mask=bias, backend=name)`` on
    (B, L, H, D) tensors, the layout both use. diffusers' own requirement check runs first (installed package and
    version), and hub kernels are fetched as diffusers fetches them."""
    from diffusers.models import attention_dispatch as dispatch

    backend = dispatch.AttentionBackendName(name)
    try:
        dispatch._check_attention_backend_requirements(backend)
        dispatch._maybe_download_kernel_for_backend(backend)
    except (ImportError, RuntimeError) as error:
        raise RuntimeError(f"Attention backend {name!r} cannot be used here: {error}") from error
    kernel = functools.partial(_dispatch, backend=backend, dispatch_fn=dispatch.dispatch_attention_fn)
    return AttentionBackend(name, kernel)


def _dispatch(q, k, v, mask=None, *, backend, dispatch_fn) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return dispatch_fn(q, k, v, attn_mask=mask, backend=backend)  # (B, Lq, H, D)
    try:
        return dispatch_fn(q, k, v, attn_mask=mask, backend=backend)  # (B, Lq, H, D)
    except (RuntimeError, ValueError) as error:  # e.g. a CUDA-only kernel on the CPU: say which backend failed
        kind = ValueError if isinstance(error, ValueError) else RuntimeError
        raise kind(
            f"Attention backend {backend.value!r} failed on {q.device.type} {q.dtype} inputs: {error}"
        ) from error


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

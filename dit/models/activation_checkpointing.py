"""Selective activation checkpointing: a checkpointed block keeps the outputs of its expensive ops (matmuls,
convolutions, attention kernels) and recomputes only the cheap ones (pointwise, norms, modulation) in backward.

Full checkpointing (diffusers' ``enable_gradient_checkpointing()``) keeps nothing of a block but its inputs and reruns
the whole block in backward, about one more forward of compute. The selective mode keeps the results of the ops that
hold the FLOPs, so the backward reruns only memory-bound elementwise work: activation memory between none and full
checkpointing, at a small fraction of full checkpointing's extra compute. Use it as diffusers'
``gradient_checkpointing_func`` (``model.enable_gradient_checkpointing(selective_checkpointing_func)``), or as
``model.enable_gradient_checkpointing(selective=True)`` on the toolkit's models.

Random ops (dropout) are recomputed, not saved: non-reentrant checkpointing restores the RNG state before the
recompute (``preserve_rng_state``, on by default), and the saved ops draw no random numbers, so the recompute draws the
very same masks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

__all__ = ["COMPILE_OPTIONS", "SAVED_OPS", "save_expensive_ops", "selective_checkpointing_func"]

#: Attribute in which :func:`~dit.models.base.compile_repeated_blocks` records a block's ``torch.compile`` options.
COMPILE_OPTIONS = "_dit_compile_options"

_EXPENSIVE_OP_NAMES = (
    # matmuls (nn.Linear and torch.matmul reach the dispatcher as these)
    "mm", "addmm", "bmm", "baddbmm", "_addmm_activation", "_scaled_mm", "_grouped_mm", "_scaled_grouped_mm",
    # convolutions (KV compression, depthwise mixing)
    "convolution",
    # SDPA's fused kernels (the math path decomposes into bmm and softmax)
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_fused_attention_overrideable", "_flash_attention_forward", "_efficient_attention_forward",
)  # fmt: skip

#: The aten ops (overload packets) whose outputs a selectively checkpointed block keeps; those this torch lacks are
#: left out.
SAVED_OPS: frozenset = frozenset(
    getattr(torch.ops.aten, name) for name in _EXPENSIVE_OP_NAMES if hasattr(torch.ops.aten, name)
)


def save_expensive_ops(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """The selective policy (a ``create_selective_checkpoint_contexts`` policy function): keep the output of an op of
    :data:`SAVED_OPS`, recompute every other op (random ones included, under the restored RNG state)."""
    if getattr(op, "overloadpacket", None) in SAVED_OPS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts() -> tuple[Any, Any]:
    return create_selective_checkpoint_contexts(save_expensive_ops)


def selective_checkpointing_func(module: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``module(*args, **kwargs)`` under non-reentrant checkpointing with the :func:`save_expensive_ops` policy: a
    ``gradient_checkpointing_func`` for diffusers' ``enable_gradient_checkpointing`` (any diffusers model takes it).

    A block compiled by :func:`~dit.models.base.compile_repeated_blocks` runs the checkpoint *inside* one compiled
    function shared by every block (compiled with the same options), so the compiler sees the policy and plans the
    recompute itself (a compiled block under a checkpoint from outside would hide its ops from the policy). A
    block compiled some other way (``block.compile()`` with unknown options) is refused.
    """
    options = getattr(module, COMPILE_OPTIONS, None)
    if options is not None:
        return _compiled_selective_call(tuple(sorted(options.items())))(module, *args, **kwargs)
    if getattr(module, "_compiled_call_impl", None) is not None or hasattr(module, "_orig_mod"):
        raise RuntimeError(
            f"Selective activation checkpointing cannot run a {type(module).__name__} compiled on its own: the "
            "checkpoint must be inside the compiled function for the policy to see its ops. Compile the blocks with "
            "dit.models.base.compile_repeated_blocks (it records the options), or use full checkpointing "
            "(enable_gradient_checkpointing())."
        )
    return _selective_call(module, *args, **kwargs)


def _selective_call(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return checkpoint(function, *args, use_reentrant=False, context_fn=_selective_contexts, **kwargs)


def _selective_forward(block: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    return _selective_call(block.forward, *args, **kwargs)  # the plain forward: traced by the outer compile


@functools.cache
def _compiled_selective_call(options: tuple) -> Callable[..., Any]:
    """:func:`_selective_forward` compiled with ``options``: the block is an argument, so every block of a class
    shares one graph (its parameters are graph inputs)."""
    return torch.compile(_selective_forward, **dict(options))

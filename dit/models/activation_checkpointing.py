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

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

__all__ = ["SAVED_OPS", "save_expensive_ops", "selective_checkpointing_func"]

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

    A block compiled on its own (regional compilation: ``block.compile()``, ``compile_repeated_blocks``) is refused:
    the backward recomputes it eagerly (checkpointing disables dynamo there), so the ops the compiled forward kept
    do not match the recompute's. Full checkpointing works with compiled blocks; so does compiling the whole model.
    """
    if getattr(module, "_compiled_call_impl", None) is not None or hasattr(module, "_orig_mod"):
        raise RuntimeError(
            f"Selective activation checkpointing cannot run a compiled {type(module).__name__}: its backward "
            "recomputes the block eagerly, whose ops do not match the compiled forward's. Use full checkpointing "
            "(enable_gradient_checkpointing()) with regionally compiled blocks, or do not compile them."
        )
    return checkpoint(module, *args, use_reentrant=False, context_fn=_selective_contexts, **kwargs)

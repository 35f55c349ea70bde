"""bf16 compute weights with fp32 masters (``mixed_precision_weights: bf16``): the model trains with bf16 parameters,
cast once per optimizer step, instead of fp32 parameters that autocast casts op by op in every forward and backward.

The optimizer steps fp32 master copies of the trainable parameters with fp32 gradients copied from the bf16 ones; the
bf16 weights are then refreshed from the masters in one multi-tensor copy. Whatever reads or writes the run's weights
(the EMA, a distillation's target network, checkpoints, validation, the final pipeline) sees the fp32 masters, through
:meth:`MasterWeights.in_full_precision`; checkpoints are therefore the same files as an fp32 run's, and a resumed run
continues bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from .config import ConfigError, TrainConfig


class MasterWeights:
    """fp32 master copies of ``model``'s trainable parameters, whose own data is cast to ``dtype`` in place.

    Frozen parameters (a LoRA's or a ControlNet's base) are left as they are. Build it on the model's device, before
    the optimizer (which steps :attr:`masters`) and before ``accelerator.prepare`` (DDP buckets the bf16 gradients).

    Args:
        model: the model to train (unwrapped); its trainable parameters become ``dtype``.
        dtype: the compute dtype of the weights (bf16).
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]  # the model's own parameters, in ``dtype`` from here on
        self.masters = [torch.nn.Parameter(p.detach().float().clone()) for p in self.params]
        with torch.no_grad():
            for p in self.params:
                p.data = p.data.to(dtype)

    @torch.no_grad()
    def grads_to_masters(self) -> None:
        """After the step's last backward: the masters' fp32 gradients from the bf16 ones (one multi-tensor copy into
        fresh buffers, which the optimizer's ``zero_grad(set_to_none=True)`` frees for the next forward); the bf16
        gradients are dropped. A parameter without a gradient this step leaves its master without one (the optimizer
        skips it, as it would the parameter)."""
        present = [(m, p.grad) for m, p in zip(self.masters, self.params) if p.grad is not None]
        for master in self.masters:
            master.grad = None
        buffers = [torch.empty_like(m) for m, _ in present]
        if buffers:
            torch._foreach_copy_(buffers, [grad for _, grad in present])
        for (master, _), buffer in zip(present, buffers):
            master.grad = buffer
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def refresh(self) -> None:
        """After the optimizer step: the compute weights from the masters, rounded once (one multi-tensor copy)."""
        torch._foreach_copy_(self.params, self.masters)

    @contextlib.contextmanager
    def in_full_precision(self, writes: bool = False) -> Iterator[None]:
        """The model's trainable parameters hold the fp32 masters themselves (their data is swapped, not copied), to
        save, load, sample or follow them. ``writes``: what is written into them (a checkpoint loaded) is refreshed
        into the compute weights at the end."""
        compute = [p.data for p in self.params]
        for p, master in zip(self.params, self.masters):
            p.data = master.data
        try:
            yield
        finally:
            for p, data in zip(self.params, compute):
                p.data = data
            if writes:
                self.refresh()

    def named(self) -> dict[str, torch.Tensor]:
        """The fp32 masters by parameter name."""
        return dict(zip(self.names, self.masters))


def master_weights(model: torch.nn.Module, config: TrainConfig, accelerator: Accelerator) -> MasterWeights | None:
    """The run's :class:`MasterWeights` when ``mixed_precision_weights`` is ``bf16`` (``model`` is moved to the
    accelerator's device first), else None. Sharded engines keep their own masters and are refused."""
    if config.mixed_precision_weights == "fp32":
        return None
    kind = accelerator.distributed_type
    if getattr(accelerator, "is_fsdp2", False) or kind == DistributedType.FSDP:
        raise ConfigError(
            "mixed_precision_weights=bf16 does not combine with FSDP, which shards the masters itself: set "
            "mixed_precision_weights=fp32 and use FSDP2's MixedPrecisionPolicy (param_dtype bf16) instead."
        )
    if kind == DistributedType.DEEPSPEED:
        raise ConfigError(
            "mixed_precision_weights=bf16 does not combine with DeepSpeed, which keeps fp32 masters itself: set "
            "mixed_precision_weights=fp32 and bf16.enabled in the DeepSpeed config instead."
        )
    return MasterWeights(model.to(accelerator.device), torch.bfloat16)


def full_precision(masters: MasterWeights | None, writes: bool = False) -> contextlib.AbstractContextManager:
    """:meth:`MasterWeights.in_full_precision`, or nothing when the run keeps fp32 weights."""
    return masters.in_full_precision(writes) if masters is not None else contextlib.nullcontext()

"""Exponential moving average of a model's weights, checkpointable through accelerate: the run's EMA weights, and
a distillation's target network (a frozen copy of the student that follows it)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch

try:  # FSDP2 (accelerate with torch >= 2.6) turns parameters into DTensor shards
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # an older torch: no parameter is ever a DTensor
    DTensor = distribute_tensor = None


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (an FSDP2 parameter, or a shadow made from one)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def _local(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """This process's part of each tensor: a DTensor's local shard (a view: writes reach the DTensor), else itself."""
    return [t.to_local() if is_sharded(t) else t for t in tensors]


def trainable_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters that train (the ones an EMA follows)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


@torch.no_grad()
def lerp_toward_(targets: list[torch.Tensor], sources: list[torch.Tensor], weight: float) -> None:
    """``target += weight * (source - target)`` for every pair, as one fused multi-tensor op (``_foreach_lerp_``).

    Sources are cast to their target's dtype when they differ (fp32 shadows of bf16 weights); targets on another
    device than their sources are an error that names both, never a silent copy. Targets and sources each share one
    device and dtype (a model's trainable parameters and their shadows), so the first pair is checked.
    """
    if not targets:
        return
    if targets[0].device != sources[0].device:  # one device for all: a single check, not a loop per step
        raise RuntimeError(
            f"An EMA tensor is on {targets[0].device} and the parameter it follows on {sources[0].device}; build the "
            "EMA after the model is placed (accelerator.prepare) or move it with to()."
        )
    if targets[0].dtype != sources[0].dtype:
        sources = [s.to(t.dtype) for t, s in zip(targets, sources)]
    torch._foreach_lerp_(targets, sources, weight)


class EMA:
    """Shadow copies of the trainable parameters, ``shadow = decay * shadow + (1 - decay) * param``.

    Two kinds of shadow: fp32 tensors (the run's EMA weights, swapped into the model to sample or save it), or, with
    ``as_network``, the parameters of a frozen copy of the model, :attr:`module` (a target network that is called,
    as LCM's). Shadows live where the parameters live; build the EMA from the placed model (after
    ``accelerator.prepare``), or move it with :meth:`to`. The update is one fused multi-tensor lerp, not a Python
    loop of small kernels. Under FSDP2 the parameters are DTensor shards, and so are the shadows made from them: each
    process keeps and updates its own shard, and :meth:`state_dict` / :meth:`load_state_dict` gather and re-shard
    them.

    Args:
        model: the (unwrapped) model whose trainable parameters are followed.
        decay: EMA decay per optimizer step.
        as_network: keep a frozen copy of ``model`` (:attr:`module`) whose parameters are the shadows.
        device: where that copy goes (None: where ``model`` is).
    """

    def __init__(
        self, model: torch.nn.Module, decay: float, as_network: bool = False, device: torch.device | str | None = None
    ):
        self.decay = decay
        self.names = trainable_names(model)
        self.module = copy.deepcopy(model).requires_grad_(False).to(device) if as_network else None
        if self.module is not None:
            params = dict(self.module.named_parameters())
            self.shadow = {n: params[n] for n in self.names}
        else:
            params = dict(model.named_parameters())
            self.shadow = {n: params[n].detach().float().clone() for n in self.names}

    @property
    def _params(self) -> dict[str, torch.Tensor]:
        """The shadows by name (a target network's own parameters)."""
        return self.shadow

    def _followed(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        params = dict(model.named_parameters())
        return [params[n] for n in self.names]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        lerp_toward_(list(self.shadow.values()), self._followed(model), 1.0 - self.decay)

    def to(self, device: torch.device | str) -> EMA:
        """Move the shadows (fp32 stays fp32; a network copy moves whole)."""
        if self.module is not None:
            params = dict(self.module.to(device).named_parameters())
            self.shadow = {n: params[n] for n in self.names}
        else:
            self.shadow = {n: t.to(device) for n, t in self.shadow.items()}
        return self

    @contextlib.contextmanager
    def swapped_in(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Temporarily load the EMA weights into ``model`` (to sample or save it), then restore."""
        params = _local(self._followed(model))  # FSDP2: each process swaps its own shard (no DTensor foreach copy)
        backup = [p.detach().clone() for p in params]
        with torch.no_grad():
            torch._foreach_copy_(params, _local([self.shadow[n] for n in self.names]))
        try:
            yield model
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, backup)

    def state_dict(self) -> dict:
        """The decay and the shadows; sharded (FSDP2) shadows are gathered into full CPU tensors, a collective that
        every process must call (accelerate's ``save_state`` does, then the main process writes the result), so the
        saved state is the same whatever the process count."""
        shadow = {n: t.full_tensor().cpu() if is_sharded(t) else t.detach() for n, t in self.shadow.items()}
        return {"decay": self.decay, "shadow": shadow}

    def load_state_dict(self, state: dict) -> None:
        """Load saved shadows into the present ones: they keep their device (a checkpoint read onto the CPU lands
        on the model's device) and dtype. A sharded (FSDP2) shadow takes its own shard of the saved full tensor
        (every process calls this, as accelerate's ``load_state`` does). Older target-network states keep their
        shadows under ``params``."""
        saved_shadow = state["shadow"] if "shadow" in state else state["params"]
        missing = set(self.names) - set(saved_shadow)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:5]}.")
        self.decay = state["decay"]
        with torch.no_grad():
            for name in self.names:
                target, saved = self.shadow[name], saved_shadow[name]
                if is_sharded(target):  # every process holds the full tensor; rank 0's copy is scattered
                    saved = distribute_tensor(
                        saved.to(target.device, target.dtype), target.device_mesh, target.placements
                    )
                target.copy_(saved)


def target_network(model: torch.nn.Module, decay: float, device: torch.device | str | None = None) -> EMA:
    """A frozen copy of ``model`` whose trainable weights follow it as an EMA (``.module``; a distillation's target
    network)."""
    return EMA(model, decay, as_network=True, device=device)

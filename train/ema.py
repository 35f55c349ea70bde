"""Exponential moving average of a model's weights, checkpointable through accelerate."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class EMA:
    """fp32 shadow copies of the trainable parameters, ``shadow = decay * shadow + (1 - decay) * param``.

    Args:
        model: the (unwrapped) model whose trainable parameters are followed.
        decay: EMA decay per optimizer step.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.shadow = {n: params[n].detach().float().clone() for n in self.names}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        params = dict(model.named_parameters())
        for name in self.names:
            self.shadow[name].lerp_(params[name].detach().float(), 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Temporarily load the EMA weights into ``model`` (to sample or save it), then restore."""
        params = dict(model.named_parameters())
        backup = {n: params[n].detach().clone() for n in self.names}
        with torch.no_grad():
            for name in self.names:
                params[name].copy_(self.shadow[name])
        try:
            yield model
        finally:
            with torch.no_grad():
                for name in self.names:
                    params[name].copy_(backup[name])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.names) - set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:5]}.")
        self.decay = state["decay"]
        self.shadow = {n: state["shadow"][n].float().clone() for n in self.names}

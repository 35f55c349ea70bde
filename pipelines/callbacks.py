"""diffusers' step callbacks for the toolkit's pipelines.

Two kinds, as diffusers' pipelines have them:

- ``callback(step, timestep, latents)`` every ``callback_steps`` steps (``PixArtSigmaPipeline``'s deprecated style,
  called where it calls it);
- ``callback_on_step_end(pipe, i, t, tensors) -> dict`` after every step, with the tensors named in
  ``callback_on_step_end_tensor_inputs`` (or a diffusers ``PipelineCallback``'s ``tensor_inputs``). Every tensor it
  returns replaces the pipeline's own for the following steps, and it may change ``pipe._guidance_scale`` or set
  ``pipe._interrupt``, as diffusers' ``SDCFGCutoffCallback`` does.

A class-conditional pipeline hands out ``latents`` only (:class:`StepLatents`). The text tensors follow diffusers'
convention: ``prompt_embeds`` / ``prompt_attention_mask`` are the text batch the
transformer sees, the unconditional rows first when guided (so ``prompt_embeds[-1:]`` is the last conditional row);
``negative_prompt_embeds`` / ``negative_prompt_attention_mask`` are those unconditional rows (None unguided).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

from .checks import SamplingValueError

#: The tensors a ``callback_on_step_end`` may ask for (and replace).
CALLBACK_TENSOR_INPUTS = [
    "latents", "prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask",
]  # fmt: skip


def callback_tensor_names(callback_on_step_end, names: list[str] | None) -> list[str]:
    """The tensors the step-end callback gets: a diffusers ``PipelineCallback``'s own ``tensor_inputs``, else
    ``names`` (default ``["latents"]``, as diffusers)."""
    if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
        return list(callback_on_step_end.tensor_inputs)
    return list(names) if names is not None else ["latents"]


def legacy_callback_due(i: int, timesteps: int, steps: int, order: int, callback_steps: int) -> bool:
    """Whether ``callback(step, t, latents)`` runs after loop step ``i`` (diffusers' rule: at each completed step of a
    multi-stage scheduler, every ``callback_steps``-th)."""
    warmup = max(timesteps - steps * order, 0)
    completed = i == timesteps - 1 or ((i + 1) > warmup and (i + 1) % order == 0)
    return completed and i % callback_steps == 0


@dataclass
class StepCallbacks:
    """The callbacks of one sampling call: ``on_step_end(pipe, i, t, tensors)`` with the tensors named
    ``tensor_inputs`` after every step, and the legacy ``legacy(step, t, latents)`` every ``legacy_steps`` steps."""

    on_step_end: Callable[..., dict[str, torch.Tensor]] | None
    tensor_inputs: list[str]
    legacy: Callable[[int, Any, torch.Tensor], None] | None = None
    legacy_steps: int = 1

    def after_step(self, pipe, state, i: int, t, timesteps: int, steps: int) -> None:
        """Run the callbacks due after loop step ``i`` of ``timesteps`` (``steps`` sampling steps); the step-end
        callback's tensors replace ``state``'s."""
        if self.on_step_end is not None:
            state.run(self.on_step_end, pipe, i, t, self.tensor_inputs)
        order = getattr(pipe.scheduler, "order", 1)
        if self.legacy is not None and legacy_callback_due(i, timesteps, steps, order, self.legacy_steps):
            self.legacy(i // order, t, state.latents)


class CallStateMixin:
    """The state of the running (or last) call, as diffusers' pipelines expose it to callbacks."""

    @property
    def guidance_scale(self) -> float:
        """The guidance scale of the running (or last) call; a step-end callback may change ``_guidance_scale``."""
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether this step runs a CFG batch: ``guidance_scale > 1`` and a transformer without guidance embedding."""
        return self._guidance_scale > 1.0 and not self.guidance_embedded

    @property
    def guidance_channels(self) -> int | None:
        """The latent channels the running (or last) call guides (the first k; None: every channel)."""
        return getattr(self, "_guidance_channels", None)

    @property
    def num_timesteps(self) -> int:
        """The number of timesteps of the running (or last) call."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` (from a step-end callback) to skip the remaining steps."""
        return self._interrupt

    @property
    def cross_attention_kwargs(self) -> dict[str, Any] | None:
        """The ``cross_attention_kwargs`` of the running call (``{"scale": s}`` scales LoRA adapters)."""
        return self._cross_attention_kwargs


@dataclass
class StepLatents:
    """The latents a sampling loop carries from step to step when nothing else changes (a class-conditional call):
    a step-end callback gets and may replace ``latents`` only."""

    latents: torch.Tensor

    def run(self, callback: Callable, pipe, i: int, t, names: list[str]) -> None:
        """Call ``callback(pipe, i, t, {"latents": ...})`` and take the latents it returns, if new."""
        handed = {name: self.latents for name in names}  # names: checked to be ["latents"] or []
        returned = callback(pipe, i, t, dict(handed)) or {}
        latents = returned.get("latents")
        if latents is not None and latents is not handed.get("latents"):
            self.latents = latents


@dataclass
class StepTensors:
    """The tensors a sampling loop carries from step to step, as a step-end callback sees and replaces them.

    ``negatives``: how many leading rows of ``prompt_embeds`` are the unconditional branch (0 without a CFG batch).
    """

    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    prompt_attention_mask: torch.Tensor
    negatives: int

    def handed(self, names: list[str]) -> dict[str, torch.Tensor | None]:
        """The tensors named ``names``, for the callback."""
        tensors = {
            "latents": self.latents,
            "prompt_embeds": self.prompt_embeds,
            "prompt_attention_mask": self.prompt_attention_mask,
            "negative_prompt_embeds": self.prompt_embeds[: self.negatives] if self.negatives else None,
            "negative_prompt_attention_mask": self.prompt_attention_mask[: self.negatives] if self.negatives else None,
        }
        return {name: tensors[name] for name in names}

    def run(self, callback: Callable, pipe, i: int, t, names: list[str]) -> None:
        """Call ``callback(pipe, i, t, tensors)`` and take every tensor it returns that is not the one handed out."""
        handed = self.handed(names)
        returned = callback(pipe, i, t, dict(handed)) or {}
        new = {k: v for k, v in returned.items() if k in CALLBACK_TENSOR_INPUTS and v is not handed.get(k)}
        self.latents = new.get("latents", self.latents)
        if "prompt_embeds" in new or "prompt_attention_mask" in new:
            self._set_text(new.get("prompt_embeds", self.prompt_embeds), new.get("prompt_attention_mask"))
        if self.negatives and ("negative_prompt_embeds" in new or "negative_prompt_attention_mask" in new):
            self._set_negatives(new.get("negative_prompt_embeds"), new.get("negative_prompt_attention_mask"))

    def _set_text(self, embeds: torch.Tensor, mask: torch.Tensor | None) -> None:
        """A new text batch; a mask left as it was keeps its last rows (the conditional ones) when the batch shrank."""
        mask = self.prompt_attention_mask if mask is None else mask
        if mask.shape[0] != embeds.shape[0]:
            mask = mask[-embeds.shape[0] :]
        if tuple(mask.shape) != tuple(embeds.shape[:2]):
            raise SamplingValueError(
                f"callback_on_step_end returned prompt_embeds {tuple(embeds.shape)} with a prompt_attention_mask of "
                f"shape {tuple(mask.shape)}; return a mask of shape {tuple(embeds.shape[:2])}."
            )
        self.prompt_embeds, self.prompt_attention_mask = embeds, mask
        self.negatives = embeds.shape[0] - self.latents.shape[0] if embeds.shape[0] > self.latents.shape[0] else 0

    def _set_negatives(self, embeds: torch.Tensor | None, mask: torch.Tensor | None) -> None:
        """New unconditional rows (embeddings and/or mask) in place of the old ones."""
        n = self.negatives
        embeds = self.prompt_embeds[:n] if embeds is None else embeds
        mask = self.prompt_attention_mask[:n] if mask is None else mask
        expected = (n, *self.prompt_embeds.shape[1:])
        if tuple(embeds.shape) != expected or tuple(mask.shape) != expected[:2]:
            raise SamplingValueError(
                f"callback_on_step_end returned negative_prompt_embeds {tuple(embeds.shape)} and mask "
                f"{tuple(mask.shape)}; the unconditional rows are {expected} and {expected[:2]}."
            )
        self.prompt_embeds = torch.cat([embeds, self.prompt_embeds[n:]])
        self.prompt_attention_mask = torch.cat([mask, self.prompt_attention_mask[n:]])

"""Distillation objectives: a loss that learns from a frozen teacher around a base objective, and a training feature
that owns what it needs beside the student (the teacher, and whatever else a method keeps).

A method subclasses :class:`Distillation`, sets its ``name`` and registers itself with
:func:`~dit.train.objectives.register_distillation`; ``objective.distill: NAME`` then trains it, and the loop
drives it through the :class:`~dit.train.features.Feature` hooks alone (nothing in the loop names a method).
:class:`HybridDistillation` (LiT) lives here; LCM's consistency distillation in :mod:`dit.train.consistency`.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from diffusers import SchedulerMixin
from torch import nn

from dit.models.base import as_pixart_model

from .config import ObjectiveConfig
from .features import Feature, Run
from .objectives import ModelFn, NetworkCall, Objective, mean_per_sample, register_distillation


def load_teacher(path: str, device: torch.device | str) -> nn.Module:
    """The frozen distillation teacher (a PixArt transformer or pipeline folder) on ``device``, in eval mode."""
    return as_pixart_model(path).to(device).eval().requires_grad_(False)


class Distillation(Objective, Feature):
    """Base class: a distillation objective around ``base`` (whose parametrisation it shares), with a frozen
    teacher loaded from ``objective.distill_teacher`` when the run is prepared.

    Args:
        base: the objective the teacher was trained with.
    """

    label = "distillation (objective.distill_teacher)"
    off = "unset objective.distill and objective.distill_teacher"
    excludes = frozenset({"controlnet", "mixed_sizes"})
    #: why an FSDP2-sharded run cannot train the method (None: it can)
    sharded_refusal: str | None = None

    def __init__(self, base: Objective):
        super().__init__(base.config, base.parametrisation)
        self.base = base
        self.teacher: nn.Module | None = None

    @classmethod
    def from_config(cls, base: Objective, config: ObjectiveConfig) -> Distillation:
        """The method around ``base`` with the settings of the ``objective`` section."""
        return cls(base)

    def sampling_scheduler(self) -> SchedulerMixin:
        return self.base.sampling_scheduler()

    def prepare(self, run: Run) -> None:
        self.teacher = load_teacher(self.config.distill_teacher, run.accelerator.device)

    def networks(self, call: NetworkCall, draws: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The teacher's prediction function (the step's conditions, no student feature)."""
        return {"teacher_fn": functools.partial(call, self.teacher)}


@register_distillation
class HybridDistillation(Distillation):
    """LiT's hybrid distillation around any objective: its loss plus ``eps_weight * ||eps_T - eps_S||^2`` and, when
    the models output learned-sigma channels, ``var_weight * ||Sigma_T - Sigma_S||^2``, with a frozen teacher
    evaluated on the student's exact noisy input, timestep and conditions (``teacher_fn``).

    The first term compares the predictions in the objective's own parametrisation (ε for ``ddpm_eps``, v for
    ``v``); the variance term exists only for learned-sigma models (``out_channels = 2 * in_channels``).
    """

    name = "hybrid"
    label = "objective.distill=hybrid (LiT's hybrid distillation)"

    def __init__(self, base: Objective, eps_weight: float = 0.5, var_weight: float = 0.05):
        super().__init__(base)
        self.eps_weight, self.var_weight = eps_weight, var_weight

    @classmethod
    def from_config(cls, base: Objective, config: ObjectiveConfig) -> HybridDistillation:
        return cls(base, config.distill_eps_weight, config.distill_var_weight)

    def loss(self, model_fn, latents, noise, uniform, loss_mask=None, teacher_fn: ModelFn | None = None):
        if teacher_fn is None:
            raise ValueError("HybridDistillation needs the teacher's prediction function (objective.distill_teacher).")
        seen = {}

        def student(noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            seen["pred"], seen["inputs"] = model_fn(noisy, t), (noisy, t)
            return seen["pred"]

        loss, extra = self.base.loss(student, latents, noise, uniform, loss_mask)
        with torch.no_grad():
            target = teacher_fn(*seen["inputs"]).float()
        pred, channels = seen["pred"].float(), latents.shape[1]
        extra["kd_eps"] = mean_per_sample((pred[:, :channels] - target[:, :channels]) ** 2, loss_mask)
        loss = loss + self.eps_weight * extra["kd_eps"]
        if pred.shape[1] == 2 * channels and target.shape[1] == 2 * channels:
            extra["kd_var"] = mean_per_sample((pred[:, channels:] - target[:, channels:]) ** 2, loss_mask)
            loss = loss + self.var_weight * extra["kd_var"]
        return loss, extra

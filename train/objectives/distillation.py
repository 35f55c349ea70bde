"""Distillation objectives: a loss that learns from a frozen teacher around a base objective, and a training feature
that owns what it needs beside the student (the teacher, and whatever else a method keeps).

A method subclasses :class:`Distillation` and gets a row in :data:`~dit.train.config.DISTILLATIONS` (its name and
where its class is); ``objective.distill: NAME`` then trains it, with its settings in the ``objective`` section of
that name, and the loop drives it through the :class:`~dit.train.features.base.Feature` hooks alone (nothing in the
loop names a method). :class:`HybridDistillation` (LiT) lives here; LCM's consistency distillation in
:mod:`dit.train.objectives.consistency`. The teacher loads as the backbone class its folder names (any family).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from diffusers import SchedulerMixin
from torch import nn

from dit.models.registry import load_backbone

from ..config import ObjectiveConfig
from ..features.base import Feature, Run
from .losses import ModelFn, NetworkCall, Objective, mean_per_sample


def load_teacher(path: str, device: torch.device | str) -> nn.Module:
    """The frozen distillation teacher on ``device``, in eval mode: a transformer or pipeline folder, loaded as the
    backbone class its ``config.json`` names (:func:`~dit.models.registry.load_backbone`: PixArt, LiT, FiT, ...)."""
    return load_backbone(path).to(device).eval().requires_grad_(False)


class Distillation(Objective, Feature):
    """Base class: a distillation objective around ``base`` (whose parametrisation it shares), with a frozen
    teacher loaded from ``objective.teacher`` when the run is prepared. A run trains at most one, so every method is
    the feature ``distillation``.

    Args:
        base: the objective the teacher was trained with.
    """

    name = "distillation"
    label = "distillation (objective.teacher)"
    off = "unset objective.distill and objective.teacher"
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
        self.teacher = load_teacher(self.config.teacher, run.accelerator.device)

    def networks(self, call: NetworkCall, draws: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The teacher's prediction function (the step's conditions, no student feature)."""
        return {"teacher_fn": functools.partial(call, self.teacher)}


class HybridDistillation(Distillation):
    """LiT's hybrid distillation around any objective: its loss plus ``eps_weight * ||eps_T - eps_S||^2`` and, when
    the models output learned-sigma channels, ``var_weight * ||Sigma_T - Sigma_S||^2``, with a frozen teacher
    evaluated on the student's exact noisy input, timestep and conditions (``teacher_fn``).

    The first term compares the predictions in the objective's own parametrisation (ε for ``ddpm_eps``, v for
    ``v``); the variance term exists only for learned-sigma models (``out_channels = 2 * in_channels``).
    """

    label = "LiT's hybrid distillation (objective.teacher)"

    def __init__(self, base: Objective, eps_weight: float = 0.5, var_weight: float = 0.05):
        super().__init__(base)
        self.eps_weight, self.var_weight = eps_weight, var_weight

    @classmethod
    def from_config(cls, base: Objective, config: ObjectiveConfig) -> HybridDistillation:
        return cls(base, config.hybrid.eps_weight, config.hybrid.var_weight)

    def loss(self, model_fn, latents, noise, uniform, loss_mask=None, teacher_fn: ModelFn | None = None):
        if teacher_fn is None:
            raise ValueError("HybridDistillation needs the teacher's prediction function (objective.teacher).")
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

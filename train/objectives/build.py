"""The objective a run trains: the loss ``objective.name`` names, wrapped by the distillation ``objective.distill``
names (:data:`~dit.train.config.DISTILLATIONS`, the one table of their names; a method's module is imported only
when a run asks for it)."""

from __future__ import annotations

from importlib import import_module

from ..config import DISTILLATIONS, ConfigError, ObjectiveConfig, validate_objective
from .losses import OBJECTIVES, Objective


def distillation_class(name: str | None) -> type | None:
    """The distillation class that :data:`~dit.train.config.DISTILLATIONS` names ``name`` (its module imported on
    first use); None for None. An unknown name is a ConfigError listing the known ones."""
    if name is None:
        return None
    if name not in DISTILLATIONS:
        known = " or ".join(repr(known) for known in DISTILLATIONS)
        raise ConfigError(f"config.objective.distill: unknown distillation {name!r}; use {known} (or null).")
    module, _, attribute = DISTILLATIONS[name].partition(":")
    return getattr(import_module(module), attribute)


def build_objective(config: ObjectiveConfig) -> Objective:
    """The objective ``config.name``, wrapped by the distillation ``config.distillation`` (``objective.distill``, or
    ``hybrid`` when only a teacher is set); ``config`` is checked first
    (:func:`~dit.train.config.validate_objective`)."""
    objective = OBJECTIVES[validate_objective(config).name](config)
    method = distillation_class(config.distillation)
    return objective if method is None else method.from_config(objective, config)

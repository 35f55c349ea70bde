"""Training with accelerate (imported as ``dit.train``): one loop, pluggable objectives and features, exact resume.

``import dit.train`` is cheap: the names below are imported on first use (``dit train --help`` needs no torch), and
the built-in distillation objectives are imported when a run asks for one
(:func:`dit.train.objectives.distillation_class`).
"""

from importlib import import_module

#: Public name -> the module defining it (imported on first use).
_EXPORTS = {
    "TrainConfig": "dit.train.config",
    "load_config": "dit.train.config",
    "ConsistencyDistillation": "dit.train.consistency",
    "Distillation": "dit.train.distillation",
    "HybridDistillation": "dit.train.distillation",
    "TrainingInterrupted": "dit.train.interrupts",
    "Trainer": "dit.train.loop",
    "TrainingDiverged": "dit.train.loop",
    "OBJECTIVES": "dit.train.objectives",
    "build_objective": "dit.train.objectives",
    "register_distillation": "dit.train.objectives",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dit.train' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])

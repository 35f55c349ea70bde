"""Training with accelerate (imported as ``dit.train``): one loop, pluggable objectives and features, exact resume.

``import dit.train`` is cheap: the names below are imported on first use (``dit train --help`` needs no torch), and
the built-in distillation objectives are imported when a run asks for one
(:func:`dit.train.objectives.distillation_class`).
"""

from dit.lazy import lazy_exports

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

__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)

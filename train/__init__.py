"""Training with accelerate (imported as ``dit.train``): one loop, pluggable objectives and features, exact resume.

The top level holds the loop (:mod:`.loop`) and what builds a run (:mod:`.config`, :mod:`.model_setup`,
:mod:`.engine`, :mod:`.optim`, :mod:`.ema`) and the ``dit train`` command (:mod:`.command`); the sub-packages hold the
data (:mod:`.data`), the objectives (:mod:`.objectives`), the features (:mod:`.features`), the run folder and its
outputs (:mod:`.run`) and feature extraction (:mod:`.extract`).

``import dit.train`` is cheap: the names below are imported on first use (``dit train --help`` needs no torch), and
a distillation's module is imported when a run asks for one (:data:`~dit.train.config.DISTILLATIONS`).
"""

from dit.lazy import lazy_exports

#: Public name -> the module defining it (imported on first use).
_EXPORTS = {
    "TrainConfig": "dit.train.config",
    "load_config": "dit.train.config",
    "DISTILLATIONS": "dit.train.config",
    "ConsistencyDistillation": "dit.train.objectives.consistency",
    "Distillation": "dit.train.objectives.distillation",
    "HybridDistillation": "dit.train.objectives.distillation",
    "TrainingInterrupted": "dit.train.run.interrupts",
    "Trainer": "dit.train.loop",
    "TrainingDiverged": "dit.train.loop",
    "OBJECTIVES": "dit.train.objectives.losses",
    "build_objective": "dit.train.objectives.build",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)

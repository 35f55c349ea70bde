"""Training with accelerate (imported as ``dit.train``): one loop, pluggable objectives and features, exact resume."""

from .config import TrainConfig, load_config
from .consistency import ConsistencyDistillation
from .distillation import Distillation, HybridDistillation
from .interrupts import TrainingInterrupted
from .loop import Trainer, TrainingDiverged
from .objectives import OBJECTIVES, build_objective, register_distillation

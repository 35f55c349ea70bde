"""Training with accelerate (imported as ``dit.train``): one loop, pluggable objectives, exact resume."""

from .config import TrainConfig, load_config
from .loop import Trainer, TrainingDiverged
from .objectives import OBJECTIVES, build_objective

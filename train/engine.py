"""The accelerate engine a run uses: sharded engines' limits (FSDP2, DeepSpeed) and the metrics tracker."""

from __future__ import annotations

import importlib.util
import warnings

from accelerate import Accelerator
from accelerate.utils import DistributedType

from .config import ConfigError, TrainConfig
from .objectives.build import distillation_class


def _check_engine(accelerator: Accelerator, config: TrainConfig) -> bool:
    """Whether the model will be sharded (FSDP2); refuses what the sharded engines cannot run, and gives DeepSpeed
    the per-process batch size that no prepared dataloader tells it."""
    kind = accelerator.distributed_type
    sharded = getattr(accelerator, "is_fsdp2", False)
    if kind == DistributedType.FSDP and not sharded:
        raise ConfigError("FSDP version 1 is not supported; set fsdp_version: 2 (configs/accelerate/fsdp2.yaml).")
    if sharded and config.validation.every:
        raise ConfigError(
            "validation.every: sampling runs on the main process alone, which an FSDP2-sharded model cannot; set "
            "validation.every=0 and sample the checkpoints' model_ema folders."
        )
    method = distillation_class(config.objective.distillation)
    if sharded and method is not None and method.sharded_refusal:
        raise ConfigError(f"objective.distill={config.objective.distill}: {method.sharded_refusal}")
    if kind == DistributedType.DEEPSPEED:
        if config.gradient_accumulation_steps != 1:
            raise ConfigError(
                "gradient_accumulation_steps: under DeepSpeed the engine steps inside backward; keep it at 1 (and "
                "gradient_accumulation_steps: 1 in the accelerate config's deepspeed_config)."
            )
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.data.batch_size
    return sharded


_said: set[str] = set()  # the tracker notes already given in this process (each once)


def _tracker(report_to: str) -> str | None:
    """accelerate's ``log_with``: TensorBoard for ``auto`` (the default) when it is installed, and for
    ``tensorboard``; ``none`` logs to ``metrics.jsonl`` (and ``loss.png``) only. A missing tensorboard is said once."""
    if report_to in ("none", "", None):
        return None
    if report_to not in ("auto", "tensorboard"):
        raise ConfigError(f"report_to: {report_to!r} is not supported; use 'auto', 'tensorboard' or 'none'.")
    if importlib.util.find_spec("tensorboard") is not None:
        return "tensorboard"
    if report_to not in _said:
        _said.add(report_to)
        warnings.warn(
            f"report_to={report_to}: tensorboard is not installed, so metrics go to output_dir/metrics.jsonl and "
            "loss.png only (pip install tensorboard, or report_to=none to silence this).",
            stacklevel=3,
        )
    return None

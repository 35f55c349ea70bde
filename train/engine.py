"""The accelerate engine a run uses: sharded engines' limits (FSDP2, DeepSpeed) and the metrics tracker."""

from __future__ import annotations

import warnings

from accelerate import Accelerator
from accelerate.utils import DistributedType

from .config import ConfigError, TrainConfig
from .objectives import DISTILLATIONS


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
    method = DISTILLATIONS.get(config.objective.distill)
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


def _tracker(report_to: str) -> str | None:
    """accelerate's ``log_with``: TensorBoard when asked for and installed (else metrics.jsonl only)."""
    if report_to in ("none", "", None):
        return None
    if report_to != "tensorboard":
        raise ConfigError(f"report_to: {report_to!r} is not supported; use 'tensorboard' or 'none'.")
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        warnings.warn(
            "report_to=tensorboard but tensorboard is not installed; logging to metrics.jsonl only.", stacklevel=3
        )
        return None
    return "tensorboard"

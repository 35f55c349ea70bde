"""What a finished run leaves besides its checkpoints: ``output_dir/pipeline`` (a complete pipeline folder; a feature
may decide its class and models, :meth:`~dit.train.features.base.Feature.pipeline_parts`), and the check at setup that
the pipeline can be complete. What the features export themselves (LCM distillation's ``output_dir/lcm``) they write
in :meth:`~dit.train.features.base.Feature.export`."""

from __future__ import annotations

import contextlib
import copy
import warnings
from pathlib import Path

import torch

from dit.models.registry import backbone_class
from dit.pipelines.text_to_image import TextToImagePipeline

from ..config import ConfigError, TrainConfig
from ..features.base import PipelineParts
from .checkpointing import checkpoint_dir, latest_name
from .validation import (
    ENCODERS,
    EXTRACT_CONFIG,
    extracted_with,
    has_encoders,
    resolve_validation_pipeline,
    write_pipeline,
)


class RunOutputs:
    """The :class:`~dit.train.loop.Trainer`'s methods that write a run's outputs."""

    def save_pipeline(self) -> Path | None:
        """``output_dir/pipeline`` (see :func:`save_pipeline`)."""
        return save_pipeline(self)


def encoders_source(config: TrainConfig) -> Path | None:
    """Where ``output_dir/pipeline`` takes its tokenizer, text encoder and VAE from: the pipeline the features were
    extracted with (``extract_config.json`` in ``data.path``, as ``dit extract`` and the MicroShapes recipes write
    it), else ``validation.pipeline``. A pure function of ``config``, called before the run writes anything: a
    ConfigError in one line names the fix when there is neither. None with ``pipeline: false`` (no pipeline folder
    is written), or for a ``data.path`` that is not a features folder (loading the features says what is wrong)."""
    if not config.pipeline or config.data.source != "features" or not Path(config.data.path).is_dir():
        return None
    resolve_validation_pipeline(config)  # validation.every's own message first (it needs the same encoders)
    source = extracted_with(config.data.path) or config.validation.pipeline
    if source is None:
        raise ConfigError(
            f"data.path={config.data.path} has no {EXTRACT_CONFIG} naming the pipeline its features were extracted "
            "with, so the run's output_dir/pipeline would have no tokenizer, text encoder or VAE: set "
            "validation.pipeline=FOLDER (that pipeline, with tokenizer/, text_encoder/ and vae/)."
        )
    if not has_encoders(source):
        raise ConfigError(f"validation.pipeline={source} has no {', '.join(ENCODERS)} folders.")
    return Path(source)


def save_pipeline(trainer) -> Path | None:
    """``output_dir/pipeline``: a complete pipeline folder of the latest checkpoint's model (its EMA when kept; a
    LoRA fused into its base), or of what a feature makes of it (:meth:`~dit.train.features.base.Feature.
    pipeline_parts`), with the objective's sampler, ``sampling_defaults.json`` (the validation steps and guidance; an
    LCM student's few steps), and the encoders the features were extracted with (:func:`encoders_source`). FSDP2
    LoRA runs write none."""
    weights = latest_weights(trainer.root)
    parts = _feature_parts(trainer, weights) or _trained_parts(trainer, weights)
    if parts is None:
        return None
    source = encoders_source(trainer.config)  # checked at setup: the run would not have started without one
    folder = trainer.root / "pipeline"
    write_pipeline(folder, parts, trainer.objective.sampling_scheduler(), sampling_defaults(trainer), source)
    return folder


def _feature_parts(trainer, weights: Path) -> PipelineParts | None:
    """The pipeline parts a feature decides (at most one may)."""
    decided = [(f, parts) for f in trainer.features if (parts := f.pipeline_parts(trainer, weights)) is not None]
    if len(decided) > 1:
        raise ConfigError(f"{' and '.join(f.label for f, _ in decided)} each decide the run's pipeline; turn one off.")
    return decided[0][1] if decided else None


def _trained_parts(trainer, weights: Path) -> PipelineParts | None:
    """A text-to-image pipeline of the trained backbone; None for an FSDP2 LoRA run (said in a warning)."""
    transformer = _final_transformer(trainer, weights)
    return None if transformer is None else PipelineParts(TextToImagePipeline, {"transformer": transformer})


def _final_transformer(trainer, weights: Path) -> torch.nn.Module | None:
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not getattr(model, "peft_config", None):
        return backbone_class(trainer.config.model.cls).from_pretrained(weights)
    if trainer.sharded:
        warnings.warn(
            "FSDP2 LoRA run: no output_dir/pipeline (fuse the checkpoint's LoRA into its base).", stacklevel=6
        )
        return None
    context = trainer.ema.swapped_in(model) if trainer.ema is not None else contextlib.nullcontext()
    with context:
        fused = copy.deepcopy(model)
    fused.fuse_lora()
    fused.unload_lora()
    return fused.eval()


def latest_weights(root: Path) -> Path:
    """The latest checkpoint's ``model_ema`` folder when an EMA was kept, else its ``model``."""
    latest = checkpoint_dir(root) / latest_name(root)
    return latest / "model_ema" if (latest / "model_ema").is_dir() else latest / "model"


def sampling_defaults(trainer) -> tuple[int, float]:
    """(steps, guidance scale) recorded as the pipeline's sampling defaults: the objective's (an LCM student's few
    steps), else the validation settings."""
    validation = trainer.config.validation
    return trainer.objective.sampling_defaults() or (validation.steps, validation.guidance_scale)

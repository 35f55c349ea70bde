"""What a finished run leaves besides its checkpoints: ``output_dir/pipeline`` (a complete pipeline folder) and what
its features export (LCM distillation's ``output_dir/lcm``), and the check at setup that the pipeline can be complete."""

from __future__ import annotations

import contextlib
import copy
import warnings
from pathlib import Path

import torch

from dit.models.controlnet import ControlNetAdapter
from dit.models.registry import backbone_class

from .checkpointing import checkpoint_dir, latest_name
from .config import ConfigError, TrainConfig
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
    """``output_dir/pipeline``: a complete pipeline folder of the latest checkpoint's transformer (its EMA when
    kept; a LoRA fused into its base), the objective's sampler, ``sampling_defaults.json`` (the validation
    steps and guidance; an LCM student's few steps), and the encoders the features were extracted with
    (:func:`encoders_source`). A ControlNet run's folder is a ``ControlNetPipeline``:
    the frozen base transformer with the trained adapter. FSDP2 LoRA runs write none."""
    transformer = _final_transformer(trainer)
    if transformer is None:
        return None
    controlnet = _final_adapter(trainer) if trainer.config.controlnet.enabled else None
    source = encoders_source(trainer.config)  # checked at setup: the run would not have started without one
    folder = trainer.root / "pipeline"
    scheduler, sampling = trainer.objective.sampling_scheduler(), sampling_defaults(trainer)
    write_pipeline(folder, transformer, scheduler, sampling, source, controlnet=controlnet)
    return folder


def _final_transformer(trainer) -> torch.nn.Module | None:
    model = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.config.controlnet.enabled:  # the frozen base (the adapter is the checkpoint's, _final_adapter)
        return trainer.backbone
    if getattr(model, "peft_config", None):
        if trainer.sharded:
            warnings.warn(
                "FSDP2 LoRA run: no output_dir/pipeline (fuse the checkpoint's LoRA into its base).", stacklevel=5
            )
            return None
        context = trainer.ema.swapped_in(model) if trainer.ema is not None else contextlib.nullcontext()
        with context:
            fused = copy.deepcopy(model)
        fused.fuse_lora()
        fused.unload_lora()
        return fused.eval()
    weights = _latest_weights(trainer)
    return backbone_class(trainer.config.model.cls).from_pretrained(weights)


def _final_adapter(trainer) -> torch.nn.Module:
    """A ControlNet run's adapter from the latest checkpoint (its EMA when kept)."""
    weights = _latest_weights(trainer)
    return ControlNetAdapter.from_pretrained(weights)


def _latest_weights(trainer) -> Path:
    """The latest checkpoint's ``model_ema`` folder when an EMA was kept, else its ``model``."""
    latest = checkpoint_dir(trainer.root) / latest_name(trainer.root)
    return latest / "model_ema" if (latest / "model_ema").is_dir() else latest / "model"


def sampling_defaults(trainer) -> tuple[int, float]:
    """(steps, guidance scale) recorded as the pipeline's sampling defaults: the objective's (an LCM student's few
    steps), else the validation settings."""
    validation = trainer.config.validation
    return trainer.objective.sampling_defaults() or (validation.steps, validation.guidance_scale)

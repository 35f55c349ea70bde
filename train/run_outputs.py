"""What a finished run leaves besides its checkpoints: ``output_dir/pipeline`` (a complete pipeline folder) and what
its features export (LCM distillation's ``output_dir/lcm``)."""

from __future__ import annotations

import contextlib
import copy
import warnings
from pathlib import Path

import torch

from dit.models.controlnet import ControlNetAdapter
from dit.models.registry import backbone_class

from .checkpointing import checkpoint_dir, latest_name
from .consistency import ConsistencyDistillation
from .validation import extracted_with, write_pipeline


class RunOutputs:
    """The :class:`~dit.train.loop.Trainer`'s methods that write a run's outputs."""

    def save_pipeline(self) -> Path | None:
        """``output_dir/pipeline`` (see :func:`save_pipeline`)."""
        return save_pipeline(self)

    def save_lcm_folder(self) -> Path:
        """``output_dir/lcm`` of a consistency-distillation run (what its objective exports at the end)."""
        if not isinstance(self.objective, ConsistencyDistillation):
            raise ValueError("An LCM folder is written by consistency distillation runs (objective.distill=lcm).")
        return self.objective.export(self)


def save_pipeline(trainer) -> Path | None:
    """``output_dir/pipeline``: a complete pipeline folder of the latest checkpoint's transformer (its EMA when
    kept; a LoRA fused into its base), the objective's sampler, ``sampling_defaults.json`` (the validation
    steps and guidance; an LCM student's few steps), and the encoders the features were extracted with
    (``extract_config.json``, else ``validation.pipeline``). A ControlNet run's folder is a ``ControlNetPipeline``:
    the frozen base transformer with the trained adapter. FSDP2 LoRA runs write none."""
    transformer = _final_transformer(trainer)
    if transformer is None:
        return None
    controlnet = _final_adapter(trainer) if trainer.config.controlnet.enabled else None
    source = extracted_with(trainer.config.data.path) or trainer.config.validation.pipeline
    folder = trainer.root / "pipeline"
    scheduler, sampling = trainer.objective.sampling_scheduler(), sampling_defaults(trainer)
    missing = write_pipeline(folder, transformer, scheduler, sampling, source, controlnet=controlnet)
    if missing:
        warnings.warn(
            f"{folder} has no {', '.join(missing)}: {Path(trainer.config.data.path) / 'extract_config.json'} is "
            "missing and validation.pipeline is not set; add them with resume=latest validation.pipeline=FOLDER "
            "(the pipeline the features were extracted with), or pass them to from_pretrained.",
            stacklevel=4,
        )
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

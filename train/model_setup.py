"""Building what a run trains and distils from: the backbone (fresh, pretrained or inherited, with LoRA or a
ControlNet adapter), the frozen teacher, and what a base pipeline records about its objective."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import ConfigError, TrainConfig

#: What each objective's sampler predicts -> the objective that trains it (for messages about a base model).
OBJECTIVE_OF = {"epsilon": "ddpm_eps", "v_prediction": "v", "sample": "x0", "flow": "flow"}


def build_model(config: TrainConfig) -> torch.nn.Module:
    """The backbone named by ``model.cls`` (a class of :mod:`dit`), from ``model.pretrained`` or ``model.kwargs``."""
    import dit

    cls = getattr(dit, config.model.cls, None)
    if cls is None or not isinstance(cls, type):
        raise ConfigError(f"model.cls: {config.model.cls!r} is not a backbone class of dit.")
    if config.model.pretrained and config.model.inherit_from:
        raise ConfigError("model.pretrained and model.inherit_from exclude each other; set one.")
    if config.model.pretrained:  # a transformer folder, or a pipeline folder (its transformer/)
        model = cls.from_pretrained(config.model.pretrained, subfolder=_transformer_subfolder(config.model.pretrained))
    elif config.model.inherit_from:
        model = cls.from_pixart(config.model.inherit_from, **config.model.kwargs)
    else:
        model = cls(**config.model.kwargs)
    if config.model.lora_rank:
        add_lora(model, config.model.lora_rank, config.model.lora_alpha, config.model.lora_target_modules)
    if config.model.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if config.controlnet.enabled:  # the base frozen, a ControlNet adapter on it trains
        from .controlnet import controlnet_model

        model = controlnet_model(model, config)
    return model.train()


def _transformer_subfolder(path: str) -> str | None:
    return "transformer" if (Path(path) / "model_index.json").is_file() else None


def recorded_prediction(pretrained: str) -> tuple[str, Path] | None:
    """What a base model predicts, as its pipeline folder's scheduler records it (``prediction_type``, or ``flow``
    for a flow-matching scheduler), and the file it was read from; None when no pipeline folder records it."""
    path = Path(pretrained)
    root = path if _transformer_subfolder(pretrained) else path.parent
    record = root / "scheduler" / "scheduler_config.json"
    if not ((root / "model_index.json").is_file() and record.is_file()):
        return None
    config = json.loads(record.read_text())
    return _prediction_of(config.get("_class_name", ""), config.get("prediction_type")), record


def _prediction_of(scheduler_class: str, prediction_type: str | None) -> str:
    return "flow" if "FlowMatch" in scheduler_class else (prediction_type or "epsilon")


def add_lora(model: torch.nn.Module, rank: int, alpha: float | None, targets: list[str]) -> None:
    """Freeze ``model`` and add a trainable peft LoRA (Gaussian A, zero B: the model is unchanged at first)."""
    try:
        from peft import LoraConfig
    except ImportError as error:
        raise ConfigError("model.lora_rank needs peft: pip install 'dit-toolkit[lora]'.") from error
    model.requires_grad_(False)
    lora = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(targets), init_lora_weights="gaussian")
    model.add_adapter(lora)


def save_model(model: torch.nn.Module, folder: Path) -> None:
    """A diffusers folder of the model, or of its LoRA alone (``pytorch_lora_weights.safetensors``) when it has one."""
    if getattr(model, "peft_config", None):
        model.save_lora_adapter(folder)
    else:
        model.save_pretrained(folder)


def _teacher(path: str | None, device: torch.device) -> torch.nn.Module | None:
    """The frozen distillation teacher (a PixArt transformer or pipeline folder), or None."""
    if not path:
        return None
    from dit.models.base import as_pixart_model

    return as_pixart_model(path).to(device).eval().requires_grad_(False)

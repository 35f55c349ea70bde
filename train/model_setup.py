"""Building what a run trains: the backbone (fresh, pretrained or inherited, with LoRA), the run's features (token
masking, mixed sizes, a ControlNet adapter, a distillation objective) and the model they make of the backbone, and
what a base pipeline records about its objective."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from dit.models.registry import backbone_class
from dit.pipelines.schedulers import prediction_of, scheduler_prediction

from .config import ConfigError, TrainConfig
from .features.base import Feature
from .features.controlnet import ControlNetTraining
from .features.masking import TokenMasking
from .features.mixed_sizes import MixedSizes
from .objectives.losses import Objective

#: What each objective's sampler predicts -> the objective that trains it (for messages about a base model).
OBJECTIVE_OF = {"epsilon": "ddpm_eps", "v_prediction": "v", "sample": "x0", "flow": "flow", "edm": "edm"}


#: The features a run may turn on besides its objective, in the order they are checked and applied.
FEATURES: tuple[type, ...] = (TokenMasking, MixedSizes, ControlNetTraining)


def build_backbone(config: TrainConfig, objective: Objective | None = None) -> torch.nn.Module:
    """The backbone named by ``model.cls`` (:data:`dit.models.registry.BACKBONES`), from ``model.pretrained``,
    ``model.inherit_from`` or ``model.kwargs``, with its LoRA and gradient checkpointing; with ``objective``, its
    config records what the objective trains it to predict (:func:`record_objective`)."""
    try:
        cls = backbone_class(config.model.cls)
    except ValueError as error:
        raise ConfigError(f"model.cls: {config.model.cls!r} is not a backbone class of dit.") from error
    if config.model.pretrained and config.model.inherit_from:
        raise ConfigError("model.pretrained and model.inherit_from exclude each other; set one.")
    if config.model.pretrained:  # a transformer folder, or a pipeline folder (its transformer/)
        model = _from_pretrained(cls, config.model.pretrained)
    elif config.model.inherit_from:
        model = cls.from_pixart(config.model.inherit_from, **config.model.kwargs)
    else:
        model = cls(**config.model.kwargs)
    if objective is not None:
        record_objective(model, objective)
    if config.model.lora_rank:
        add_lora(model, config.model.lora_rank, config.model.lora_alpha, config.model.lora_target_modules)
    model.set_attention_backend(config.model.attention_backend)
    if config.model.gradient_checkpointing:  # true: full recompute; "selective": matmul and attention outputs kept
        model.enable_gradient_checkpointing(selective=config.model.gradient_checkpointing == "selective")
    return model


def record_objective(backbone: torch.nn.Module, objective: Objective) -> None:
    """Record in ``backbone``'s config what ``objective`` trains it to predict (``prediction_type``, and the
    ``noise_shift`` of a discrete schedule): every checkpoint and the run's pipeline folder carry it, and a pipeline
    given ``scheduler=None`` samples it with the objective's sampler (:mod:`dit.pipelines.schedulers`)."""
    backbone.register_to_config(**objective.parametrisation.model_record())


def build_features(config: TrainConfig, backbone: torch.nn.Module, objective: Objective) -> list[Feature]:
    """The features ``config`` turns on, and the objective when it is one (a distillation)."""
    features = [feature for cls in FEATURES if (feature := cls.from_config(config, backbone)) is not None]
    return features + [objective] if isinstance(objective, Feature) else features


def wrap_model(backbone: torch.nn.Module, features: list[Feature]) -> torch.nn.Module:
    """The model to train: ``backbone`` as the features wrap it (a ControlNet adapter around the frozen base), in
    training mode."""
    model = backbone
    for feature in features:
        model = feature.wrap(model)
    return model.train()


def check_base_objective(config: TrainConfig, objective: Objective, frozen_base: bool) -> None:
    """The objective should train what ``model.pretrained`` was trained to predict (as its pipeline folder's
    scheduler records it): an error for a frozen base (ControlNet), a warning when fine-tuning."""
    recorded = recorded_prediction(config.model.pretrained) if config.model.pretrained else None
    if recorded is None:
        return
    ours = prediction_of(objective.sampling_scheduler())
    if recorded[0] == ours:
        return
    name, base = config.objective.name, config.model.pretrained
    message = (
        f"objective.name={name} trains prediction_type={ours!r}, but the base model.pretrained={base} was "
        f"trained for prediction_type={recorded[0]!r} ({recorded[1]}); objective.name="
        f"{OBJECTIVE_OF.get(recorded[0], '?')} trains that"
    )
    if frozen_base:
        raise ConfigError(f"{message}. A ControlNet adapter on a frozen base must train the base's objective.")
    warnings.warn(f"{message}; fine-tuning to another objective has to unlearn the base's first.", stacklevel=4)


def _from_pretrained(cls: type, pretrained: str) -> torch.nn.Module:
    """``cls`` from the folder (or hub id) ``pretrained``; one that is neither is a :class:`ConfigError` naming it."""
    unknown = f"model.pretrained={pretrained}: no such folder, and not a hub id that is cached"
    if not Path(pretrained).exists() and (pretrained.startswith((".", "/", "~")) or pretrained.count("/") != 1):
        raise ConfigError(f"{unknown} (a hub id looks like org/name).")
    try:
        with warnings.catch_warnings():  # huggingface_hub's deprecation notice for what diffusers passes it
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks", category=UserWarning)
            return cls.from_pretrained(pretrained, subfolder=_transformer_subfolder(pretrained))
    except OSError as error:
        if Path(pretrained).exists():
            raise
        raise ConfigError(f"{unknown} ({' '.join(str(error).split())[:300]}).") from error


def _transformer_subfolder(path: str) -> str | None:
    return "transformer" if (Path(path) / "model_index.json").is_file() else None


def recorded_prediction(pretrained: str) -> tuple[str, Path] | None:
    """What a base model predicts, as its pipeline folder's scheduler records it (``prediction_type``, or ``flow``
    for a flow-matching scheduler), else as its transformer's config does, and the file it was read from; None when
    neither records it."""
    path = Path(pretrained)
    transformer = path / "transformer" if _transformer_subfolder(pretrained) else path
    record = transformer.parent / "scheduler" / "scheduler_config.json"
    if (transformer.parent / "model_index.json").is_file() and record.is_file():
        config = json.loads(record.read_text())
        return scheduler_prediction(config.get("_class_name", ""), config), record
    record = transformer / "config.json"
    recorded = json.loads(record.read_text()).get("prediction_type") if record.is_file() else None
    return (recorded, record) if recorded else None


def add_lora(model: torch.nn.Module, rank: int, alpha: float | None, targets: list[str]) -> None:
    """Freeze ``model`` and add a trainable peft LoRA (Gaussian A, zero B: the model is unchanged at first)."""
    try:
        from peft import LoraConfig
    except ImportError as error:
        raise ConfigError("model.lora_rank needs peft: pip install 'dit-toolkit[lora]'.") from error
    model.requires_grad_(False)
    lora = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(targets), init_lora_weights="gaussian")
    model.add_adapter(lora)

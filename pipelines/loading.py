"""Loading pipeline folders strictly: every weighted component must match its checkpoint key for key, the scheduler's
``prediction_type`` must be one it implements, and a training run folder resolves to the pipeline inside it.

diffusers loads a component with a missing key with one "newly initialized" warning (random weights: NaN or noise
images), and keeps a scheduler's unknown ``prediction_type`` until the first step. Here each diffusers ``ModelMixin``
and transformers ``PreTrainedModel`` component is loaded with its loading report first and handed to diffusers; the
toolkit's backbones and adapters are strict on their own (:meth:`dit.models.strict_io.StrictIOMixin.from_pretrained`).
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, ModelMixin
from diffusers.utils import logging

from ..checkpoint import CheckpointKeyError
from ..models import MultiControlNetAdapter
from ..models.strict_io import StrictIOMixin, refuse_variant_only_folder, saved_quant_method, variant_files
from ..quantization import check_dtype, check_quantized, component_quantization

#: What every noise-prediction scheduler implements.
NOISE_PREDICTIONS = ("epsilon", "sample", "v_prediction")
#: Schedulers that also take a rectified-flow velocity (``prediction_type="flow_prediction"``, with flow sigmas).
FLOW_PREDICTION_SCHEDULERS = {
    "DEISMultistepScheduler", "DPMSolverMultistepInverseScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "SASolverScheduler", "UniPCMultistepScheduler",
}  # fmt: skip
#: What flow-matching schedulers (no ``prediction_type`` argument: velocities only) may record in their config.
FLOW_MATCH_PREDICTIONS = ("flow", "flow_prediction")
#: Keyword arguments of ``from_pretrained`` handed to each component loaded here (as diffusers hands them).
COMPONENT_KWARGS = ("variant", "use_safetensors", "low_cpu_mem_usage", "disable_mmap")
#: diffusers' pipeline loader logs "Loaded {name} as {class} ..." here for each component it loads (its tests capture
#: this logger); the components loaded here are logged to it in the same words.
pipeline_logger = logging.get_logger("diffusers.pipelines.pipeline_utils")
#: Keyword arguments of ``from_pretrained`` that locate a hub pipeline (``DiffusionPipeline.download``).
DOWNLOAD_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "variant",
                   "use_safetensors")  # fmt: skip


# ----- where the pipeline is -----------------------------------------------------------------------------------
def pipeline_folder(path: str | os.PathLike) -> Path:
    """The pipeline folder ``path`` names: ``path`` itself (it holds ``model_index.json``) or, for a training run
    folder, ``path/pipeline`` (the complete pipeline the trainer writes at the end of a run)."""
    path = Path(path)
    for folder in (path, path / "pipeline"):
        if (folder / "model_index.json").is_file():
            return folder
    raise FileNotFoundError(
        f"{path} is not a pipeline folder: expected {path / 'model_index.json'} (a diffusers pipeline folder, e.g. "
        f"from save_pretrained) or {path / 'pipeline' / 'model_index.json'} (a training run folder: the trainer "
        "writes output_dir/pipeline/ when a run finishes)."
    )


def folder_components(folder: str | os.PathLike) -> list[str]:
    """The component names ``model_index.json`` of the pipeline ``folder`` lists (``transformer``, ``vae``, ...)."""
    index = json.loads((Path(folder) / "model_index.json").read_text())
    return [name for name, spec in index.items() if not name.startswith("_") and isinstance(spec, (list, tuple))]


# ----- components -----------------------------------------------------------------------------------------------
def strict_components(folder: str | os.PathLike, kwargs: dict) -> dict:
    """The weighted components of the pipeline in ``folder`` that diffusers would load leniently, each loaded with
    its loading report; a missing or unexpected key is a :class:`~dit.checkpoint.CheckpointKeyError` listing them.
    Each is logged as diffusers logs the components it loads ("Loaded vae as AutoencoderKL from `vae` subfolder of
    ...", at INFO).

    Components given in ``kwargs`` (``vae=...``) are left out; ``kwargs`` are the pipeline's ``from_pretrained``
    keyword arguments (``torch_dtype``, ``variant``, ...)."""
    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    loaded = {}
    for name, spec in index.items():
        if name.startswith("_") or name in kwargs or not isinstance(spec, (list, tuple)) or None in spec:
            continue
        cls = _lenient_model_class(*spec)
        if cls is not None and (folder / name).is_dir():
            loaded[name] = load_component(cls, folder / name, name, kwargs)
            pipeline_logger.info(f"Loaded {name} as {spec[1]} from `{name}` subfolder of {folder}.")
    return loaded


def load_component(cls: type, folder: Path, name: str, kwargs: dict):
    """``cls.from_pretrained(folder)`` with its loading report (quantized as ``kwargs["quantization_config"]`` asks
    for component ``name``); raises on missing or unexpected keys."""
    options = {key: kwargs[key] for key in COMPONENT_KWARGS if kwargs.get(key) is not None}
    if "variant" not in options:
        refuse_variant_only_folder(folder)
    if "variant" in options and not variant_files(os.listdir(folder), options["variant"]):
        del options["variant"]  # as diffusers: a component without files of the variant loads its main weights
    dtype = component_dtype(kwargs, name)
    if _is_transformers_model(cls):  # transformers has no diffusers-only options
        options = {key: value for key, value in options.items() if key in ("variant", "use_safetensors")}
    elif saved_quant_method(folder) == "quanto":  # quanto's CPU int8 kernel segfaults on memory-mapped weights
        options["disable_mmap"] = True
    options["dtype"] = dtype  # diffusers >= 0.42 and transformers name it dtype (torch_dtype is deprecated)
    quantization = component_quantization(kwargs.get("quantization_config"), name, not _is_transformers_model(cls))
    if quantization is not None:  # as diffusers resolves a PipelineQuantizationConfig for each component
        check_dtype(quantization, dtype, name)
        options["quantization_config"] = quantization
    model, info = cls.from_pretrained(folder, output_loading_info=True, **options)
    missing, unexpected = info.get("missing_keys") or (), info.get("unexpected_keys") or ()
    if missing or unexpected:
        raise CheckpointKeyError(missing, unexpected, where=f"{name} at {str(folder)!r}")
    return check_quantized(model)


def _lenient_model_class(library: str, class_name: str) -> type | None:
    """The class of a component entry of ``model_index.json`` when it has weights that diffusers would load
    without a key check; None for tokenizers, schedulers and the toolkit's own strict models."""
    try:
        cls = getattr(importlib.import_module(library), class_name, None)
    except ImportError:
        return None  # diffusers resolves (or reports) the name itself
    if not isinstance(cls, type) or issubclass(cls, (StrictIOMixin, MultiControlNetAdapter)):
        return None
    return cls if issubclass(cls, ModelMixin) or _is_transformers_model(cls) else None


def _is_transformers_model(cls: type) -> bool:
    from transformers import PreTrainedModel

    return issubclass(cls, PreTrainedModel)


def component_dtype(kwargs: dict, name: str) -> torch.dtype | None:
    """The dtype diffusers' ``DiffusionPipeline.from_pretrained`` gives component ``name``, from its keyword
    arguments ``kwargs``: ``dtype`` or its older name ``torch_dtype`` (whichever is not None), or its entry when it
    is a per-component dict (``{"transformer": torch.bfloat16, "default": torch.float16}``; float32 without a
    ``"default"``). Any other value is float32, as diffusers makes it (with its warning), so that every component
    gets the same dtype; None leaves each class's default."""
    dtype = kwargs.get("dtype")
    dtype = kwargs.get("torch_dtype") if dtype is None else dtype
    if isinstance(dtype, dict):
        dtype = dtype.get(name, dtype.get("default", torch.float32))
    if dtype is not None and not isinstance(dtype, torch.dtype):
        return torch.float32  # diffusers: "Passed `dtype` ... is not a `torch.dtype`. Defaulting to `torch.float32`."
    return dtype


def local_folder(pretrained_model_name_or_path, kwargs: dict) -> str:
    """A local folder for a pipeline path or hub id (downloaded into the cache as diffusers does)."""
    path = os.fspath(pretrained_model_name_or_path)
    if os.path.isdir(path):
        return path
    return DiffusionPipeline.download(path, **{key: kwargs[key] for key in DOWNLOAD_KWARGS if key in kwargs})


# ----- scheduler ------------------------------------------------------------------------------------------------
def has_scheduler(folder: str | os.PathLike) -> bool:
    """Whether the pipeline ``folder`` holds a scheduler: ``model_index.json`` names one and ``scheduler/`` has its
    config."""
    index = json.loads((Path(folder) / "model_index.json").read_text())
    spec = index.get("scheduler")
    named = isinstance(spec, (list, tuple)) and None not in spec
    return named and (Path(folder) / "scheduler" / "scheduler_config.json").is_file()


def allowed_prediction_types(scheduler) -> tuple[str, ...] | None:
    """The ``prediction_type`` values ``scheduler``'s class implements; None when it has no such notion (its config,
    which holds every argument of its class, has no ``prediction_type``)."""
    name = type(scheduler).__name__
    if name.startswith("FlowMatch"):  # velocities only; a prediction_type in its config is a stray value
        return FLOW_MATCH_PREDICTIONS
    if "prediction_type" not in (getattr(scheduler, "config", None) or {}):
        return None
    return NOISE_PREDICTIONS + (("flow_prediction",) if name in FLOW_PREDICTION_SCHEDULERS else ())


def check_scheduler(scheduler) -> None:
    """Raise a ValueError naming the value and the allowed ones when the scheduler's config records a
    ``prediction_type`` its class does not implement (diffusers would fail at the first step, or ignore it)."""
    config = getattr(scheduler, "config", None)
    value = None if config is None else config.get("prediction_type")
    allowed = allowed_prediction_types(scheduler)
    if value is None or allowed is None or value in allowed:
        return
    raise ValueError(
        f"The scheduler's prediction_type {value!r} is not one {type(scheduler).__name__} implements: use one of "
        f"{', '.join(repr(a) for a in allowed)} (what the transformer was trained to predict; in "
        "scheduler/scheduler_config.json for a pipeline folder)."
    )

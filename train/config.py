"""Training configuration: nested dataclasses loaded from YAML plus ``key=value`` overrides, validated on parse."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class ModelConfig:
    """The backbone: a toolkit class built from ``kwargs``, or a diffusers-format folder to start from."""

    cls: str = "PixArtTransformer"
    kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None
    inherit_from: str | None = None  # a PixArt folder whose weights `cls.from_pixart` inherits (LiT, KV compression)
    gradient_checkpointing: bool = False
    lora_rank: int | None = None  # train a LoRA (peft) on a frozen model instead of all weights
    lora_alpha: float | None = None  # None: lora_rank
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))


#: LoRA targets of PixArt-LCM-LoRA (attention, feed-forward, adaLN and embedding MLPs; not the patch conv).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_out", "linear", "linear_1",
                "linear_2")  # fmt: skip


@dataclass
class DataConfig:
    """Where samples come from. ``features``: safetensors shards written by ``dit extract`` (or tests)."""

    source: str = "features"
    path: str = ""
    batch_size: int = 8
    num_workers: int = 0
    caption_dropout: float = 0.1
    sample_posterior: bool = True  # latents = mean + std * noise (PixArt); false: the VAE posterior mean only
    # batches mix latent sizes, zero-padded at the bottom/right, with per-sample image_sizes and a padding loss mask
    # (a backbone that takes image_sizes: FiTTransformer); false: every batch holds one size bucket
    mixed_sizes: bool = False


@dataclass
class LCMConfig:
    """Latent consistency distillation (``objective.distill: lcm``); the teacher is ``objective.distill_teacher``.

    Guidance is in diffusers' convention, ``uncond + g * (cond - uncond)`` (LCM's ``w`` is ``g - 1``). Fixed mode
    (PixArt-δ): the teacher uses ``guidance_scale`` and the student samples without CFG. Embedded mode
    (latent-consistency-model): set ``guidance_range``; each sample draws ``g`` from it and the student, which needs
    ``time_cond_proj_dim`` in its config, sees ``g`` through a guidance embedding.
    """

    guidance_scale: float = 4.5
    guidance_range: tuple[float, float] | None = None
    num_ddim_timesteps: int = 50  # the solver's grid: skip = num_train_timesteps // num_ddim_timesteps
    timestep_scaling: float = 10.0  # boundary scalings use t * timestep_scaling (sigma_data = 0.5, as LCMScheduler)
    loss: str = "huber"  # or "l2"
    huber_c: float = 0.001
    target_ema: float | None = 0.95  # EMA target network; None: the student itself (LCM-LoRA)


@dataclass
class ObjectiveConfig:
    """The loss. ``ddpm_eps`` (with PixArt's learned-sigma VLB term when the model outputs it), ``v``, ``x0``
    (clean-sample prediction with the v-space loss), ``flow``."""

    name: str = "ddpm_eps"
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    min_snr_gamma: float | None = None
    noise_shift: float = 1.0  # discrete objectives: divide every timestep's SNR by noise_shift^2 (1: PixArt's betas)
    x0_weighting: str = "v"  # x0: "v" (|x0_hat - x0|^2 / sigma^2, the v-space loss) or "uniform" (|x0_hat - x0|^2)
    x0_sigma_floor: float = 0.05  # x0 with "v" weighting: sigma >= this in the division
    vlb_weight: float = 1.0
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    distill: str | None = None  # "hybrid" (LiT), "lcm" or another registered one; None: "hybrid" with a teacher
    distill_teacher: str | None = None  # a frozen PixArt teacher folder (transformer or pipeline)
    distill_eps_weight: float = 0.5  # weight of ||eps_teacher - eps_student||^2
    distill_var_weight: float = 0.05  # weight of ||Sigma_teacher - Sigma_student||^2 (learned-sigma channels)
    lcm: LCMConfig = field(default_factory=LCMConfig)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.03
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    use_8bit_adam: bool = False
    warmup_steps: int = 0
    schedule: str = "constant"
    grad_clip: float | None = 1.0


@dataclass
class ValidationConfig:
    """Sample ``prompts`` every ``every`` steps and at the run's last step, with a fixed seed (0 turns it off), with
    the tokenizer, text encoder and VAE of the pipeline folder ``pipeline`` (unset: the one the features were
    extracted with). No ``prompts``: a sample of the training captions that ``dit extract`` keeps beside the features
    (``validation_prompts.json``). Captioned PNG grids go to ``output_dir/validation`` (and TensorBoard)."""

    prompts: list[str] = field(default_factory=list)
    every: int = 0
    pipeline: str | None = None
    steps: int = 20
    guidance_scale: float = 4.5
    seed: int = 0
    height: int | None = None
    width: int | None = None


@dataclass
class ControlNetConfig:
    """ControlNet adapter training (PixArt-δ): the base model (``model.pretrained``) stays frozen and only the adapter
    trains; feature shards carry ``control_latent`` (the control image's VAE latent). Off unless ``num_blocks``,
    ``positions`` or ``pretrained`` is set. Checkpoints then hold the adapter folder (``model`` / ``model_ema``)."""

    num_blocks: int | None = None  # copy the base's first num_blocks blocks (PixArt-δ: 13)
    positions: list[int] | None = None  # or copy the blocks at these positions (a slim adapter); excludes num_blocks
    pretrained: str | None = None  # continue from an adapter folder instead of fresh copies
    conditioning_scale: float = 1.0

    @property
    def enabled(self) -> bool:
        return self.num_blocks is not None or self.positions is not None or self.pretrained is not None


@dataclass
class MaskingConfig:
    """Token masking (MicroDiT): each training sample keeps a random ``1 - ratio`` of its patch tokens and the loss
    averages over those only; the last ``unmasked_steps`` optimizer steps train unmasked (the paper's fine-tune).
    Off at ``ratio: 0``. Whether masking follows a patch-mixer (deferred) or precedes it (naive) is the model's
    ``deferred_masking``."""

    ratio: float = 0.0
    unmasked_steps: int = 0

    @property
    def enabled(self) -> bool:
        return self.ratio > 0


@dataclass
class TrainConfig:
    """Everything a run needs; saved as ``config.yaml`` beside every checkpoint."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    output_dir: str = "runs/default"
    seed: int = 0
    max_steps: int = 1000
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    ema_decay: float | None = 0.9999
    checkpoint_every: int = 500
    checkpoints_total_limit: int | None = 3
    resume: str | None = None
    # true: a non-empty output_dir's previous run (checkpoints, metrics, pipeline, ...) is deleted first; false: refused
    overwrite: bool = False
    log_every: int = 10
    # false: no output_dir/pipeline at the end (checkpoints only), so features need no record of their encoders;
    # for benchmarks that time steps on synthetic features. true: a complete pipeline folder, or refused at setup
    pipeline: bool = True
    report_to: str = "auto"  # auto: TensorBoard logs under output_dir/logs when tensorboard is installed; none
    # regional torch.compile of the backbone's repeated blocks (fullgraph: a graph break is an error)
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile backend ("inductor"; "aot_eager" compiles fast, for checks)
    controlnet: ControlNetConfig = field(default_factory=ControlNetConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)


class _Loader(yaml.SafeLoader):
    """YAML with 1.2 booleans: only true/false are booleans, so ``mixed_precision: no`` stays the string 'no'."""


_Loader.yaml_implicit_resolvers = {
    key: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:bool"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _load_yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


class ConfigError(ValueError):
    """A configuration key that does not exist or a value of the wrong type; the message names it."""


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a type annotation (and turn YAML lists into tuples), or raise ConfigError."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} is not of type {annotation}.")
    if origin is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}.")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}.")
        (item,) = typing.get_args(annotation)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}.")
        return dict(value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if annotation in (int, float, str, bool) and (type(value) is not annotation):
        raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r} ({type(value).__name__}).")
    return value


def from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass ``cls`` from a nested dict; unknown keys and wrong types are errors naming the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known keys are {', '.join(sorted(fields))}.")
    values = {}
    for name, value in data.items():
        hint, key = hints[name], f"{where}.{name}"
        values[name] = from_dict(hint, value, key) if dataclasses.is_dataclass(hint) else _coerce(value, hint, key)
    return cls(**values)


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to a nested dict."""
    if "=" not in override:
        raise ConfigError(f"Override {override!r} must look like key=value (e.g. optim.lr=1e-4).")
    key, raw = override.split("=", 1)
    *parents, leaf = key.strip().split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"Override {override!r}: {part!r} is not a section.")
    node[leaf] = _load_yaml(raw)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML config (or the defaults), apply overrides, validate, and return a :class:`TrainConfig`. A missing
    file or broken YAML is a :class:`ConfigError` naming the file (and the line and column)."""
    data = _read_yaml_file(Path(path)) if path is not None else {}
    data = data or {}
    for override in overrides:
        apply_override(data, override)
    return validate(from_dict(TrainConfig, data))


def _read_yaml_file(path: Path):
    try:
        return _load_yaml(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        reason = "no such file" if isinstance(error, FileNotFoundError) else " ".join(str(error).split())
        raise ConfigError(f"--config {path}: {reason}.") from error
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(error, "problem", None) or " ".join(str(error).split())
        raise ConfigError(f"{where}: not valid YAML ({problem}).") from error


@dataclass(frozen=True)
class Range:
    """The values a number may take: ``low``/``high`` bounds (None: unbounded), each closed unless ``*_open``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def admits(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{self.low:g}, {self.high:g}{right}"


AT_LEAST_1, NON_NEGATIVE, POSITIVE = Range(1), Range(0), Range(0, low_open=True)
FRACTION, DECAY = Range(0, 1), Range(0, 1, high_open=True)

#: Allowed ranges of numeric keys (null stays allowed where the type is optional); tuples are checked per element.
RANGES: dict[str, Range] = {
    "max_steps": AT_LEAST_1, "gradient_accumulation_steps": AT_LEAST_1, "checkpoint_every": AT_LEAST_1,
    "checkpoints_total_limit": AT_LEAST_1, "log_every": AT_LEAST_1, "ema_decay": DECAY,
    "data.batch_size": AT_LEAST_1, "data.num_workers": NON_NEGATIVE, "data.caption_dropout": FRACTION,
    "optim.lr": POSITIVE, "optim.weight_decay": NON_NEGATIVE, "optim.betas": DECAY, "optim.eps": POSITIVE,
    "optim.warmup_steps": NON_NEGATIVE, "optim.grad_clip": POSITIVE,
    "objective.num_train_timesteps": AT_LEAST_1, "objective.beta_start": Range(0, 1, True, True),
    "objective.beta_end": Range(0, 1, True, True), "objective.min_snr_gamma": POSITIVE,
    "objective.noise_shift": POSITIVE, "objective.x0_sigma_floor": POSITIVE, "objective.vlb_weight": NON_NEGATIVE,
    "objective.logit_normal_std": POSITIVE, "objective.distill_eps_weight": NON_NEGATIVE,
    "objective.distill_var_weight": NON_NEGATIVE, "objective.lcm.guidance_scale": NON_NEGATIVE,
    "objective.lcm.guidance_range": NON_NEGATIVE, "objective.lcm.num_ddim_timesteps": AT_LEAST_1,
    "objective.lcm.timestep_scaling": POSITIVE, "objective.lcm.huber_c": POSITIVE, "objective.lcm.target_ema": DECAY,
    "validation.every": NON_NEGATIVE, "validation.steps": AT_LEAST_1, "validation.guidance_scale": NON_NEGATIVE,
    "validation.height": AT_LEAST_1, "validation.width": AT_LEAST_1,
    "model.lora_rank": AT_LEAST_1, "model.lora_alpha": POSITIVE, "controlnet.num_blocks": AT_LEAST_1,
    "masking.ratio": DECAY, "masking.unmasked_steps": NON_NEGATIVE,
}  # fmt: skip

#: The built-in distillation objectives: ``objective.distill`` name -> the module that defines it, imported when a run
#: builds it (:func:`dit.train.objectives.distillation_class`), so that importing the trainer's parts (or ``dit train
#: --help``) needs none of them.
BUILTIN_DISTILLATIONS: dict[str, str] = {"hybrid": "dit.train.distillation", "lcm": "dit.train.consistency"}

#: ``objective.distill``'s values: None, the built-in distillations, and any a plug-in registers with
#: :func:`dit.train.objectives.register_distillation`.
DISTILL_CHOICES: list[str | None] = [None, *BUILTIN_DISTILLATIONS]

#: Allowed values of string keys.
CHOICES: dict[str, tuple | list] = {
    "optim.schedule": ("constant", "cosine"),
    "objective.x0_weighting": ("v", "uniform"),
    "objective.distill": DISTILL_CHOICES,
    "objective.lcm.loss": ("huber", "l2"),
    "mixed_precision": ("no", "fp16", "bf16", "fp8"),
    "report_to": ("auto", "tensorboard", "none"),
}


def _lookup(config: Any, key: str) -> Any:
    for part in key.split("."):
        config = getattr(config, part)
    return config


def validate(config: TrainConfig) -> TrainConfig:
    """Check every key of :data:`RANGES` and :data:`CHOICES` (and keys that exclude each other); returns ``config``
    or raises a ConfigError naming the key, the value and what is allowed."""
    for key, allowed in RANGES.items():
        value = _lookup(config, key)
        values = value if isinstance(value, tuple) else (value,)
        if value is not None and not all(allowed.admits(v) for v in values):
            raise ConfigError(f"config.{key}: {value!r} is out of range; it must be {allowed}.")
    for key, options in CHOICES.items():
        value = _lookup(config, key)
        if value not in options:
            listed = ", ".join(repr(o) for o in options)
            raise ConfigError(f"config.{key}: {value!r} is not one of {listed}.")
    if config.overwrite and config.resume:
        raise ConfigError(
            f"config.overwrite=true deletes the previous run that resume={config.resume!r} continues; set one."
        )
    return config


def to_yaml(config: TrainConfig) -> str:
    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value

    return yaml.safe_dump(plain(dataclasses.asdict(config)), sort_keys=False)

"""Training configuration: nested dataclasses loaded from YAML plus ``key=value`` overrides
(:mod:`dit.train.config_io`), validated on parse (:func:`validate`).

The ``objective`` section names a loss and, optionally, a distillation around it; each loss and each distillation
reads its own sub-section (``objective.discrete``, ``objective.x0``, ``objective.flow``, ``objective.lcm``, ...), and
:func:`validate_objective` checks the whole section in one place.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config_io import (
    AT_LEAST_1,
    DECAY,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    ConfigError,
    Range,
    apply_override,
    check_choices,
    check_ranges,
    from_dict,
    read_yaml_file,
)


@dataclass
class ModelConfig:
    """The backbone: a toolkit class built from ``kwargs``, or a diffusers-format folder to start from."""

    cls: str = "PixArtTransformer"
    kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None
    inherit_from: str | None = None  # a PixArt folder whose weights `cls.from_pixart` inherits (LiT, KV compression)
    # true: recompute each block in backward; selective: keep its matmul and attention outputs, recompute the rest
    gradient_checkpointing: bool | str = False
    # the softmax attention kernel: sdpa, math, xformers, sdpa_flex (masked keys skipped on the device: FiT's padded
    # mixed-size batches), or one of diffusers' backend names (flash, sage, ...)
    attention_backend: str = "sdpa"
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
class DiscreteConfig:
    """``objective.discrete``: the DDPM noise schedule of the discrete objectives (``ddpm_eps``, ``v``, ``x0``)."""

    beta_start: float = 0.0001
    beta_end: float = 0.02
    noise_shift: float = 1.0  # divide every timestep's SNR by noise_shift^2 (1: PixArt's linear betas)
    min_snr_gamma: float | None = None  # min-SNR loss weighting; None: off


@dataclass
class EpsilonConfig:
    """``objective.ddpm_eps``: ε-prediction, with PixArt's learned-sigma VLB term when the model outputs variance
    channels."""

    vlb_weight: float = 1.0


@dataclass
class SampleConfig:
    """``objective.x0``: clean-sample prediction's loss weighting."""

    weighting: str = "v"  # "v" (|x0_hat - x0|^2 / sigma^2, the v-space loss) or "uniform" (|x0_hat - x0|^2)
    sigma_floor: float = 0.05  # "v" weighting: sigma >= this in the division


@dataclass
class FlowConfig:
    """``objective.flow``: rectified flow's training times, t = sigmoid(N(logit_normal_mean, logit_normal_std^2))."""

    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0


@dataclass
class EDMConfig:
    """``objective.edm``: EDM (Karras et al. 2022), the network ``F`` preconditioned outside it (sigma_data ``sd``):
    ``D(x_t) = c_skip x_t + c_out F(c_in x_t, ln(sigma) / 4)``, trained at log-normal sigmas with EDM's weighting.

    The defaults are MicroDiT's (micro_diffusion's ``LatentDiffusion``): ``sigma_data`` 0.9 (VAE-scaled latents of
    about unit spread; EDM's paper uses 0.5 for pixels in [-1, 1]: set it to your data's standard deviation),
    ``ln(sigma) ~ N(-0.6, 1.2^2)``, and EDM's sampling range 0.002..80 with ``rho`` 7.
    """

    sigma_data: float = 0.9  # the data's standard deviation in the preconditioning (MicroDiT: 0.9)
    p_mean: float = -0.6  # training sigmas: ln(sigma) ~ N(p_mean, p_std^2), unclamped (MicroDiT: -0.6, 1.2)
    p_std: float = 1.2
    sigma_min: float = 0.002  # the samplers' Karras schedule: sigma_max -> sigma_min with exponent rho, then 0
    sigma_max: float = 80.0
    rho: float = 7.0
    sampler: str = "dpmsolver"  # diffusers' EDMDPMSolverMultistepScheduler ("dpmsolver") or EDMEulerScheduler


@dataclass
class HybridConfig:
    """``objective.hybrid``: LiT's hybrid distillation (``objective.distill: hybrid``) from ``objective.teacher``."""

    eps_weight: float = 0.5  # weight of ||eps_teacher - eps_student||^2
    var_weight: float = 0.05  # weight of ||Sigma_teacher - Sigma_student||^2 (learned-sigma channels)


@dataclass
class LCMConfig:
    """``objective.lcm``: latent consistency distillation (``objective.distill: lcm``) from ``objective.teacher``.

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
    """The loss ``name`` (``ddpm_eps``, ``v``, ``x0``, ``flow``, ``edm``), optionally distilled from a frozen
    ``teacher`` by the method ``distill`` (``hybrid``, ``lcm``; not ``lcm`` for ``edm``). Each loss and each method
    reads its own section (:data:`OBJECTIVE_SECTIONS`; a distillation's is named after it); :func:`validate_objective`
    checks them all."""

    name: str = "ddpm_eps"
    num_train_timesteps: int = 1000  # the discrete schedule's length, or flow's model-time scale (edm: unused)
    discrete: DiscreteConfig = field(default_factory=DiscreteConfig)
    ddpm_eps: EpsilonConfig = field(default_factory=EpsilonConfig)
    x0: SampleConfig = field(default_factory=SampleConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    edm: EDMConfig = field(default_factory=EDMConfig)
    distill: str | None = None  # a name of DISTILLATIONS; None: "hybrid" when a teacher is set, else no distillation
    teacher: str | None = None  # a distillation's frozen teacher: a transformer or pipeline folder of any backbone
    hybrid: HybridConfig = field(default_factory=HybridConfig)
    lcm: LCMConfig = field(default_factory=LCMConfig)

    @property
    def distillation(self) -> str | None:
        """The distillation the run trains: ``distill``, or ``hybrid`` when only a ``teacher`` is set."""
        return self.distill or ("hybrid" if self.teacher else None)


#: ``objective.name`` -> the sections of ``objective`` its loss reads (besides ``num_train_timesteps``).
OBJECTIVE_SECTIONS: dict[str, tuple[str, ...]] = {
    "ddpm_eps": ("discrete", "ddpm_eps"),
    "v": ("discrete",),
    "x0": ("discrete", "x0"),
    "flow": ("flow",),
    "edm": ("edm",),
}

#: The distillations, the one place their names live: ``objective.distill`` name -> ``module:Class``, imported when a
#: run builds it (:func:`dit.train.objectives.build.distillation_class`), so that the config and ``dit train --help``
#: import none of them. A method's settings are the ``objective`` section of its name (when it has any).
DISTILLATIONS: dict[str, str] = {
    "hybrid": "dit.train.objectives.distillation:HybridDistillation",
    "lcm": "dit.train.objectives.consistency:ConsistencyDistillation",
}

#: Keys of the flat ``objective`` section of older configs -> where each one is now.
MOVED_KEYS: dict[str, str] = {
    "objective.beta_start": "objective.discrete.beta_start",
    "objective.beta_end": "objective.discrete.beta_end",
    "objective.noise_shift": "objective.discrete.noise_shift",
    "objective.min_snr_gamma": "objective.discrete.min_snr_gamma",
    "objective.vlb_weight": "objective.ddpm_eps.vlb_weight",
    "objective.x0_weighting": "objective.x0.weighting",
    "objective.x0_sigma_floor": "objective.x0.sigma_floor",
    "objective.logit_normal_mean": "objective.flow.logit_normal_mean",
    "objective.logit_normal_std": "objective.flow.logit_normal_std",
    "objective.distill_teacher": "objective.teacher",
    "objective.distill_eps_weight": "objective.hybrid.eps_weight",
    "objective.distill_var_weight": "objective.hybrid.var_weight",
}


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
    # bf16: the model's trainable weights are bf16, cast once per step from fp32 masters that the optimizer steps (no
    # per-op autocast casts of the weights); needs mixed_precision=bf16. fp32: fp32 weights, autocast casts them
    mixed_precision_weights: str = "fp32"
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


#: Allowed ranges of numeric keys (null stays allowed where the type is optional); tuples are checked per element.
RANGES: dict[str, Range] = {
    "max_steps": AT_LEAST_1, "gradient_accumulation_steps": AT_LEAST_1, "checkpoint_every": AT_LEAST_1,
    "checkpoints_total_limit": AT_LEAST_1, "log_every": AT_LEAST_1, "ema_decay": DECAY,
    "data.batch_size": AT_LEAST_1, "data.num_workers": NON_NEGATIVE, "data.caption_dropout": FRACTION,
    "optim.lr": POSITIVE, "optim.weight_decay": NON_NEGATIVE, "optim.betas": DECAY, "optim.eps": POSITIVE,
    "optim.warmup_steps": NON_NEGATIVE, "optim.grad_clip": POSITIVE,
    "validation.every": NON_NEGATIVE, "validation.steps": AT_LEAST_1, "validation.guidance_scale": NON_NEGATIVE,
    "validation.height": AT_LEAST_1, "validation.width": AT_LEAST_1,
    "model.lora_rank": AT_LEAST_1, "model.lora_alpha": POSITIVE, "controlnet.num_blocks": AT_LEAST_1,
    "masking.ratio": DECAY, "masking.unmasked_steps": NON_NEGATIVE,
}  # fmt: skip

#: Allowed values of string keys (and of keys that take a boolean or a string).
CHOICES: dict[str, tuple] = {
    "model.gradient_checkpointing": (False, True, "selective"),
    "optim.schedule": ("constant", "cosine"),
    "mixed_precision": ("no", "fp16", "bf16", "fp8"),
    "mixed_precision_weights": ("fp32", "bf16"),
    "report_to": ("auto", "tensorboard", "none"),
}

#: The ranges of the ``objective`` section's keys, checked by :func:`validate_objective`.
OBJECTIVE_RANGES: dict[str, Range] = {
    "num_train_timesteps": AT_LEAST_1, "discrete.beta_start": Range(0, 1, True, True),
    "discrete.beta_end": Range(0, 1, True, True), "discrete.noise_shift": POSITIVE,
    "discrete.min_snr_gamma": POSITIVE, "ddpm_eps.vlb_weight": NON_NEGATIVE, "x0.sigma_floor": POSITIVE,
    "flow.logit_normal_std": POSITIVE, "hybrid.eps_weight": NON_NEGATIVE, "hybrid.var_weight": NON_NEGATIVE,
    "lcm.guidance_scale": NON_NEGATIVE, "lcm.guidance_range": Range(1), "lcm.num_ddim_timesteps": AT_LEAST_1,
    "lcm.timestep_scaling": POSITIVE, "lcm.huber_c": POSITIVE, "lcm.target_ema": DECAY,
    "edm.sigma_data": POSITIVE, "edm.p_mean": Range(-10, 10), "edm.p_std": POSITIVE, "edm.sigma_min": POSITIVE,
    "edm.sigma_max": POSITIVE, "edm.rho": POSITIVE,
}  # fmt: skip

#: The allowed values of the ``objective`` section's string keys (``distill``: :data:`DISTILLATIONS`).
OBJECTIVE_CHOICES: dict[str, tuple] = {
    "name": tuple(OBJECTIVE_SECTIONS),
    "x0.weighting": ("v", "uniform"),
    "lcm.loss": ("huber", "l2"),
    "edm.sampler": ("dpmsolver", "euler"),
}


def refuse_moved_keys(data: dict[str, Any]) -> None:
    """A key of :data:`MOVED_KEYS` in the raw config ``data`` is a ConfigError that names its new key."""
    for old, new in MOVED_KEYS.items():
        section, _, key = old.partition(".")
        if isinstance(data.get(section), dict) and key in data[section]:
            raise ConfigError(
                f"config.{old} is now {new} (each objective and distillation has its own section): write "
                f"{new}={data[section][key]!r} instead."
            )


def validate_objective(objective: ObjectiveConfig) -> ObjectiveConfig:
    """The one check of the ``objective`` section: known loss and distillation names, a teacher for a distillation,
    every key in its range or choices, and no setting in the section of a loss or method this run does not train
    (it would be ignored). Returns ``objective``, or raises a ConfigError naming the key and the fix."""
    check_choices(objective, OBJECTIVE_CHOICES, where="config.objective")
    check_ranges(objective, OBJECTIVE_RANGES, where="config.objective")
    method = objective.distillation
    if method is not None and method not in DISTILLATIONS:
        known = " or ".join(repr(name) for name in DISTILLATIONS)
        raise ConfigError(f"config.objective.distill: unknown distillation {method!r}; use {known} (or null).")
    if method is not None and not objective.teacher:
        raise ConfigError(f"config.objective.distill={method!r} needs objective.teacher (the teacher's folder).")
    _check_unused_sections(objective, {*OBJECTIVE_SECTIONS[objective.name], method})
    _check_lcm(objective)
    _check_edm(objective)
    return objective


def _check_edm(objective: ObjectiveConfig) -> None:
    """``objective.edm``'s sampling range, and the distillations an EDM model can have."""
    edm = objective.edm
    if edm.sigma_min >= edm.sigma_max:
        raise ConfigError(
            f"config.objective.edm.sigma_min={edm.sigma_min} must be below objective.edm.sigma_max={edm.sigma_max}."
        )
    if objective.name == "edm" and objective.distillation == "lcm":
        raise ConfigError(
            "config.objective.distill=lcm with objective.name=edm: latent consistency distillation has no EDM solver "
            "grid or boundary scalings; distil an EDM teacher with objective.distill=hybrid, or consistency-distil "
            "a ddpm_eps, v, x0 or flow model."
        )


def _check_lcm(objective: ObjectiveConfig) -> None:
    """``objective.lcm``'s keys that depend on each other, or on the loss."""
    lcm = objective.lcm
    low, high = lcm.guidance_range or (1.0, 1.0)
    if low > high:
        raise ConfigError(f"config.objective.lcm.guidance_range {[low, high]} must be [low, high] with low <= high.")
    steps = objective.num_train_timesteps
    if objective.name != "flow" and lcm.num_ddim_timesteps > steps:
        raise ConfigError(
            f"config.objective.lcm.num_ddim_timesteps={lcm.num_ddim_timesteps}: the solver grid of a discrete "
            f"schedule has at most objective.num_train_timesteps={steps} steps."
        )


def _check_unused_sections(objective: ObjectiveConfig, used: set[str | None]) -> None:
    """Every section of ``objective`` that the run's loss and distillation do not read keeps its defaults."""
    for section in dataclasses.fields(objective):
        value = getattr(objective, section.name)
        if section.name in used or not dataclasses.is_dataclass(value):
            continue
        default = section.default_factory()
        changed = [f.name for f in dataclasses.fields(value) if getattr(value, f.name) != getattr(default, f.name)]
        if changed:
            key = f"objective.{section.name}.{changed[0]}"
            raise ConfigError(
                f"config.{key}={getattr(value, changed[0])!r} is a setting of {_owner(section.name)}, which this "
                f"run does not train (objective.name={objective.name}, objective.distill={objective.distillation}); "
                f"remove it."
            )


def _owner(section: str) -> str:
    """Who reads the ``objective`` section ``section``, in words."""
    losses = [name for name, sections in OBJECTIVE_SECTIONS.items() if section in sections]
    return f"objective.name={' or '.join(losses)}" if losses else f"objective.distill={section}"


def validate(config: TrainConfig) -> TrainConfig:
    """Check every key of :data:`RANGES` and :data:`CHOICES`, the objective section (:func:`validate_objective`) and
    keys that exclude each other; returns ``config`` or raises a ConfigError naming the key, the value and what is
    allowed."""
    check_ranges(config, RANGES)
    check_choices(config, CHOICES)
    validate_objective(config.objective)
    if config.mixed_precision_weights == "bf16" and config.mixed_precision != "bf16":
        raise ConfigError(
            f"config.mixed_precision_weights=bf16 needs mixed_precision=bf16 (got {config.mixed_precision!r}): "
            "autocast still runs the activations' casts and fp32 ops; the weights are bf16 already."
        )
    _check_attention_backend(config.model.attention_backend)
    if config.overwrite and config.resume:
        raise ConfigError(
            f"config.overwrite=true deletes the previous run that resume={config.resume!r} continues; set one."
        )
    return config


def _check_attention_backend(name: str) -> None:
    from dit.nn.attention.backends import backend_problem

    problem = backend_problem(name)
    if problem is not None:
        raise ConfigError(f"config.model.attention_backend: {problem}")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML config (or the defaults), apply overrides, validate, and return a :class:`TrainConfig`. A missing
    file or broken YAML is a :class:`ConfigError` naming the file (and the line and column); a key that moved (see
    :data:`MOVED_KEYS`) one naming its new place."""
    data = (read_yaml_file(Path(path)) if path is not None else {}) or {}
    for override in overrides:
        apply_override(data, override)
    refuse_moved_keys(data)
    return validate(from_dict(TrainConfig, data))

"""The sampler a transformer was trained for, from what its config records: ``prediction_type`` (what the network
predicts) and, for the discrete schedule, ``noise_shift`` (the SNR shift it was trained with).

A pipeline given ``scheduler=None`` (a transformer on its own, a folder without ``scheduler/``) samples with
:func:`default_scheduler`; the trainer records both fields in every model it trains, so that the default is the
sampler its run saved (:meth:`dit.train.objectives.parametrisation.Parametrisation.sampling_scheduler`).

``prediction_type="edm"``: the network is EDM's ``F`` (Karras et al. 2022), preconditioned outside it; diffusers'
EDM schedulers (:data:`EDM_SCHEDULERS`) feed it ``c_in(sigma) x`` and ``c_noise = ln(sigma) / 4`` and take its output
with ``prediction_type="epsilon"``, whose ``c_out = sigma sd / sqrt(sigma^2 + sd^2)`` is EDM's.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DPMSolverMultistepScheduler, EDMDPMSolverMultistepScheduler, EDMEulerScheduler, SchedulerMixin

from ..models.capabilities import capability
from .resolution import flow_match_scheduler

#: PixArt's training schedule (linear betas over 1000 steps): what the discrete objectives train by default.
PIXART_SCHEDULE = {"beta_start": 0.0001, "beta_end": 0.02, "num_train_timesteps": 1000}
#: MicroDiT's EDM settings (micro_diffusion's ``LatentDiffusion``; EDM's sampling range and ``rho``): the EDM
#: objective's defaults (``objective.edm``), and the sampler of a transformer that records ``prediction_type="edm"``.
EDM_SETTINGS = {"sigma_data": 0.9, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}
#: diffusers' schedulers with EDM's preconditioning, by the name ``objective.edm.sampler`` gives them.
EDM_SCHEDULERS = {"dpmsolver": EDMDPMSolverMultistepScheduler, "euler": EDMEulerScheduler}
_EDM_NAMES = frozenset(cls.__name__ for cls in EDM_SCHEDULERS.values())


def shifted_betas(
    beta_start: float, beta_end: float, num_train_timesteps: int, noise_shift: float = 1.0
) -> torch.Tensor:
    """Linear betas (float64), with every timestep's SNR divided by ``noise_shift ** 2`` when it is not 1 (SD3's
    shift in SNR terms: more noise at every step)."""
    betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    if noise_shift == 1:
        return betas
    abar = torch.cumprod(1 - betas, dim=0)
    snr = abar / (1 - abar) / noise_shift**2
    shifted = snr / (1 + snr)  # (T,) the new alphas_cumprod
    return 1 - shifted / torch.cat([shifted.new_ones(1), shifted[:-1]])


def discrete_schedule(beta_start: float, beta_end: float, noise_shift: float = 1.0) -> dict:
    """The noise schedule as diffusers schedulers take it: linear betas, or ``trained_betas`` once shifted."""
    if noise_shift == 1:
        return dict(beta_start=beta_start, beta_end=beta_end, beta_schedule="linear")
    total = PIXART_SCHEDULE["num_train_timesteps"]
    return dict(trained_betas=shifted_betas(beta_start, beta_end, total, noise_shift).tolist())


def edm_scheduler(sampler: str = "dpmsolver", **settings: float) -> SchedulerMixin:
    """diffusers' EDM scheduler ``sampler`` (a key of :data:`EDM_SCHEDULERS`) for a network that outputs EDM's ``F``:
    ``prediction_type="epsilon"`` (whose ``c_out`` is EDM's), Karras sigmas from ``sigma_max`` to ``sigma_min`` with
    exponent ``rho``, then 0; ``settings`` (``sigma_data``, ``sigma_min``, ``sigma_max``, ``rho``) override
    :data:`EDM_SETTINGS`."""
    if sampler not in EDM_SCHEDULERS:
        raise ValueError(f"Unknown EDM sampler {sampler!r}; use one of {', '.join(map(repr, EDM_SCHEDULERS))}.")
    unknown = sorted(set(settings) - set(EDM_SETTINGS))
    if unknown:
        raise ValueError(f"Unknown EDM settings {unknown}; the settings are {', '.join(EDM_SETTINGS)}.")
    config = {**EDM_SETTINGS, **settings}
    return EDM_SCHEDULERS[sampler](prediction_type="epsilon", sigma_schedule="karras", **config)


def is_edm(scheduler: Any) -> bool:
    """Whether ``scheduler`` is one of diffusers' EDM schedulers (:data:`EDM_SCHEDULERS`)."""
    return type(scheduler).__name__ in _EDM_NAMES


def initial_noise_sigma(scheduler: Any) -> float:
    """The standard deviation of the initial noise, once ``set_timesteps`` has run: for an EDM scheduler, the first
    sigma of its schedule (EDM's ``x_0 ~ N(0, sigma_0^2)``, as MicroDiT's sampler starts; diffusers'
    ``init_noise_sigma`` is ``sqrt(sigma_max^2 + 1)`` there, 7.8e-5 relatively more at sigma_max 80); else the
    scheduler's ``init_noise_sigma`` (1 for flow matching, which has none)."""
    if is_edm(scheduler):
        return float(scheduler.sigmas[0])
    return getattr(scheduler, "init_noise_sigma", 1.0)


def prediction_of(scheduler: Any) -> str:
    """What a model sampled by ``scheduler`` predicts (:func:`scheduler_prediction` of its class and config)."""
    return scheduler_prediction(type(scheduler).__name__, scheduler.config)


def scheduler_prediction(class_name: str, config: Any) -> str:
    """What a model sampled by the scheduler class ``class_name`` with ``config`` (a ``scheduler_config.json``'s
    ``_class_name`` and fields) predicts: ``flow`` for a flow-matching scheduler, ``edm`` (EDM's ``F``) for an EDM
    scheduler with ``prediction_type="epsilon"`` (``edm_v_prediction`` for its v-type sign), else its
    ``prediction_type`` (``epsilon`` when it records none)."""
    if "FlowMatch" in class_name:
        return "flow"
    prediction = config.get("prediction_type") or "epsilon"
    if class_name in _EDM_NAMES:
        return "edm" if prediction == "epsilon" else f"edm_{prediction}"
    return prediction


def default_scheduler(transformer) -> Any:
    """The scheduler for ``transformer`` as its config records it: ``prediction_type="flow"`` gets diffusers'
    ``FlowMatchEulerDiscreteScheduler`` with the resolution-dependent shift anchored at its training token count
    (:func:`~dit.pipelines.resolution.flow_match_scheduler`); ``epsilon``, ``v_prediction`` or ``sample`` get
    PixArt's ``DPMSolverMultistepScheduler`` for that prediction on PixArt's schedule (shifted by the recorded
    ``noise_shift``); unknown (None, a transformer from elsewhere) gets PixArt's ``DPMSolverMultistepScheduler()``
    (ε prediction; a learned-sigma output, ``out_channels = 2 x in_channels``, is split by the pipeline); ``edm``
    gets diffusers' ``EDMDPMSolverMultistepScheduler`` with :data:`EDM_SETTINGS` (MicroDiT's sigma_data 0.9: a model
    trained with another ``objective.edm.sigma_data`` samples right from its run's pipeline folder, whose scheduler
    records it)."""
    prediction = capability(transformer, "prediction_type")
    if prediction == "flow":
        return flow_match_scheduler(train_tokens(transformer))
    if prediction == "edm":
        return edm_scheduler()
    if prediction is None:
        return DPMSolverMultistepScheduler()
    shift = getattr(transformer, "config", {}).get("noise_shift") or 1.0
    schedule = discrete_schedule(PIXART_SCHEDULE["beta_start"], PIXART_SCHEDULE["beta_end"], shift)
    return DPMSolverMultistepScheduler(prediction_type=prediction, **schedule)


def train_tokens(transformer) -> int:
    """Image tokens per image at the transformer's training size: its own ``train_tokens`` (FiT), else its
    ``sample_size`` in patches."""
    tokens = getattr(transformer, "train_tokens", None)
    if tokens is not None:
        return tokens
    config = transformer.config
    return (config.sample_size // config.patch_size) ** 2

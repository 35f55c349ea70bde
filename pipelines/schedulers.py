"""The sampler a transformer was trained for, from what its config records: ``prediction_type`` (what the network
predicts) and, for the discrete schedule, ``noise_shift`` (the SNR shift it was trained with).

A pipeline given ``scheduler=None`` (a transformer on its own, a folder without ``scheduler/``) samples with
:func:`default_scheduler`; the trainer records both fields in every model it trains, so that the default is the
sampler its run saved (:meth:`dit.train.objectives.parametrisation.Parametrisation.sampling_scheduler`).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DPMSolverMultistepScheduler

from ..models.capabilities import capability
from .resolution import flow_match_scheduler

#: PixArt's training schedule (linear betas over 1000 steps): what the discrete objectives train by default.
PIXART_SCHEDULE = {"beta_start": 0.0001, "beta_end": 0.02, "num_train_timesteps": 1000}


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


def prediction_of(scheduler: Any) -> str:
    """What a model sampled by ``scheduler`` predicts: ``flow`` for a flow-matching scheduler, else its
    ``prediction_type`` (``epsilon`` when it records none)."""
    if "FlowMatch" in type(scheduler).__name__:
        return "flow"
    return scheduler.config.get("prediction_type") or "epsilon"


def default_scheduler(transformer) -> Any:
    """The scheduler for ``transformer`` as its config records it: ``prediction_type="flow"`` gets diffusers'
    ``FlowMatchEulerDiscreteScheduler`` with the resolution-dependent shift anchored at its training token count
    (:func:`~dit.pipelines.resolution.flow_match_scheduler`); ``epsilon``, ``v_prediction`` or ``sample`` get
    PixArt's ``DPMSolverMultistepScheduler`` for that prediction on PixArt's schedule (shifted by the recorded
    ``noise_shift``); unknown (None, a transformer from elsewhere) gets PixArt's ``DPMSolverMultistepScheduler()``
    (ε prediction; a learned-sigma output, ``out_channels = 2 x in_channels``, is split by the pipeline)."""
    prediction = capability(transformer, "prediction_type")
    if prediction == "flow":
        return flow_match_scheduler(train_tokens(transformer))
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

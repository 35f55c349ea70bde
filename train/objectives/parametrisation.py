"""Parametrisations: how a clean sample and noise make the noisy sample at time ``t``, what a model's prediction
stands for, which times training draws, and the diffusers schedulers that sample (or consistency-sample) a model
trained that way.

A loss (:mod:`dit.train.objectives.losses`) holds one of these; distillation
(:mod:`~dit.train.objectives.distillation`, :mod:`~dit.train.objectives.consistency`) uses nothing else of the
objective it wraps, so ε-, v-, x0- and flow-trained models distil alike. Times ``t`` are in the parametrisation's own units (integer steps for the discrete schedule, sigma in
[0, 1] for flow, EDM's sigma); :meth:`Parametrisation.model_time` is what the model is fed, and
:meth:`Parametrisation.model_input` the noisy sample as the model takes it (EDM scales it by ``c_in``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchLCMScheduler,
    LCMScheduler,
    SchedulerMixin,
)

from dit.pipelines.schedulers import edm_scheduler, shifted_betas

from ..config import ObjectiveConfig

#: sigma_data of the consistency boundary scalings (fixed at 0.5 in diffusers' LCMScheduler).
SIGMA_DATA = 0.5


def broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) in ``like``'s dtype and device."""
    return values.to(like.device, like.dtype).view((-1,) + (1,) * (like.ndim - 1))


class Parametrisation:
    """Base class: the forward process, the meaning of a prediction, the training times and the samplers.

    Args:
        config: the ``objective`` section (schedule length, betas, shift, logit-normal times).
    """

    #: what the model predicts, in diffusers' words (``flow``: a rectified-flow velocity)
    prediction_type: str = ""

    def __init__(self, config: ObjectiveConfig):
        self.config = config

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors kept for the steps (the noise schedule), by attribute name."""
        return ((name, value) for name, value in vars(self).items() if isinstance(value, torch.Tensor))

    def to(self, device: torch.device | str) -> Parametrisation:
        """Move the kept tensors to ``device`` once, so that no training step copies them from the host."""
        for name, value in list(self.named_tensors()):
            setattr(self, name, value.to(device))
        return self

    def timesteps(self, uniform: torch.Tensor) -> torch.Tensor:
        """Training times (B,) from one uniform draw per sample."""
        raise NotImplementedError

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noisy sample at ``t`` for clean sample ``x0`` and noise ``eps`` (a DDIM step when ``eps`` is a model's
        estimate)."""
        raise NotImplementedError

    def x0_and_eps(
        self, pred: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The clean-sample and noise estimates that a model's prediction at ``(noisy, t)`` implies."""
        raise NotImplementedError

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """What the model is fed as ``timestep`` for time ``t``."""
        return t

    def model_input(self, noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model is fed as ``hidden_states`` for the noisy sample at time ``t`` (the sample itself)."""
        return noisy

    def solver_grid(self, num_steps: int) -> torch.Tensor:
        """``num_steps`` ascending times, evenly spaced, ending at the noisiest (a DDIM solver's grid)."""
        raise NotImplementedError

    def consistency_scalings(self, t: torch.Tensor, timestep_scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(c_skip, c_out)`` of a consistency model ``c_skip * x_t + c_out * x0`` (c_skip = 1 at t = 0)."""
        raise NotImplementedError

    def sampling_scheduler(self) -> SchedulerMixin:
        """A diffusers scheduler that samples from a model trained with this parametrisation."""
        raise NotImplementedError

    def model_record(self) -> dict:
        """What a model trained this way records in its config, so that a pipeline given ``scheduler=None`` samples
        it with :meth:`sampling_scheduler` (:func:`dit.pipelines.schedulers.default_scheduler`)."""
        return {"prediction_type": self.prediction_type, "noise_shift": None}

    def consistency_scheduler(self, num_steps: int, timestep_scaling: float) -> SchedulerMixin:
        """diffusers' few-step scheduler for a consistency model distilled on ``solver_grid(num_steps)``."""
        raise NotImplementedError


def discrete_betas(config: ObjectiveConfig) -> torch.Tensor:
    """PixArt's linear betas, with every timestep's SNR divided by ``noise_shift ** 2`` when it is not 1 (SD3's
    shift in SNR terms: more noise at every step, for inputs whose tokens average many values)."""
    schedule = config.discrete
    return shifted_betas(schedule.beta_start, schedule.beta_end, config.num_train_timesteps, schedule.noise_shift)


class DiscreteParametrisation(Parametrisation):
    """The DDPM forward process with PixArt's linear betas over ``num_train_timesteps`` steps (optionally shifted):
    ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``. Subclasses say what the prediction is (ε, v or x0)."""

    def __init__(self, config: ObjectiveConfig):
        super().__init__(config)
        self.betas = discrete_betas(config)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)

    def schedule_kwargs(self) -> dict:
        """The noise schedule as diffusers schedulers take it (``trained_betas`` once shifted)."""
        cfg = self.config.discrete
        if cfg.noise_shift == 1:
            return dict(beta_start=cfg.beta_start, beta_end=cfg.beta_end, beta_schedule="linear")
        return dict(trained_betas=self.betas.tolist())

    def timesteps(self, uniform: torch.Tensor) -> torch.Tensor:
        return (uniform * self.config.num_train_timesteps).long().clamp_(max=self.config.num_train_timesteps - 1)

    def model_record(self) -> dict:
        shift = self.config.discrete.noise_shift
        return {"prediction_type": self.prediction_type, "noise_shift": None if shift == 1 else float(shift)}

    def coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sqrt(abar_t), sqrt(1 - abar_t))`` broadcast to ``like``'s shape, in its dtype."""
        abar = self.alphas_cumprod.to(like.device)[t]  # (B,)
        shape = (-1,) + (1,) * (like.ndim - 1)
        return abar.sqrt().to(like.dtype).view(shape), (1 - abar).sqrt().to(like.dtype).view(shape)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ``abar / (1 - abar)`` at integer times ``t``, fp32."""
        abar = self.alphas_cumprod.to(t.device)[t]
        return (abar / (1 - abar)).float()

    def add_noise(self, x0, eps, t):
        a, s = self.coefficients(t, x0)
        return a * x0 + s * eps

    def solver_grid(self, num_steps: int) -> torch.Tensor:
        total = self.config.num_train_timesteps
        if not 0 < num_steps <= total:
            raise ValueError(f"The solver grid needs 1..{total} steps, got {num_steps}.")
        return torch.arange(1, num_steps + 1) * (total // num_steps) - 1  # e.g. 19, 39, ..., 999

    def consistency_scalings(self, t, timestep_scaling):
        scaled = t.double() * timestep_scaling
        c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
        c_out = scaled / (scaled**2 + SIGMA_DATA**2).sqrt()
        return c_skip.float(), c_out.float()

    def sampling_scheduler(self) -> DPMSolverMultistepScheduler:
        return DPMSolverMultistepScheduler(
            num_train_timesteps=self.config.num_train_timesteps, prediction_type=self.prediction_type,
            **self.schedule_kwargs(),
        )  # fmt: skip

    def consistency_scheduler(self, num_steps: int, timestep_scaling: float) -> LCMScheduler:
        return LCMScheduler(
            num_train_timesteps=self.config.num_train_timesteps, prediction_type=self.prediction_type,
            original_inference_steps=num_steps, timestep_scaling=timestep_scaling, clip_sample=False,
            **self.schedule_kwargs(),
        )  # fmt: skip


class EpsilonParametrisation(DiscreteParametrisation):
    """The model predicts the noise ε."""

    prediction_type = "epsilon"

    def x0_and_eps(self, pred, noisy, t):
        a, s = self.coefficients(t, noisy)
        return (noisy - s * pred) / a, pred


class VParametrisation(DiscreteParametrisation):
    """The model predicts ``v = sqrt(abar) eps - sqrt(1 - abar) x0``."""

    prediction_type = "v_prediction"

    def x0_and_eps(self, pred, noisy, t):
        a, s = self.coefficients(t, noisy)
        return a * noisy - s * pred, s * noisy + a * pred


class SampleParametrisation(DiscreteParametrisation):
    """The model predicts the clean sample x0."""

    prediction_type = "sample"

    def x0_and_eps(self, pred, noisy, t):
        a, s = self.coefficients(t, noisy)
        return pred, (noisy - a * pred) / s


class FlowParametrisation(Parametrisation):
    """Rectified flow (SD3 / FiTv2): ``x_t = (1 - t) x0 + t eps``, the model predicts the velocity ``eps - x0``.

    Training times are logit-normal, ``sigmoid(mean + std * z)`` with ``z`` the normal quantile of the uniform draw;
    the model sees ``t * num_train_timesteps``, as diffusers' ``FlowMatchEulerDiscreteScheduler`` feeds it.
    """

    prediction_type = "flow"

    def timesteps(self, uniform: torch.Tensor) -> torch.Tensor:
        z = torch.special.ndtri(uniform.double().clamp(1e-6, 1 - 1e-6))
        return torch.sigmoid(self.config.flow.logit_normal_mean + self.config.flow.logit_normal_std * z).float()

    def add_noise(self, x0, eps, t):
        sigma = broadcast(t, x0)
        return (1 - sigma) * x0 + sigma * eps

    def x0_and_eps(self, pred, noisy, t):
        sigma = broadcast(t, noisy)
        return noisy - sigma * pred, noisy + (1 - sigma) * pred

    def model_time(self, t):
        return t * self.config.num_train_timesteps

    def solver_grid(self, num_steps: int) -> torch.Tensor:
        if num_steps < 1:
            raise ValueError(f"The solver grid needs at least 1 step, got {num_steps}.")
        return torch.arange(1, num_steps + 1, dtype=torch.float64).div(num_steps).float()  # 1/N, ..., 1

    def consistency_scalings(self, t, timestep_scaling):
        # x0 = x_t - sigma * v already equals x_t at sigma = 0: FlowMatchLCMScheduler's parametrisation
        return torch.zeros_like(t, dtype=torch.float32), torch.ones_like(t, dtype=torch.float32)

    def sampling_scheduler(self) -> FlowMatchEulerDiscreteScheduler:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.config.num_train_timesteps)

    def consistency_scheduler(self, num_steps: int, timestep_scaling: float) -> FlowMatchLCMScheduler:
        return FlowMatchLCMScheduler(num_train_timesteps=self.config.num_train_timesteps)


class EDMParametrisation(Parametrisation):
    """EDM (Karras et al. 2022) as MicroDiT trains it: ``x_t = x0 + sigma eps``, and a network ``F`` preconditioned
    outside it (``objective.edm``, sigma_data ``sd``): fed ``c_in x_t`` and ``c_noise = ln(sigma) / 4``, it stands for
    the denoised sample ``D = c_skip x_t + c_out F``, with

    - ``c_skip = sd^2 / (sigma^2 + sd^2)``, ``c_out = sigma sd / sqrt(sigma^2 + sd^2)``,
      ``c_in = 1 / sqrt(sigma^2 + sd^2)``.

    Times ``t`` are sigmas; training draws ``ln(sigma) ~ N(p_mean, p_std^2)`` (unclamped, as MicroDiT's
    ``edm_loss``). diffusers' EDM schedulers sample it with ``prediction_type="epsilon"``: their ``c_out`` for it is
    this one, so ``F`` is what they take (:func:`~dit.pipelines.schedulers.edm_scheduler`).
    """

    prediction_type = "edm"

    def timesteps(self, uniform: torch.Tensor) -> torch.Tensor:
        """Log-normal sigmas (B,), float32: ``exp(p_mean + p_std z)`` with ``z`` the normal quantile of ``uniform``."""
        edm = self.config.edm
        z = torch.special.ndtri(uniform.double().clamp(1e-6, 1 - 1e-6))
        return torch.exp(edm.p_mean + edm.p_std * z).float()

    def scalings(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(c_skip, c_out, c_in)`` at sigmas ``t`` (B,), float32, shaped (B, 1, ..., 1) to broadcast on ``like``."""
        sd = self.config.edm.sigma_data
        sigma = t.float().to(like.device).view((-1,) + (1,) * (like.ndim - 1))  # (B, 1, 1, 1)
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        return c_skip, c_out, c_in

    def add_noise(self, x0, eps, t):
        return x0 + broadcast(t, x0) * eps

    def model_input(self, noisy, t):
        _, _, c_in = self.scalings(t, noisy)
        return (c_in * noisy.float()).to(noisy.dtype)

    def model_time(self, t):
        return t.float().log() / 4  # EDM's c_noise

    def denoised(self, pred: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """EDM's ``D = c_skip x_t + c_out F`` for the network output ``pred`` (F) at ``(noisy, t)``, float32."""
        c_skip, c_out, _ = self.scalings(t, noisy)
        return c_skip * noisy.float() + c_out * pred.float()

    def x0_and_eps(self, pred, noisy, t):
        x0 = self.denoised(pred, noisy, t)
        return x0, (noisy.float() - x0) / broadcast(t.float(), x0)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """EDM's ``lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 = 1 / c_out^2`` (B,), float32: weighting the
        denoised error by it is the plain squared error of ``F`` against ``(x0 - c_skip x_t) / c_out``."""
        sd, sigma = self.config.edm.sigma_data, t.float()
        return (sigma**2 + sd**2) / (sigma * sd) ** 2

    def sampling_scheduler(self) -> SchedulerMixin:
        edm = self.config.edm
        return edm_scheduler(
            edm.sampler, sigma_data=edm.sigma_data, sigma_min=edm.sigma_min, sigma_max=edm.sigma_max, rho=edm.rho
        )


#: Each parametrisation by the ``prediction_type`` it trains.
PARAMETRISATIONS: dict[str, type[Parametrisation]] = {
    cls.prediction_type: cls
    for cls in (
        EpsilonParametrisation, VParametrisation, SampleParametrisation, FlowParametrisation, EDMParametrisation,
    )
}  # fmt: skip

"""Training losses: small classes that turn (clean latents, noise, a uniform draw per sample) into a loss, each
holding the :class:`~dit.train.objectives.parametrisation.Parametrisation` it trains (ε, v, x0, flow or EDM).

The loop owns all randomness (per-sample generators), so an objective is a pure function of its inputs: the
same sample gets the same noise and timestep whichever process or batch position it lands in. Distillation
objectives wrap one of these (:mod:`~dit.train.objectives.distillation`, :mod:`~dit.train.objectives.consistency`);
:func:`~dit.train.objectives.build.build_objective` builds either from the ``objective`` section, which
:func:`~dit.train.config.validate_objective` has checked (the classes here trust it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import ClassVar

import torch
from diffusers import SchedulerMixin

from ..config import ObjectiveConfig
from .parametrisation import (
    EDMParametrisation,
    EpsilonParametrisation,
    FlowParametrisation,
    Parametrisation,
    SampleParametrisation,
    VParametrisation,
)

ModelFn = Callable[..., torch.Tensor]  # (noisy latents, timesteps, *, uncond=False, guidance=None) -> prediction
#: (network, noisy latents, timesteps, *, uncond=False, guidance=None) -> prediction, with the step's conditions
NetworkCall = Callable[..., torch.Tensor]


def mean_per_sample(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over every dimension but the batch: (B, ...) -> (B,); with ``mask`` (B, 1, H, W) of 0/1 over
    (B, C, H, W) values, the mean over the masked-in positions only (token masking, padding)."""
    if mask is None:
        return x.flatten(1).mean(dim=1)
    mask = mask.to(x.dtype)
    return (x * mask).flatten(1).sum(dim=1) / (mask.flatten(1).sum(dim=1) * x.shape[1]).clamp(min=1)


class Objective:
    """Base class. ``loss`` returns per-sample losses (B,) and a dict of extra per-sample terms to log.

    ``loss_mask`` (B, 1, H, W), when given, restricts every term to the latent positions where it is 1 (the kept
    patches of a masked step, the valid region of a padded sample). The parametrisation (noising, predictions,
    samplers) is ``objective.parametrisation``.

    Args:
        config: the ``objective`` section.
        parametrisation: the one to train (default: a new ``parametrisation_class(config)``).
    """

    parametrisation_class: ClassVar[type[Parametrisation]] = Parametrisation

    def __init__(self, config: ObjectiveConfig, parametrisation: Parametrisation | None = None):
        self.config = config
        self.parametrisation = parametrisation or self.parametrisation_class(config)

    def timesteps(self, uniform: torch.Tensor) -> torch.Tensor:
        """The training times of per-sample ``uniform`` draws (B,): the parametrisation's (a distillation may draw
        from a grid of its own)."""
        return self.parametrisation.timesteps(uniform)

    def sampling_scheduler(self) -> SchedulerMixin:
        """A diffusers scheduler that samples from a model trained with this objective (validation, pipelines)."""
        return self.parametrisation.sampling_scheduler()

    def sampling_defaults(self) -> tuple[int, float] | None:
        """(steps, guidance scale) a trained model samples with; None: the validation settings'."""
        return None

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor the objective keeps for its steps (its parametrisation's and a wrapped objective's too)."""
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                yield name, value
            elif isinstance(value, (Objective, Parametrisation)):
                yield from ((f"{name}.{sub}", tensor) for sub, tensor in value.named_tensors())

    def to(self, device: torch.device | str) -> Objective:
        """Move the objective's tensors (noise schedule, solver grid; those of a wrapped objective too) to
        ``device`` once, so that no training step copies them from the host."""
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
            elif isinstance(value, (Objective, Parametrisation)):
                value.to(device)
        return self

    def networks(self, call: NetworkCall, draws: dict[str, torch.Tensor]) -> dict:
        """What ``loss`` takes besides the student for one step (a distillation's teacher and target); none here."""
        return {}

    def step_loss(
        self,
        student: ModelFn,
        call: NetworkCall,
        latents: torch.Tensor,
        draws: dict[str, torch.Tensor],
        loss_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One training step's loss: ``student`` (the trained model with the step's conditions and features),
        ``call`` (any other network with the step's conditions), the step's per-sample ``draws``."""
        masked = {} if loss_mask is None else {"loss_mask": loss_mask}
        return self.loss(student, latents, draws["noise"], draws["uniform"], **masked, **self.networks(call, draws))

    def loss(
        self,
        model_fn: ModelFn,
        latents: torch.Tensor,
        noise: torch.Tensor,
        uniform: torch.Tensor,
        loss_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


class _DiscreteLoss(Objective):
    """A loss on the DDPM schedule (``objective.discrete``), with min-SNR weighting (``discrete.min_snr_gamma``)."""

    def _min_snr_weight(self, t: torch.Tensor, v_prediction: bool) -> torch.Tensor | None:
        gamma = self.config.discrete.min_snr_gamma
        if gamma is None:
            return None
        snr = self.parametrisation.snr(t)
        return torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + 1 if v_prediction else snr)


class DDPMEpsilon(_DiscreteLoss):
    """ε-prediction MSE; when the model also outputs variance channels, PixArt's learned-sigma VLB term."""

    parametrisation_class = EpsilonParametrisation

    def loss(self, model_fn, latents, noise, uniform, loss_mask=None):
        p = self.parametrisation
        t = p.timesteps(uniform)
        noisy = p.add_noise(latents, noise, t)
        pred = model_fn(noisy, t)
        channels = latents.shape[1]
        eps = pred[:, :channels]
        mse = mean_per_sample((eps.float() - noise.float()) ** 2, loss_mask)
        weight = self._min_snr_weight(t, v_prediction=False)
        loss = mse if weight is None else mse * weight
        extra = {"mse": mse}
        if pred.shape[1] == 2 * channels:
            vlb = self._vlb(latents, noisy, t, eps.detach(), pred[:, channels:], loss_mask)
            loss = loss + self.config.ddpm_eps.vlb_weight * vlb
            extra["vlb"] = vlb
        return loss, extra

    def _posterior(self, t: torch.Tensor, like: torch.Tensor):
        """Coefficients of q(x_{t-1} | x_t, x_0): mean = c0 * x0 + ct * xt, clipped log-variance."""
        abar = self.parametrisation.alphas_cumprod.to(like.device)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        betas = self.parametrisation.betas.to(like.device)
        variance = betas * (1 - abar_prev) / (1 - abar)
        log_variance = torch.log(torch.cat([variance[1:2], variance[1:]]))
        c0 = betas * abar_prev.sqrt() / (1 - abar)
        ct = (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar)
        shape = (-1,) + (1,) * (like.ndim - 1)
        return [v[t].float().view(shape) for v in (c0, ct, log_variance, torch.log(betas))]

    def _vlb(self, x0, xt, t, eps, var_channels, loss_mask=None) -> torch.Tensor:
        """KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) in bits per dimension; the decoder NLL at t = 0 (IDDPM)."""
        c0, ct, true_log_var, max_log = self._posterior(t, x0)
        abar = self.parametrisation.alphas_cumprod.to(x0.device)[t].float().view(c0.shape)
        x0, xt, eps = x0.float(), xt.float(), eps.float()
        true_mean = c0 * x0 + ct * xt
        pred_x0 = (xt - (1 - abar).sqrt() * eps) / abar.sqrt()
        model_mean = c0 * pred_x0 + ct * xt
        frac = (var_channels.float() + 1) / 2
        model_log_var = frac * max_log + (1 - frac) * true_log_var
        kl = 0.5 * (
            -1.0 + model_log_var - true_log_var + torch.exp(true_log_var - model_log_var)
            + (true_mean - model_mean) ** 2 * torch.exp(-model_log_var)
        )  # fmt: skip
        kl = mean_per_sample(kl, loss_mask) / math.log(2.0)
        log_likelihood = _discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)
        nll = -mean_per_sample(log_likelihood, loss_mask) / math.log(2.0)
        return torch.where(t == 0, nll, kl)


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _discretized_gaussian_log_likelihood(x, means, log_scales) -> torch.Tensor:
    """Log-likelihood of x in [-1, 1] under a Gaussian discretised to 8-bit bins (IDDPM's decoder term)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


class VPrediction(_DiscreteLoss):
    """v-prediction: target ``sqrt(abar) * noise - sqrt(1 - abar) * x0``.

    Unlike ε-prediction, a model's error does not get amplified by sigma/alpha (~150 at PixArt's last step) when the
    sampler turns it into a clean-sample estimate, which matters for small models whose tokens are as wide as their
    patches (they cannot carry the noise through exactly).
    """

    parametrisation_class = VParametrisation

    def loss(self, model_fn, latents, noise, uniform, loss_mask=None):
        p = self.parametrisation
        t = p.timesteps(uniform)
        a, s = p.coefficients(t, latents)
        pred = model_fn(p.add_noise(latents, noise, t), t)[:, : latents.shape[1]]
        target = a * noise - s * latents
        mse = mean_per_sample((pred.float() - target.float()) ** 2, loss_mask)
        weight = self._min_snr_weight(t, v_prediction=True)
        return (mse if weight is None else mse * weight), {"mse": mse}


class SamplePrediction(_DiscreteLoss):
    """Clean-sample (x0) prediction. A clean image lies on a low-dimensional set while noise does not, so a model
    whose tokens are about as wide as their patches (8 latent channels x 4x4 = 128 values per 128-wide token) can
    output x0 exactly where it cannot carry the noise through. Sampled by DPM-Solver with ``prediction_type="sample"``.

    ``objective.x0.weighting``: ``v`` (JiT's x-prediction with the v-loss: ``|x0_hat - x0|^2 / sigma_t^2``, sigma
    floored at ``x0.sigma_floor``, which weights the low-noise steps) or ``uniform`` (plain ``|x0_hat - x0|^2``, which
    weights the noisy steps where layout and shape are decided; it learned MicroShapes prompts faster).
    """

    parametrisation_class = SampleParametrisation

    def loss(self, model_fn, latents, noise, uniform, loss_mask=None):
        p = self.parametrisation
        t = p.timesteps(uniform)
        pred = model_fn(p.add_noise(latents, noise, t), t)[:, : latents.shape[1]]
        mse = mean_per_sample((pred.float() - latents.float()) ** 2, loss_mask)
        if self.config.x0.weighting == "uniform":
            return mse, {"mse": mse}
        _, s = p.coefficients(t, latents)
        sigma = s.reshape(-1).float().clamp(min=self.config.x0.sigma_floor)  # (B,)
        loss = mse / sigma**2  # the v-space loss
        weight = self._min_snr_weight(t, v_prediction=True)
        return (loss if weight is None else loss * weight), {"mse": mse}


class RectifiedFlow(Objective):
    """Rectified flow (SD3 / FiTv2): velocity target ``noise - x0`` at logit-normal times (see
    :class:`~dit.train.objectives.parametrisation.FlowParametrisation`)."""

    parametrisation_class = FlowParametrisation

    def loss(self, model_fn, latents, noise, uniform, loss_mask=None):
        p = self.parametrisation
        t = p.timesteps(uniform).to(latents.device)
        pred = model_fn(p.add_noise(latents, noise, t), p.model_time(t))
        mse = mean_per_sample((pred[:, : latents.shape[1]].float() - (noise - latents).float()) ** 2, loss_mask)
        return mse, {"mse": mse}


class EDMDenoising(Objective):
    """EDM's loss, as MicroDiT's ``edm_loss``: ``lambda(sigma) |D(x_t) - x0|^2`` with ``D = c_skip x_t + c_out F`` the
    preconditioned network (fed ``c_in x_t`` and ``c_noise``) and ``lambda = (sigma^2 + sd^2) / (sigma sd)^2``, at
    log-normal sigmas (see :class:`~dit.train.objectives.parametrisation.EDMParametrisation`). Since
    ``lambda = 1 / c_out^2`` this is the unweighted squared error of ``F`` against ``(x0 - c_skip x_t) / c_out``.
    Logs ``mse``, the unweighted error of ``D``.
    """

    parametrisation_class = EDMParametrisation

    def loss(self, model_fn, latents, noise, uniform, loss_mask=None):
        p = self.parametrisation
        sigma = p.timesteps(uniform).to(latents.device)  # (B,)
        noisy = p.add_noise(latents, noise, sigma)  # (B, C, H, W)
        pred = model_fn(p.model_input(noisy, sigma), p.model_time(sigma))[:, : latents.shape[1]]  # F
        mse = mean_per_sample((p.denoised(pred, noisy, sigma) - latents.float()) ** 2, loss_mask)  # (B,)
        return p.loss_weight(sigma) * mse, {"mse": mse}


OBJECTIVES: dict[str, type[Objective]] = {
    "ddpm_eps": DDPMEpsilon,
    "v": VPrediction,
    "x0": SamplePrediction,
    "flow": RectifiedFlow,
    "edm": EDMDenoising,
}

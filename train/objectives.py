"""Training objectives: small classes that turn (clean latents, noise, a uniform draw per sample) into a loss.

The loop owns all randomness (per-sample generators), so an objective is a pure function of its inputs: the
same sample gets the same noise and timestep whichever process or batch position it lands in.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .config import ConfigError, ObjectiveConfig

ModelFn = Callable[..., torch.Tensor]  # (noisy latents, timesteps, *, uncond=False, guidance=None) -> prediction

#: sigma_data of the consistency boundary scalings (fixed at 0.5 in diffusers' LCMScheduler).
SIGMA_DATA = 0.5


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
    patches of a masked step); ``supports_loss_mask`` says whether an objective takes it.

    ``uses_teacher`` / ``uses_target``: ``loss`` also takes ``teacher_fn`` (a frozen teacher) / ``target_fn``
    (a target network) and ``guidance_uniform`` from the loop.
    """

    uses_teacher = False
    uses_target = False
    supports_loss_mask = True

    def __init__(self, config: ObjectiveConfig):
        self.config = config

    def to(self, device: torch.device | str) -> Objective:
        """Move the objective's tensors (noise schedule, solver grid; those of a wrapped base objective too) to
        ``device`` once, so that no training step copies them from the host."""
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
            elif isinstance(value, Objective):
                value.to(device)
        return self

    def timesteps(self, uniform: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sampling_scheduler(self):
        """A diffusers scheduler that samples from a model trained with this objective (validation, pipelines)."""
        raise NotImplementedError

    def loss(
        self,
        model_fn: ModelFn,
        latents: torch.Tensor,
        noise: torch.Tensor,
        uniform: torch.Tensor,
        loss_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    # ----- the parametrisation, for samplers and distillation (t in the objective's own units) -------------
    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noisy sample at ``t`` for clean sample ``x0`` and noise ``eps`` (a DDIM step when ``eps`` is
        a model's estimate)."""
        raise NotImplementedError

    def x0_and_eps(
        self, pred: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The clean-sample and noise estimates that a model's prediction at ``(noisy, t)`` implies."""
        raise NotImplementedError

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """What the model is fed as ``timestep`` for objective time ``t``."""
        return t

    def solver_grid(self, num_steps: int) -> torch.Tensor:
        """``num_steps`` ascending times, evenly spaced, ending at the noisiest (a DDIM solver's grid)."""
        raise NotImplementedError

    def consistency_scalings(self, t: torch.Tensor, timestep_scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(c_skip, c_out)`` of a consistency model ``c_skip * x_t + c_out * x0`` (c_skip = 1 at t = 0)."""
        raise NotImplementedError

    def consistency_scheduler(self, num_steps: int, timestep_scaling: float):
        """diffusers' few-step scheduler for a consistency model distilled on ``solver_grid(num_steps)``."""
        raise NotImplementedError


def _broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) in ``like``'s dtype and device."""
    return values.to(like.device, like.dtype).view((-1,) + (1,) * (like.ndim - 1))


def discrete_betas(config: ObjectiveConfig) -> torch.Tensor:
    """PixArt's linear betas, with every timestep's SNR divided by ``noise_shift ** 2`` when it is not 1 (SD3's
    shift in SNR terms: more noise at every step, for inputs whose tokens average many values)."""
    if config.noise_shift <= 0:
        raise ConfigError(f"objective.noise_shift must be positive, got {config.noise_shift}.")
    betas = torch.linspace(config.beta_start, config.beta_end, config.num_train_timesteps, dtype=torch.float64)
    if config.noise_shift == 1:
        return betas
    abar = torch.cumprod(1 - betas, dim=0)
    snr = abar / (1 - abar) / config.noise_shift**2
    shifted = snr / (1 + snr)  # (T,) the new alphas_cumprod
    return 1 - shifted / torch.cat([shifted.new_ones(1), shifted[:-1]])


class _Discrete(Objective):
    """DDPM forward process with PixArt's linear betas over ``num_train_timesteps`` steps (optionally shifted)."""

    prediction_type = "epsilon"

    def __init__(self, config: ObjectiveConfig):
        super().__init__(config)
        self.betas = discrete_betas(config)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)

    def _schedule_kwargs(self) -> dict:
        """The noise schedule as diffusers schedulers take it (``trained_betas`` once shifted)."""
        cfg = self.config
        if cfg.noise_shift == 1:
            return dict(beta_start=cfg.beta_start, beta_end=cfg.beta_end, beta_schedule="linear")
        return dict(trained_betas=self.betas.tolist())

    def timesteps(self, uniform: torch.Tensor) -> torch.Tensor:
        return (uniform * self.config.num_train_timesteps).long().clamp_(max=self.config.num_train_timesteps - 1)

    def sampling_scheduler(self):
        from diffusers import DPMSolverMultistepScheduler

        cfg = self.config
        return DPMSolverMultistepScheduler(
            num_train_timesteps=cfg.num_train_timesteps, prediction_type=self.prediction_type,
            **self._schedule_kwargs(),
        )  # fmt: skip

    def _coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        abar = self.alphas_cumprod.to(like.device)[t]  # (B,)
        shape = (-1,) + (1,) * (like.ndim - 1)
        return abar.sqrt().to(like.dtype).view(shape), (1 - abar).sqrt().to(like.dtype).view(shape)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        abar = self.alphas_cumprod.to(t.device)[t]
        return (abar / (1 - abar)).float()

    def _min_snr_weight(self, t: torch.Tensor, v_prediction: bool) -> torch.Tensor | None:
        gamma = self.config.min_snr_gamma
        if gamma is None:
            return None
        snr = self.snr(t)
        return torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + 1 if v_prediction else snr)

    def add_noise(self, x0, eps, t):
        a, s = self._coefficients(t, x0)
        return a * x0 + s * eps

    def solver_grid(self, num_steps: int) -> torch.Tensor:
        total = self.config.num_train_timesteps
        if not 0 < num_steps <= total:
            raise ConfigError(f"The solver grid needs 1..{total} steps, got {num_steps}.")
        return torch.arange(1, num_steps + 1) * (total // num_steps) - 1  # e.g. 19, 39, ..., 999

    def consistency_scalings(self, t, timestep_scaling):
        scaled = t.double() * timestep_scaling
        c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
        c_out = scaled / (scaled**2 + SIGMA_DATA**2).sqrt()
        return c_skip.float(), c_out.float()

    def consistency_scheduler(self, num_steps: int, timestep_scaling: float):
        from diffusers import LCMScheduler

        cfg = self.config
        return LCMScheduler(
            num_train_timesteps=cfg.num_train_timesteps, prediction_type=self.prediction_type,
            original_inference_steps=num_steps, timestep_scaling=timestep_scaling, clip_sample=False,
            **self._schedule_kwargs(),
        )  # fmt: skip


class DDPMEpsilon(_Discrete):
    """ε-prediction MSE; when the model also outputs variance channels, PixArt's learned-sigma VLB term."""

    def x0_and_eps(self, pred, noisy, t):
        a, s = self._coefficients(t, noisy)
        return (noisy - s * pred) / a, pred

    def loss(self, model_fn, latents, noise, uniform, loss_mask=None):
        t = self.timesteps(uniform)
        a, s = self._coefficients(t, latents)
        noisy = a * latents + s * noise
        pred = model_fn(noisy, t)
        channels = latents.shape[1]
        eps = pred[:, :channels]
        mse = mean_per_sample((eps.float() - noise.float()) ** 2, loss_mask)
        weight = self._min_snr_weight(t, v_prediction=False)
        loss = mse if weight is None else mse * weight
        extra = {"mse": mse}
        if pred.shape[1] == 2 * channels:
            vlb = self._vlb(latents, noisy, t, eps.detach(), pred[:, channels:], loss_mask)
            loss = loss + self.config.vlb_weight * vlb
            extra["vlb"] = vlb
        return loss, extra

    def _posterior(self, t: torch.Tensor, like: torch.Tensor):
        """Coefficients of q(x_{t-1} | x_t, x_0): mean = c0 * x0 + ct * xt, clipped log-variance."""
        abar = self.alphas_cumprod.to(like.device)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        betas = self.betas.to(like.device)
        variance = betas * (1 - abar_prev) / (1 - abar)
        log_variance = torch.log(torch.cat([variance[1:2], variance[1:]]))
        c0 = betas * abar_prev.sqrt() / (1 - abar)
        ct = (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar)
        shape = (-1,) + (1,) * (like.ndim - 1)
        return [v[t].float().view(shape) for v in (c0, ct, log_variance, torch.log(betas))]

    def _vlb(self, x0, xt, t, eps, var_channels, loss_mask=None) -> torch.Tensor:
        """KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) in bits per dimension; the decoder NLL at t = 0 (IDDPM)."""
        c0, ct, true_log_var, max_log = self._posterior(t, x0)
        abar = self.alphas_cumprod.to(x0.device)[t].float().view(c0.shape)
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


class VPrediction(_Discrete):
    """v-prediction: target ``sqrt(abar) * noise - sqrt(1 - abar) * x0``.

    Unlike ε-prediction, a model's error does not get amplified by sigma/alpha (~150 at PixArt's last step) when the
    sampler turns it into a clean-sample estimate, which matters for small models whose tokens are as wide as their
    patches (they cannot carry the noise through exactly).
    """

    prediction_type = "v_prediction"

    def x0_and_eps(self, pred, noisy, t):
        a, s = self._coefficients(t, noisy)
        return a * noisy - s * pred, s * noisy + a * pred

    def loss(self, model_fn, latents, noise, uniform, loss_mask=None):
        t = self.timesteps(uniform)
        a, s = self._coefficients(t, latents)
        pred = model_fn(a * latents + s * noise, t)[:, : latents.shape[1]]
        target = a * noise - s * latents
        mse = mean_per_sample((pred.float() - target.float()) ** 2, loss_mask)
        weight = self._min_snr_weight(t, v_prediction=True)
        return (mse if weight is None else mse * weight), {"mse": mse}


class SamplePrediction(_Discrete):
    """Clean-sample (x0) prediction. A clean image lies on a low-dimensional set while noise does not, so a model
    whose tokens are about as wide as their patches (8 latent channels x 4x4 = 128 values per 128-wide token) can
    output x0 exactly where it cannot carry the noise through. Sampled by DPM-Solver with ``prediction_type="sample"``.

    ``objective.x0_weighting``: ``v`` (JiT's x-prediction with the v-loss: ``|x0_hat - x0|^2 / sigma_t^2``, sigma
    floored at ``x0_sigma_floor``, which weights the low-noise steps) or ``uniform`` (plain ``|x0_hat - x0|^2``, which
    weights the noisy steps where layout and shape are decided; it learned MicroShapes prompts faster).
    """

    prediction_type = "sample"
    WEIGHTINGS = ("v", "uniform")

    def __init__(self, config: ObjectiveConfig):
        super().__init__(config)
        if config.x0_weighting not in self.WEIGHTINGS:
            raise ConfigError(f"objective.x0_weighting must be one of {self.WEIGHTINGS}, got {config.x0_weighting!r}.")

    def x0_and_eps(self, pred, noisy, t):
        a, s = self._coefficients(t, noisy)
        return pred, (noisy - a * pred) / s

    def loss(self, model_fn, latents, noise, uniform, loss_mask=None):
        t = self.timesteps(uniform)
        a, s = self._coefficients(t, latents)
        pred = model_fn(a * latents + s * noise, t)[:, : latents.shape[1]]
        mse = mean_per_sample((pred.float() - latents.float()) ** 2, loss_mask)
        if self.config.x0_weighting == "uniform":
            return mse, {"mse": mse}
        sigma = s.reshape(-1).float().clamp(min=self.config.x0_sigma_floor)  # (B,)
        loss = mse / sigma**2  # the v-space loss
        weight = self._min_snr_weight(t, v_prediction=True)
        return (loss if weight is None else loss * weight), {"mse": mse}


class RectifiedFlow(Objective):
    """Rectified flow (SD3 / FiTv2): ``x_t = (1 - t) x0 + t noise``, velocity target ``noise - x0``.

    ``t`` is logit-normal: ``sigmoid(mean + std * z)`` with ``z`` the normal quantile of the uniform draw. The
    model sees ``t * num_train_timesteps``, as diffusers' ``FlowMatchEulerDiscreteScheduler`` feeds it.
    """

    def __init__(self, config: ObjectiveConfig):
        super().__init__(config)
        if config.min_snr_gamma is not None:
            raise ConfigError("objective.min_snr_gamma is not defined for rectified flow; leave it null.")

    def sampling_scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.config.num_train_timesteps)

    def timesteps(self, uniform: torch.Tensor) -> torch.Tensor:
        z = torch.special.ndtri(uniform.double().clamp(1e-6, 1 - 1e-6))
        return torch.sigmoid(self.config.logit_normal_mean + self.config.logit_normal_std * z).float()

    def add_noise(self, x0, eps, t):
        sigma = _broadcast(t, x0)
        return (1 - sigma) * x0 + sigma * eps

    def x0_and_eps(self, pred, noisy, t):
        sigma = _broadcast(t, noisy)
        return noisy - sigma * pred, noisy + (1 - sigma) * pred

    def model_time(self, t):
        return t * self.config.num_train_timesteps

    def solver_grid(self, num_steps: int) -> torch.Tensor:
        if num_steps < 1:
            raise ConfigError(f"The solver grid needs at least 1 step, got {num_steps}.")
        return torch.arange(1, num_steps + 1, dtype=torch.float64).div(num_steps).float()  # 1/N, ..., 1

    def consistency_scalings(self, t, timestep_scaling):
        # x0 = x_t - sigma * v already equals x_t at sigma = 0: FlowMatchLCMScheduler's parametrisation
        return torch.zeros_like(t, dtype=torch.float32), torch.ones_like(t, dtype=torch.float32)

    def consistency_scheduler(self, num_steps: int, timestep_scaling: float):
        from diffusers import FlowMatchLCMScheduler

        return FlowMatchLCMScheduler(num_train_timesteps=self.config.num_train_timesteps)

    def loss(self, model_fn, latents, noise, uniform, loss_mask=None):
        t = self.timesteps(uniform).to(latents.device)
        tt = _broadcast(t, latents)
        pred = model_fn((1 - tt) * latents + tt * noise, t * self.config.num_train_timesteps)
        mse = mean_per_sample((pred[:, : latents.shape[1]].float() - (noise - latents).float()) ** 2, loss_mask)
        return mse, {"mse": mse}


class HybridDistillation(Objective):
    """LiT's hybrid distillation around any objective: its loss plus ``eps_weight * ||eps_T - eps_S||^2`` and, when
    the models output learned-sigma channels, ``var_weight * ||Sigma_T - Sigma_S||^2``, with a frozen teacher
    evaluated on the student's exact noisy input, timestep and conditions (``teacher_fn``, given by the loop).

    The first term compares the predictions in the objective's own parametrisation (ε for ``ddpm_eps``, v for
    ``v``); the variance term exists only for learned-sigma models (``out_channels = 2 * in_channels``).
    """

    uses_teacher = True

    def __init__(self, base: Objective, eps_weight: float = 0.5, var_weight: float = 0.05):
        super().__init__(base.config)
        self.base, self.eps_weight, self.var_weight = base, eps_weight, var_weight

    def timesteps(self, uniform: torch.Tensor) -> torch.Tensor:
        return self.base.timesteps(uniform)

    def sampling_scheduler(self):
        return self.base.sampling_scheduler()

    def loss(self, model_fn, latents, noise, uniform, loss_mask=None, teacher_fn: ModelFn | None = None):
        if teacher_fn is None:
            raise ValueError("HybridDistillation needs the teacher's prediction function (objective.distill_teacher).")
        seen = {}

        def student(noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            seen["pred"], seen["inputs"] = model_fn(noisy, t), (noisy, t)
            return seen["pred"]

        loss, extra = self.base.loss(student, latents, noise, uniform, loss_mask)
        with torch.no_grad():
            target = teacher_fn(*seen["inputs"]).float()
        pred, channels = seen["pred"].float(), latents.shape[1]
        extra["kd_eps"] = mean_per_sample((pred[:, :channels] - target[:, :channels]) ** 2, loss_mask)
        loss = loss + self.eps_weight * extra["kd_eps"]
        if pred.shape[1] == 2 * channels and target.shape[1] == 2 * channels:
            extra["kd_var"] = mean_per_sample((pred[:, channels:] - target[:, channels:]) ** 2, loss_mask)
            loss = loss + self.var_weight * extra["kd_var"]
        return loss, extra


OBJECTIVES: dict[str, type[Objective]] = {
    "ddpm_eps": DDPMEpsilon,
    "v": VPrediction,
    "x0": SamplePrediction,
    "flow": RectifiedFlow,
}


def build_objective(config: ObjectiveConfig) -> Objective:
    """The objective ``config.name``, wrapped by the distillation ``config.distill`` names (``hybrid`` by default
    when a teacher is configured, or ``lcm``)."""
    if config.name not in OBJECTIVES:
        raise ConfigError(f"objective.name: unknown objective {config.name!r}; choose one of {sorted(OBJECTIVES)}.")
    objective = OBJECTIVES[config.name](config)
    distill = config.distill or ("hybrid" if config.distill_teacher else None)
    if distill is None:
        return objective
    if not config.distill_teacher:
        raise ConfigError(f"objective.distill={distill!r} needs objective.distill_teacher (the teacher's folder).")
    if distill == "hybrid":
        return HybridDistillation(objective, config.distill_eps_weight, config.distill_var_weight)
    if distill == "lcm":
        from .consistency import ConsistencyDistillation

        return ConsistencyDistillation(objective, config.lcm)
    raise ConfigError(f"objective.distill: unknown distillation {distill!r}; use 'hybrid' or 'lcm'.")

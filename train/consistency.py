"""Latent consistency distillation (LCM, PixArt-δ) around any objective's parametrisation.

One training step, with ``t`` drawn from the solver grid (``num_ddim_timesteps`` points) and ``t'`` the point
below it (0 below the first):

- the student maps ``x_t = add_noise(x0, noise, t)`` to ``f(x_t, t) = c_skip(t) x_t + c_out(t) x0_student``;
- the frozen teacher, with classifier-free guidance ``g``, takes one DDIM step ``x_t -> x_t'``;
- the target network (an EMA of the student, or the student itself for LCM-LoRA) gives ``f(x_t', t')``
  without gradient;
- the loss is Huber (or L2) between the two.

The objective only uses the base objective's parametrisation (``x0_and_eps``, ``add_noise``, ``solver_grid``,
``consistency_scalings``), so ε-, v- and flow-trained models distil alike; the result samples with
``consistency_scheduler()`` (diffusers' ``LCMScheduler``, or ``FlowMatchLCMScheduler`` for flow).
"""

from __future__ import annotations

import copy

import torch

from .config import ConfigError, LCMConfig
from .ema import lerp_toward_, trainable_names
from .objectives import ModelFn, Objective, _broadcast, mean_per_sample


class ConsistencyDistillation(Objective):
    """LCM's consistency-distillation loss; see the module docstring.

    Args:
        base: the objective the teacher was trained with (its parametrisation and noise schedule).
        lcm: solver grid, guidance mode, boundary scaling, loss and target-network settings.
    """

    uses_teacher = True
    uses_target = True
    supports_loss_mask = False

    def __init__(self, base: Objective, lcm: LCMConfig):
        super().__init__(base.config)
        if lcm.loss not in ("huber", "l2"):
            raise ConfigError(f"objective.lcm.loss: {lcm.loss!r} is not 'huber' or 'l2'.")
        if lcm.guidance_range is not None and not 1.0 <= lcm.guidance_range[0] <= lcm.guidance_range[1]:
            raise ConfigError(
                f"objective.lcm.guidance_range {lcm.guidance_range} must be (low, high), 1 <= low <= high."
            )
        if lcm.target_ema is not None and not 0.0 <= lcm.target_ema < 1.0:
            raise ConfigError(f"objective.lcm.target_ema must be in [0, 1) or null, got {lcm.target_ema}.")
        self.base, self.lcm = base, lcm
        self.grid = base.solver_grid(lcm.num_ddim_timesteps)  # (N,) ascending
        self.previous = torch.cat([torch.zeros_like(self.grid[:1]), self.grid[:-1]])  # (N,) one solver step down

    @property
    def guidance_embedded(self) -> bool:
        """Whether the student takes its guidance scale as an input (latent-consistency-model) or has it baked in."""
        return self.lcm.guidance_range is not None

    def timesteps(self, uniform: torch.Tensor) -> torch.Tensor:
        index = (uniform * len(self.grid)).long().clamp_(max=len(self.grid) - 1)
        return self.grid.to(uniform.device)[index]

    def guidance(self, uniform: torch.Tensor) -> torch.Tensor:
        """The teacher's guidance scale per sample (B,): fixed, or drawn from ``guidance_range``."""
        if not self.guidance_embedded:
            return torch.full_like(uniform, self.lcm.guidance_scale, dtype=torch.float32)
        low, high = self.lcm.guidance_range
        return low + (high - low) * uniform.float()

    def sampling_scheduler(self):
        return self.base.consistency_scheduler(self.lcm.num_ddim_timesteps, self.lcm.timestep_scaling)

    def consistency(self, pred: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``f(x_t, t) = c_skip(t) x_t + c_out(t) x0``: the clean sample a consistency model's output stands for."""
        x0, _ = self.base.x0_and_eps(pred[:, : noisy.shape[1]].float(), noisy.float(), t)
        c_skip, c_out = self.base.consistency_scalings(t, self.lcm.timestep_scaling)
        return _broadcast(c_skip, x0) * noisy.float() + _broadcast(c_out, x0) * x0

    def solver_step(self, pred: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor):
        """One deterministic DDIM step ``x_t -> x_t'`` from a (guided) teacher prediction."""
        x0, eps = self.base.x0_and_eps(pred[:, : noisy.shape[1]].float(), noisy.float(), t)
        return self.base.add_noise(x0, eps, t_prev)

    def loss(
        self,
        model_fn: ModelFn,
        latents: torch.Tensor,
        noise: torch.Tensor,
        uniform: torch.Tensor,
        teacher_fn: ModelFn | None = None,
        target_fn: ModelFn | None = None,
        guidance_uniform: torch.Tensor | None = None,
    ):
        if teacher_fn is None or target_fn is None:
            raise ValueError("Consistency distillation needs teacher_fn and target_fn (given by the training loop).")
        index = (uniform * len(self.grid)).long().clamp_(max=len(self.grid) - 1)
        t, t_prev = self.grid.to(latents.device)[index], self.previous.to(latents.device)[index]  # (B,), (B,)
        g = self.guidance(guidance_uniform if guidance_uniform is not None else torch.zeros_like(uniform))  # (B,)
        student_kw = {"guidance": g} if self.guidance_embedded else {}
        noisy = self.base.add_noise(latents, noise, t)  # (B, C, H, W)

        prediction = self.consistency(model_fn(noisy, self.base.model_time(t), **student_kw), noisy, t)
        with torch.no_grad():
            time = self.base.model_time(t)
            cond, uncond = teacher_fn(noisy, time).float(), teacher_fn(noisy, time, uncond=True).float()
            guided = uncond + _broadcast(g, cond) * (cond - uncond)
            x_prev = self.solver_step(guided, noisy, t, t_prev).to(noisy.dtype)
            target_pred = target_fn(x_prev, self.base.model_time(t_prev), **student_kw)
            target = self.consistency(target_pred, x_prev, t_prev)
        loss = consistency_loss(prediction, target, self.lcm.loss, self.lcm.huber_c)
        return loss, {"mse": mean_per_sample((prediction - target) ** 2)}


def consistency_loss(prediction: torch.Tensor, target: torch.Tensor, kind: str, huber_c: float) -> torch.Tensor:
    """Per-sample (B,) pseudo-Huber ``sqrt(d^2 + c^2) - c`` (LCM) or squared error."""
    diff = prediction.float() - target.float()
    if kind == "huber":
        return mean_per_sample(torch.sqrt(diff**2 + huber_c**2) - huber_c)
    return mean_per_sample(diff**2)


class TargetNetwork:
    """A frozen copy of the student whose trainable weights follow it as an EMA (LCM's target network).

    Checkpointable through accelerate (``state_dict`` / ``load_state_dict``), so a resumed run continues exactly.
    """

    def __init__(self, model: torch.nn.Module, decay: float, device: torch.device | str | None = None):
        self.decay = decay
        self.module = copy.deepcopy(model).requires_grad_(False).to(device)
        self.names = trainable_names(model)
        self._params = dict(self.module.named_parameters())

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        params = dict(model.named_parameters())
        lerp_toward_([self._params[n] for n in self.names], [params[n] for n in self.names], 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "params": {n: self._params[n].detach().clone() for n in self.names}}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.names) - set(state["params"])
        if missing:
            raise KeyError(f"Target-network state lacks {sorted(missing)[:5]}.")
        self.decay = state["decay"]
        with torch.no_grad():
            for name in self.names:
                self._params[name].copy_(state["params"][name])

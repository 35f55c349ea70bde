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
``consistency_scheduler()`` (diffusers' ``LCMScheduler``, or ``FlowMatchLCMScheduler`` for flow). As a training
feature it owns the teacher, the teacher's unconditional caption and the target network (checkpointed after the
run's EMA), follows every optimizer step, and ends the run with ``output_dir/lcm``.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any

import torch
from diffusers import SchedulerMixin
from torch import nn

from dit.pipelines.lcm import save_lcm

from ..config import ConfigError, LCMConfig, ObjectiveConfig
from ..ema import EMA, target_network
from ..features.base import Run
from .distillation import Distillation
from .losses import ModelFn, NetworkCall, Objective, mean_per_sample
from .parametrisation import broadcast


class ConsistencyDistillation(Distillation):
    """LCM's consistency-distillation loss; see the module docstring.

    Args:
        base: the objective the teacher was trained with (its parametrisation and noise schedule).
        lcm: solver grid, guidance mode, boundary scaling, loss and target-network settings.
    """

    label = "consistency (LCM) distillation (objective.distill=lcm)"
    excludes = Distillation.excludes | {"masking"}
    sharded_refusal = (
        "the target network and the lcm folder need the whole student on one process; run LCM distillation with DDP "
        "(configs/accelerate/multi_gpu.yaml)."
    )

    def __init__(self, base: Objective, lcm: LCMConfig):
        super().__init__(base)
        self.lcm = lcm
        self.grid = self.parametrisation.solver_grid(lcm.num_ddim_timesteps)  # (N,) ascending
        self.previous = torch.cat([torch.zeros_like(self.grid[:1]), self.grid[:-1]])  # (N,) one solver step down
        self.target: EMA | None = None  # the EMA target network (None: the student is its own target)
        self.uncond_caption: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._student: nn.Module | None = None

    @classmethod
    def from_config(cls, base: Objective, config: ObjectiveConfig) -> ConsistencyDistillation:
        return cls(base, config.lcm)

    @property
    def guidance_embedded(self) -> bool:
        """Whether the student takes its guidance scale as an input (latent-consistency-model) or has it baked in."""
        return self.lcm.guidance_range is not None

    # ----- the loss -------------------------------------------------------------------------------------------
    def timesteps(self, uniform: torch.Tensor) -> torch.Tensor:
        index = (uniform * len(self.grid)).long().clamp_(max=len(self.grid) - 1)
        return self.grid.to(uniform.device)[index]

    def guidance(self, uniform: torch.Tensor) -> torch.Tensor:
        """The teacher's guidance scale per sample (B,): fixed, or drawn from ``guidance_range``."""
        if not self.guidance_embedded:
            return torch.full_like(uniform, self.lcm.guidance_scale, dtype=torch.float32)
        low, high = self.lcm.guidance_range
        return low + (high - low) * uniform.float()

    def sampling_scheduler(self) -> SchedulerMixin:
        return self.parametrisation.consistency_scheduler(self.lcm.num_ddim_timesteps, self.lcm.timestep_scaling)

    def sampling_defaults(self) -> tuple[int, float]:
        """Four steps; a fixed guidance scale is distilled in (1: no CFG), an embedded one is the student's input."""
        return 4, (self.lcm.guidance_scale if self.guidance_embedded else 1.0)

    def consistency(self, pred: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``f(x_t, t) = c_skip(t) x_t + c_out(t) x0``: the clean sample a consistency model's output stands for."""
        x0, _ = self.parametrisation.x0_and_eps(pred[:, : noisy.shape[1]].float(), noisy.float(), t)
        c_skip, c_out = self.parametrisation.consistency_scalings(t, self.lcm.timestep_scaling)
        return broadcast(c_skip, x0) * noisy.float() + broadcast(c_out, x0) * x0

    def solver_step(
        self, pred: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor
    ) -> torch.Tensor:
        """One deterministic DDIM step ``x_t -> x_t'`` from a (guided) teacher prediction."""
        x0, eps = self.parametrisation.x0_and_eps(pred[:, : noisy.shape[1]].float(), noisy.float(), t)
        return self.parametrisation.add_noise(x0, eps, t_prev)

    def loss(
        self,
        model_fn: ModelFn,
        latents: torch.Tensor,
        noise: torch.Tensor,
        uniform: torch.Tensor,
        teacher_fn: ModelFn | None = None,
        target_fn: ModelFn | None = None,
        guidance_uniform: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if teacher_fn is None or target_fn is None:
            raise ValueError("Consistency distillation needs teacher_fn and target_fn (given by the training loop).")
        p = self.parametrisation
        index = (uniform * len(self.grid)).long().clamp_(max=len(self.grid) - 1)
        t, t_prev = self.grid.to(latents.device)[index], self.previous.to(latents.device)[index]  # (B,), (B,)
        g = self.guidance(guidance_uniform if guidance_uniform is not None else torch.zeros_like(uniform))  # (B,)
        student_kw = {"guidance": g} if self.guidance_embedded else {}
        noisy = p.add_noise(latents, noise, t)  # (B, C, H, W)

        prediction = self.consistency(model_fn(noisy, p.model_time(t), **student_kw), noisy, t)
        with torch.no_grad():
            time = p.model_time(t)
            cond, uncond = teacher_fn(noisy, time).float(), teacher_fn(noisy, time, uncond=True).float()
            guided = uncond + broadcast(g, cond) * (cond - uncond)
            x_prev = self.solver_step(guided, noisy, t, t_prev).to(noisy.dtype)
            target_pred = target_fn(x_prev, p.model_time(t_prev), **student_kw)
            target = self.consistency(target_pred, x_prev, t_prev)
        loss = consistency_loss(prediction, target, self.lcm.loss, self.lcm.huber_c)
        return loss, {"mse": mean_per_sample((prediction - target) ** 2)}

    # ----- the feature ----------------------------------------------------------------------------------------
    def check(self, backbone: nn.Module) -> None:
        """Guidance as an input (``guidance_range``) needs a student with a guidance embedding, and only then."""
        dim = getattr(backbone.config, "time_cond_proj_dim", None)
        if (dim is not None) != self.guidance_embedded:
            raise ConfigError(
                "objective.lcm.guidance_range (guidance as an input) and the student's time_cond_proj_dim go "
                f"together; here guidance_range={self.lcm.guidance_range} and time_cond_proj_dim={dim} (set both, "
                "or neither for a fixed guidance scale)."
            )

    def prepare(self, run: Run) -> None:
        """The teacher and the target network on the student's device, and the teacher's unconditional caption."""
        super().prepare(run)
        device = run.accelerator.device
        self.uncond_caption = run.empty_caption(self.teacher)  # on the host: the loop moves it
        self._student = run.model
        decay = self.lcm.target_ema
        student = run.accelerator.unwrap_model(run.model)
        self.target = None if decay is None else target_network(student, decay, device)

    def captions(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        return {"uncond": self.uncond_caption}

    def checkpoint_states(self) -> list[Any]:
        return [] if self.target is None else [self.target]

    def networks(self, call: NetworkCall, draws: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The teacher, the target network (or the student itself) and the guidance draws."""
        target = self._student if self.target is None else self.target.module
        return {**super().networks(call, draws), "target_fn": functools.partial(call, target),
                "guidance_uniform": draws["guidance"]}  # fmt: skip

    def after_optimizer_step(self, model: nn.Module) -> None:
        if self.target is not None:
            self.target.update(model)

    def export(self, run: Run) -> Path:
        """``output_dir/lcm``: the distilled student (EMA weights when kept) as an LCM folder for
        ``dit.pipelines.load_lcm`` / ``dit generate --lcm-folder``, with its consistency scheduler."""
        model = run.accelerator.unwrap_model(run.model)
        guidance = self.sampling_defaults()[1]
        context = run.ema.swapped_in(model) if run.ema is not None else contextlib.nullcontext()
        with context:
            return save_lcm(run.root / "lcm", model, self.sampling_scheduler(), guidance_scale=guidance)


def consistency_loss(prediction: torch.Tensor, target: torch.Tensor, kind: str, huber_c: float) -> torch.Tensor:
    """Per-sample (B,) pseudo-Huber ``sqrt(d^2 + c^2) - c`` (LCM) or squared error."""
    diff = prediction.float() - target.float()
    if kind == "huber":
        return mean_per_sample(torch.sqrt(diff**2 + huber_c**2) - huber_c)
    return mean_per_sample(diff**2)

"""The optimizer and learning-rate schedule of a run (the ``optim`` section)."""

from __future__ import annotations

import math

import torch

from .config import ConfigError, TrainConfig


def build_optimizer(
    model: torch.nn.Module,
    config: TrainConfig,
    device: torch.device,
    params: list[torch.nn.Parameter] | None = None,
) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA: one kernel for the whole update, or bitsandbytes' 8-bit AdamW) over the parameters of
    ``model`` that train, or over ``params`` (the fp32 masters of bf16 compute weights,
    :class:`~dit.train.precision.MasterWeights`)."""
    cfg = config.optim
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    if cfg.use_8bit_adam:
        if not torch.cuda.is_available():
            raise ConfigError("optim.use_8bit_adam needs a CUDA GPU (bitsandbytes); set it to false on CPU.")
        import bitsandbytes as bnb  # optional, CUDA only

        return bnb.optim.AdamW8bit(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    fused = device.type == "cuda"  # one kernel for the whole update instead of a few per group
    return torch.optim.AdamW(
        params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, fused=fused
    )


def lr_factor(config: TrainConfig, step: int) -> float:
    """The learning-rate multiplier at optimizer step ``step``: linear warmup, then constant or cosine decay."""
    cfg = config.optim
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.schedule == "constant":
        return warm
    if cfg.schedule == "cosine":
        progress = min(1.0, step / max(1, config.max_steps))
        return warm * 0.5 * (1 + math.cos(math.pi * progress))
    raise ConfigError(f"optim.schedule: unknown schedule {cfg.schedule!r}; use 'constant' or 'cosine'.")

"""The one training loop: accelerate, pluggable objectives, EMA, atomic checkpoints, exact resume."""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from safetensors.torch import load_file
from tqdm.auto import tqdm

from dit.embeddings import guidance_scale_embedding
from dit.models.base import compile_repeated_blocks
from dit.text_padding import trimmed_text_length

from . import checkpointing
from .config import ConfigError, TrainConfig, to_yaml
from .data import (
    NULL_CAPTION_FILE,
    BatchPlan,
    FeatureDataset,
    PlannedBatches,
    check_mixed_sizes,
    collate,
    padding_mask,
)
from .ema import EMA, is_sharded
from .masking import build_masking
from .objectives import build_objective
from .validation import Validator


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last finished checkpoint is left as it was."""


def build_model(config: TrainConfig) -> torch.nn.Module:
    """The backbone named by ``model.cls`` (a class of :mod:`dit`), from ``model.pretrained`` or ``model.kwargs``."""
    import dit

    cls = getattr(dit, config.model.cls, None)
    if cls is None or not isinstance(cls, type):
        raise ConfigError(f"model.cls: {config.model.cls!r} is not a backbone class of dit.")
    if config.model.pretrained and config.model.inherit_from:
        raise ConfigError("model.pretrained and model.inherit_from exclude each other; set one.")
    if config.model.pretrained:
        model = cls.from_pretrained(config.model.pretrained)
    elif config.model.inherit_from:
        model = cls.from_pixart(config.model.inherit_from, **config.model.kwargs)
    else:
        model = cls(**config.model.kwargs)
    if config.model.lora_rank:
        add_lora(model, config.model.lora_rank, config.model.lora_alpha, config.model.lora_target_modules)
    if config.model.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if config.controlnet.enabled:  # the base frozen, a ControlNet adapter on it trains
        from .controlnet import controlnet_model

        model = controlnet_model(model, config)
    return model.train()


def add_lora(model: torch.nn.Module, rank: int, alpha: float | None, targets: list[str]) -> None:
    """Freeze ``model`` and add a trainable peft LoRA (Gaussian A, zero B: the model is unchanged at first)."""
    try:
        from peft import LoraConfig
    except ImportError as error:
        raise ConfigError("model.lora_rank needs peft: pip install 'dit-toolkit[lora]'.") from error
    model.requires_grad_(False)
    lora = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(targets), init_lora_weights="gaussian")
    model.add_adapter(lora)


def save_model(model: torch.nn.Module, folder: Path) -> None:
    """A diffusers folder of the model, or of its LoRA alone (``pytorch_lora_weights.safetensors``) when it has one."""
    if getattr(model, "peft_config", None):
        model.save_lora_adapter(folder)
    else:
        model.save_pretrained(folder)


def _teacher(path: str | None, device: torch.device) -> torch.nn.Module | None:
    """The frozen distillation teacher (a PixArt transformer or pipeline folder), or None."""
    if not path:
        return None
    from dit.models.base import as_pixart_model

    return as_pixart_model(path).to(device).eval().requires_grad_(False)


def sample_draws(
    seed: int, micro_step: int, positions: list[int], latent_shape, device, token_mask: bool = False
) -> dict[str, torch.Tensor]:
    """Per-sample randomness from a generator keyed by (seed, micro-step, position in the global batch).

    Independent of the process count and of where a run was resumed, which makes both exact. ``token_mask`` adds
    ``mask``, an (H, W) grid of uniforms per sample for token masking (drawn last, so the other draws stay the same).
    """
    draws = {name: [] for name in ("noise", "eps", "uniform", "coin", "guidance", "mask")}
    for position in positions:
        gen = torch.Generator().manual_seed((seed * 1_000_003 + micro_step) * 65_537 + position)
        draws["noise"].append(torch.randn(latent_shape, generator=gen))
        draws["eps"].append(torch.randn(latent_shape, generator=gen))
        draws["uniform"].append(torch.rand((), generator=gen))
        draws["coin"].append(torch.rand((), generator=gen))
        draws["guidance"].append(torch.rand((), generator=gen))
        if token_mask:
            draws["mask"].append(torch.rand(latent_shape[-2:], generator=gen))
    return {name: torch.stack(values).to(device, non_blocking=True) for name, values in draws.items() if values}


class Trainer:
    """Trains a backbone from a :class:`TrainConfig`; ``train()`` returns the logged loss of every step."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.root = Path(config.output_dir)
        # cpu=True without CUDA: several processes (torchrun or `accelerate launch --multi_gpu`) then run
        # accelerate's MULTI_CPU mode over gloo; accelerate's own `--cpu` launcher starts one process unless MPI.
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision=config.mixed_precision,
            log_with=_tracker(config.report_to),
            project_config=ProjectConfiguration(project_dir=str(self.root), logging_dir=str(self.root / "logs")),
        )
        if self.accelerator.log_with:
            self.accelerator.init_trackers("dit")
        set_seed(config.seed)  # the initial weights; every later draw comes from sample_draws
        self.model = build_model(config)
        if config.compile:
            # regional and in place: parameter names (EMA, checkpoints) stay; a graph break is an error
            compile_repeated_blocks(self.model, fullgraph=True, backend=config.compile_backend)
        self.objective = build_objective(config.objective)
        self.teacher = _teacher(config.objective.distill_teacher, self.accelerator.device)
        self.masking = build_masking(config, self.model, self.objective)
        if config.data.source != "features":
            raise ConfigError(
                f"data.source={config.data.source!r}: the loop trains from feature shards; turn images into them "
                "with `dit extract DATA --source imagefolder|webdataset|hf --pipeline P --out D`, then data.path=D."
            )
        self.dataset = FeatureDataset(config.data.path)
        if config.data.mixed_sizes:
            check_mixed_sizes(config, self.model, self.objective)
        world = self.accelerator.num_processes
        buckets = self.dataset.buckets(mixed=config.data.mixed_sizes)
        self.plan = BatchPlan(buckets, config.data.batch_size * world, config.seed)
        self.optimizer = self._optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        self.sharded = _check_engine(self.accelerator, config)
        # FSDP2 shards the model in place: the main process keeps a weightless copy to write full diffusers folders
        keep_twin = self.sharded and self.accelerator.is_main_process
        self.twin = copy.deepcopy(self.model).to("meta") if keep_twin else None
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        # everything kept beside the model is made from the placed model, or moved to its device, here, once
        self.objective.to(self.accelerator.device)
        null_caption = self._null_caption(self.model) if config.data.caption_dropout > 0 else None
        uncond_caption = self._null_caption(self.teacher) if self.objective.uses_target else None
        # the text of every batch is trimmed to a few fixed lengths, never below what a substituted caption keeps
        masks = [c[1] for c in (null_caption, uncond_caption) if c is not None and c[1] is not None]
        self.min_text_length = max((trimmed_text_length(m[None]) for m in masks), default=0)
        self.null_caption, self.uncond_caption = (
            _to_device(c, self.accelerator.device) for c in (null_caption, uncond_caption)
        )
        self.target = self._target_network()
        unwrapped = self.accelerator.unwrap_model(self.model)
        self.ema = EMA(unwrapped, config.ema_decay) if config.ema_decay is not None else None
        self.accelerator.register_for_checkpointing(self.scheduler)
        if self.ema is not None:
            self.accelerator.register_for_checkpointing(self.ema)
        if self.target is not None:
            self.accelerator.register_for_checkpointing(self.target)
        self.validator = None
        if config.validation.every:
            self.validator = Validator(config.validation, self.root, self.objective.sampling_scheduler())
        self.step = 0

    # ----- setup --------------------------------------------------------------------------------------------
    def _optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config.optim
        params = [p for p in self.model.parameters() if p.requires_grad]
        if cfg.use_8bit_adam:
            if not torch.cuda.is_available():
                raise ConfigError("optim.use_8bit_adam needs a CUDA GPU (bitsandbytes); set it to false on CPU.")
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
        fused = self.accelerator.device.type == "cuda"  # one kernel for the whole update instead of a few per group
        return torch.optim.AdamW(
            params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, fused=fused
        )

    def _lr_lambda(self, step: int) -> float:
        cfg = self.config.optim
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        if cfg.schedule == "constant":
            return warm
        if cfg.schedule == "cosine":
            progress = min(1.0, step / max(1, self.config.max_steps))
            return warm * 0.5 * (1 + math.cos(math.pi * progress))
        raise ConfigError(f"optim.schedule: unknown schedule {cfg.schedule!r}; use 'constant' or 'cosine'.")

    def _null_caption(self, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The unconditional caption (caption dropout, a teacher's CFG branch): ``model``'s learned null caption,
        else the extracted empty caption (``None`` mask: keep the prompt's mask, as PixArt's inference does)."""
        length = self.dataset[0]["text_embeds"].shape[0]
        model = self.accelerator.unwrap_model(model)
        if hasattr(model, "y_embedding"):
            caption = model.null_caption(1, length)[0].detach()
            return (caption.full_tensor() if is_sharded(caption) else caption), None  # FSDP2: gathered once
        path = Path(self.config.data.path) / NULL_CAPTION_FILE
        if not path.is_file():
            raise ConfigError(
                f"Caption dropout and guided distillation need the empty caption's features ({path}, written by "
                "`dit extract`) or a model with a learned null caption."
            )
        tensors = load_file(path)
        return tensors["text_embeds"][:length], tensors["text_mask"][:length]

    def _target_network(self):
        """Consistency distillation's EMA target (None: none, or the student is its own target)."""
        if not self.objective.uses_target:
            return None
        from .consistency import TargetNetwork

        model = self.accelerator.unwrap_model(self.model)
        embedded = getattr(model.config, "time_cond_proj_dim", None) is not None
        if embedded != self.objective.guidance_embedded:
            raise ConfigError(
                "objective.lcm.guidance_range (guidance as an input) and the student's time_cond_proj_dim go "
                f"together; here guidance_range={self.config.objective.lcm.guidance_range} and "
                f"time_cond_proj_dim={getattr(model.config, 'time_cond_proj_dim', None)} (set both, or neither "
                "for a fixed guidance scale)."
            )
        decay = self.config.objective.lcm.target_ema
        return None if decay is None else TargetNetwork(model, decay, self.accelerator.device)

    # ----- one step -----------------------------------------------------------------------------------------
    def _batches(self, start_micro: int, count: int):
        sampler = PlannedBatches(
            self.plan, start_micro, self.accelerator.process_index, self.accelerator.num_processes, count
        )
        collate_fn = functools.partial(collate, pad=self.config.data.mixed_sizes, min_text_length=self.min_text_length)
        return iter(
            torch.utils.data.DataLoader(
                self.dataset,
                batch_sampler=sampler,
                collate_fn=collate_fn,
                num_workers=self.config.data.num_workers,
                pin_memory=self.accelerator.device.type == "cuda",  # page-locked: copies to the GPU overlap compute
            )
        )

    def _loss(self, batch: dict, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.accelerator.device
        share = self.config.data.batch_size
        first = self.accelerator.process_index * share
        latents = batch["latent_mean"].to(device, non_blocking=True)
        masked = self.masking is not None and self.masking.active(self.step)
        positions = list(range(first, first + share))
        sizes = batch.get("image_sizes")  # (B, 2) with data.mixed_sizes: each sample's latent size on the canvas
        shape = latents.shape[1:] if sizes is None else (latents.shape[1], *self.dataset.max_size)
        draws = sample_draws(self.config.seed, micro_step, positions, shape, device, token_mask=masked)
        if sizes is not None:  # drawn at the largest size and cropped: a sample's noise ignores its batch's canvas
            draws.update({k: draws[k][..., : latents.shape[-2], : latents.shape[-1]] for k in ("noise", "eps")})
        if batch["latent_std"] is not None and self.config.data.sample_posterior:
            latents = latents + batch["latent_std"].to(device, non_blocking=True) * draws["eps"]
        text = batch["text_embeds"].to(device, non_blocking=True)  # (B, L', C): trimmed by collate
        mask = batch["text_mask"].to(device, non_blocking=True)  # (B, L')
        control = batch.get("control_latent") if self.config.controlnet.enabled else None  # (B, C, h, w)
        if self.null_caption is not None:
            drop = draws["coin"] < self.config.data.caption_dropout  # (B,)
            text, mask = _with_caption(text, mask, self.null_caption, where=drop)
        captions = {False: (text, mask)}
        if self.uncond_caption is not None:
            captions[True] = _with_caption(text, mask, self.uncond_caption, where=torch.ones_like(draws["coin"]) > 0)
        added = _micro_conditions(self.accelerator.unwrap_model(self.model), latents)
        guidance_dim = getattr(self.accelerator.unwrap_model(self.model).config, "time_cond_proj_dim", None)

        def model_fn(noisy, t, model=self.model, uncond: bool = False, guidance=None) -> torch.Tensor:
            context, context_mask = captions[uncond]
            extra = {}
            if guidance is not None:  # an LCM student's guidance input (LCM's w = g - 1)
                extra["timestep_cond"] = guidance_scale_embedding(guidance - 1, guidance_dim).to(noisy.dtype)
            if control is not None and model is self.model:  # a ControlNet run's control latents
                extra["controlnet_cond"] = control.to(device, non_blocking=True)
            if masked and model is self.model:  # a masked step: the student sees its kept tokens only
                extra["keep_indices"] = keep_indices
            if sizes is not None and model is self.model:  # a padded mixed-size batch
                extra["image_sizes"] = sizes
            return model(
                noisy, context, t, added_cond_kwargs=added, encoder_attention_mask=context_mask, **extra
            ).sample

        networks = {}
        if masked:
            keep_indices, networks["loss_mask"] = self.masking.draw(draws["mask"])
        if sizes is not None:  # the loss ignores padding (token masking is refused with mixed sizes)
            networks["loss_mask"] = padding_mask(sizes.to(device, non_blocking=True), *latents.shape[-2:])
        if self.objective.uses_teacher:
            networks["teacher_fn"] = functools.partial(model_fn, model=self.teacher)
        if self.objective.uses_target:
            target = self.model if self.target is None else self.target.module
            networks.update(target_fn=functools.partial(model_fn, model=target), guidance_uniform=draws["guidance"])
        per_sample, _ = self.objective.loss(model_fn, latents, draws["noise"], draws["uniform"], **networks)
        return per_sample.mean(), per_sample.detach()

    def _optimizer_step(self, batches, accumulate: int) -> tuple[float, float | None]:
        losses = []
        for j in range(accumulate):
            micro = self.step * accumulate + j
            sync = j == accumulate - 1
            context = self.accelerator.no_sync(self.model) if not sync else contextlib.nullcontext()
            with context, self.accelerator.autocast():
                loss, per_sample = self._loss(next(batches), micro)
                self.accelerator.backward(loss / accumulate)
            losses.append(self.accelerator.gather(per_sample).float().mean())
        figures = [torch.stack(losses).mean()]
        if self.config.optim.grad_clip is not None:
            grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.optim.grad_clip)
            if is_sharded(grad_norm):  # FSDP2: a DTensor of per-shard partial norms, reduced on the device
                grad_norm = grad_norm.full_tensor()
            figures.append(torch.as_tensor(grad_norm, device=figures[0].device).float())
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        values = torch.stack(figures).tolist()  # the step's one read on the host (loss and gradient norm together)
        return values[0], (values[1] if len(values) > 1 else None)

    # ----- checkpoints --------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """``save_state`` plus diffusers folders of the model and its EMA, written atomically."""
        acc = self.accelerator
        tmp = checkpointing.temporary_path(self.root, self.step, clear=acc.is_main_process)
        acc.wait_for_everyone()
        acc.save_state(str(tmp / "state"))
        # save_state ends without a barrier: every process must have written its RNG state into tmp before the main
        # process renames tmp into place (a rank still writing into the moved folder crashed two-process runs).
        acc.wait_for_everyone()
        if self.sharded:
            self._save_gathered(tmp)
        final = None
        if acc.is_main_process:
            model = acc.unwrap_model(self.model)
            if not self.sharded:
                save_model(model, tmp / "model")
                if self.ema is not None:
                    with self.ema.swapped_in(model):
                        save_model(model, tmp / "model_ema")
            (tmp / "config.yaml").write_text(to_yaml(self.config))
            (tmp / "trainer_state.json").write_text(json.dumps({"step": self.step}))
            final = checkpointing.publish(self.root, tmp, self.step, self.config.checkpoints_total_limit)
        acc.wait_for_everyone()
        return final or checkpointing.checkpoint_dir(self.root) / f"checkpoint-{self.step}"

    def _save_gathered(self, tmp: Path) -> None:
        """FSDP2: ``model`` and ``model_ema`` gathered from the shards on every rank (collectives), written by the
        main process through its weightless copy of the model."""
        acc = self.accelerator
        model = acc.unwrap_model(self.model)
        folders = {"model": contextlib.nullcontext()}
        if self.ema is not None:
            folders["model_ema"] = self.ema.swapped_in(model)
        for name, context in folders.items():
            with context:
                state = acc.get_state_dict(self.model)  # full, on the main process's CPU; empty elsewhere
            if self.twin is not None:
                self.twin.load_state_dict(state, assign=True)
                save_model(self.twin, tmp / name)
        if self.twin is not None:
            self.twin.to("meta")  # drops the gathered weights

    def resume(self, resume: str) -> None:
        path = checkpointing.resolve(resume, self.root)
        self.accelerator.load_state(str(path / "state"))
        self.step = json.loads((path / "trainer_state.json").read_text())["step"]

    # ----- the loop -----------------------------------------------------------------------------------------
    def train(self) -> list[float]:
        cfg, acc = self.config, self.accelerator
        if cfg.resume:
            self.resume(cfg.resume)
        accumulate = cfg.gradient_accumulation_steps
        remaining = cfg.max_steps - self.step
        batches = self._batches(self.step * accumulate, remaining * accumulate)
        history: list[float] = []
        if acc.is_main_process:
            checkpointing.checkpoint_dir(self.root).mkdir(parents=True, exist_ok=True)
        log = (self.root / "metrics.jsonl").open("a") if acc.is_main_process else None
        progress = tqdm(total=cfg.max_steps, initial=self.step, disable=not acc.is_main_process, desc="train")
        started = time.perf_counter()
        while self.step < cfg.max_steps:
            loss, grad_norm = self._optimizer_step(batches, accumulate)
            if not math.isfinite(loss):
                raise TrainingDiverged(
                    f"Loss is {loss} at step {self.step + 1}; stopping. The last finished checkpoint in "
                    f"{checkpointing.checkpoint_dir(self.root)} is intact (resume=latest)."
                )
            self.step += 1
            if self.ema is not None:
                self.ema.update(acc.unwrap_model(self.model))
            if self.target is not None:
                self.target.update(acc.unwrap_model(self.model))
            history.append(loss)
            rate = (len(history)) / (time.perf_counter() - started)
            progress.set_postfix(loss=f"{loss:.4f}", steps_per_s=f"{rate:.2f}")
            progress.update()
            if log is not None and (self.step % cfg.log_every == 0 or self.step == cfg.max_steps):
                record = {"step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                          "grad_norm": grad_norm, "steps_per_s": rate, **self._model_stats()}  # fmt: skip
                log.write(json.dumps(record) + "\n")
                log.flush()
                acc.log({k: v for k, v in record.items() if v is not None and k != "step"}, step=self.step)
            if self.validator is not None and self.step % cfg.validation.every == 0:
                self.validate()
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps:
                self.save_checkpoint()
        progress.close()
        if log is not None:
            log.close()
        if cfg.objective.distill == "lcm" and acc.is_main_process:
            self.save_lcm_folder()
        acc.end_training()
        return history

    def _model_stats(self) -> dict[str, float]:
        """Extra figures to log: the masked share of the last step, and expert utilisation of MoE models."""
        stats = {}
        if self.masking is not None:
            stats["mask_ratio"] = self.config.masking.ratio if self.masking.active(self.step - 1) else 0.0
        routing = getattr(self.accelerator.unwrap_model(self.model), "routing_stats", None)
        if routing is not None:
            stats.update({f"moe_{key}": value for key, value in routing().items()})
        return stats

    def save_lcm_folder(self) -> Path:
        """``output_dir/lcm``: the distilled student (EMA weights when kept) as an LCM folder for
        ``dit.pipelines.load_lcm`` / ``dit generate --lcm-folder``, with its consistency scheduler."""
        from dit.pipelines.lcm import save_lcm

        lcm = self.config.objective.lcm
        model = self.accelerator.unwrap_model(self.model)
        guidance = lcm.guidance_scale if lcm.guidance_range is not None else 1.0  # fixed: guidance distilled in
        context = self.ema.swapped_in(model) if self.ema is not None else contextlib.nullcontext()
        with context:
            return save_lcm(self.root / "lcm", model, self.objective.sampling_scheduler(), guidance_scale=guidance)

    def validate(self) -> Path | None:
        """Sample the validation prompts with the EMA weights (when kept); main process only."""
        acc = self.accelerator
        if not acc.is_main_process:
            return None
        model = acc.unwrap_model(self.model)
        context = self.ema.swapped_in(model) if self.ema is not None else contextlib.nullcontext()
        with context:
            path, grid = self.validator.run(model, self.step)
        if "tensorboard" in [t.name for t in acc.trackers]:
            acc.get_tracker("tensorboard", unwrap=True).add_image("validation", grid, self.step, dataformats="HWC")
        return path


def _check_engine(accelerator: Accelerator, config: TrainConfig) -> bool:
    """Whether the model will be sharded (FSDP2); refuses what the sharded engines cannot run, and gives DeepSpeed
    the per-process batch size that no prepared dataloader tells it."""
    kind = accelerator.distributed_type
    sharded = getattr(accelerator, "is_fsdp2", False)
    if kind == DistributedType.FSDP and not sharded:
        raise ConfigError("FSDP version 1 is not supported; set fsdp_version: 2 (configs/accelerate/fsdp2.yaml).")
    if sharded and config.validation.every:
        raise ConfigError(
            "validation.every: sampling runs on the main process alone, which an FSDP2-sharded model cannot; set "
            "validation.every=0 and sample the checkpoints' model_ema folders."
        )
    if sharded and config.objective.distill == "lcm":
        raise ConfigError(
            "objective.distill=lcm: the target network and the lcm folder need the whole student on one process; "
            "run LCM distillation with DDP (configs/accelerate/multi_gpu.yaml)."
        )
    if kind == DistributedType.DEEPSPEED:
        if config.gradient_accumulation_steps != 1:
            raise ConfigError(
                "gradient_accumulation_steps: under DeepSpeed the engine steps inside backward; keep it at 1 (and "
                "gradient_accumulation_steps: 1 in the accelerate config's deepspeed_config)."
            )
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.data.batch_size
    return sharded


def _tracker(report_to: str) -> str | None:
    """accelerate's ``log_with``: TensorBoard when asked for and installed (else metrics.jsonl only)."""
    if report_to in ("none", "", None):
        return None
    if report_to != "tensorboard":
        raise ConfigError(f"report_to: {report_to!r} is not supported; use 'tensorboard' or 'none'.")
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        import warnings

        warnings.warn(
            "report_to=tensorboard but tensorboard is not installed; logging to metrics.jsonl only.", stacklevel=3
        )
        return None
    return "tensorboard"


def _to_device(caption: tuple | None, device: torch.device) -> tuple | None:
    """A ``(features, mask or None)`` caption on ``device`` (once, at setup: no step copies it)."""
    return None if caption is None else tuple(None if t is None else t.to(device) for t in caption)


def _with_caption(text, mask, caption, where: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``text``/``mask`` (B, L, C)/(B, L) with ``caption`` = (L0 >= L, C) features and an (L0,) mask or None (keep
    the prompt's mask) substituted where ``where`` (B,) is true. The batch's text was trimmed to ``L`` on the host
    (:func:`~dit.text_padding.trim_text_padding`); the caption is cut to match, which is exact when its mask keeps
    no token past ``L`` (an empty caption keeps one) and, with no mask of its own, always."""
    null_text, null_mask = caption
    length = text.shape[1]
    text = torch.where(where[:, None, None], null_text[:length].to(text.dtype), text)
    if null_mask is not None:
        mask = torch.where(where[:, None], null_mask[:length].to(mask.dtype), mask)
    return text, mask


def _micro_conditions(model, latents: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """PixArt-α micro-conditions from the latent size (image pixels = latent x 8)."""
    if not getattr(model, "use_additional_conditions", False):
        return {"resolution": None, "aspect_ratio": None}
    batch, height, width = latents.shape[0], latents.shape[-2] * 8, latents.shape[-1] * 8
    like = {"dtype": latents.dtype, "device": latents.device}  # filled on the device: no host-to-device copy
    resolution = torch.cat([torch.full((batch, 1), height, **like), torch.full((batch, 1), width, **like)], dim=1)
    return {"resolution": resolution, "aspect_ratio": torch.full((batch, 1), height / width, **like)}

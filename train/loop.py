"""The one training loop: accelerate, pluggable objectives, EMA, atomic checkpoints, exact resume."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import time
import warnings
import weakref
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed
from safetensors.torch import load_file
from tqdm.auto import tqdm

from dit.models.base import compile_repeated_blocks
from dit.nn.embeddings import guidance_scale_embedding
from dit.nn.text_padding import trimmed_text_length

from . import checkpointing
from .config import ConfigError, TrainConfig, to_yaml, validate
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
from .engine import _check_engine, _tracker
from .masking import build_masking
from .model_setup import OBJECTIVE_OF, _prediction_of, _teacher, build_model, recorded_prediction, save_model
from .objectives import build_objective
from .run_outputs import save_lcm_folder, save_pipeline
from .step_inputs import _micro_conditions, _to_device, _with_caption, sample_draws
from .validation import Validator, resolve_validation_pipeline


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last finished checkpoint is left as it was."""


class Trainer:
    """Trains a backbone from a :class:`TrainConfig`; ``train()`` returns the logged loss of every step."""

    def __init__(self, config: TrainConfig):
        self.config = validate(config)
        self.root = Path(config.output_dir)
        # cpu=True without CUDA: several processes (torchrun or `accelerate launch --multi_gpu`) then run
        # accelerate's MULTI_CPU mode over gloo; accelerate's own `--cpu` launcher starts one process unless MPI.
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision=config.mixed_precision,
            log_with=_tracker(config.report_to),
            project_config=ProjectConfiguration(project_dir=str(self.root), logging_dir=str(self.root / "logs")),
        )
        self.lock = self._claim_output_dir()
        weakref.finalize(self, self.lock.release)  # a Trainer dropped without train() frees its output_dir too
        try:
            self._setup(config)
        except BaseException:
            self.lock.release()
            raise

    def _claim_output_dir(self) -> checkpointing.RunLock:
        """The main process locks ``output_dir`` and refuses (or, with ``overwrite``, clears) a previous run; every
        process raises the same error when it fails."""
        lock, outcome = checkpointing.RunLock(self.root), [None]
        if self.accelerator.is_main_process:
            try:
                lock.acquire()
                checkpointing.prepare_output_dir(self.root, self.config.resume, self.config.overwrite)
            except (ConfigError, checkpointing.RunLocked, OSError) as error:
                lock.release()
                outcome = [error]
        broadcast_object_list(outcome)
        if outcome[0] is not None:
            raise outcome[0]
        return lock

    def release(self) -> None:
        """Free ``output_dir`` for another run (``train`` does at its end, and on any error)."""
        self.lock.release()

    def _setup(self, config: TrainConfig) -> None:
        set_seed(config.seed)  # the initial weights; every later draw comes from sample_draws
        self.model = build_model(config)
        resolve_validation_pipeline(config)
        if config.compile:
            # regional and in place: parameter names (EMA, checkpoints) stay; a graph break is an error
            compile_repeated_blocks(self.model, fullgraph=True, backend=config.compile_backend)
        self.objective = build_objective(config.objective)
        self._check_base_objective()
        self.teacher = _teacher(config.objective.distill_teacher, self.accelerator.device)
        self.masking = build_masking(config, self.model, self.objective)
        if config.data.source != "features":
            raise ConfigError(
                f"data.source={config.data.source!r}: the loop trains from feature shards; turn images into them "
                "with `dit extract DATA --source imagefolder|webdataset|hf --pipeline P --out D`, then data.path=D."
            )
        self.dataset = FeatureDataset(config.data.path)
        self._check_latent_channels()
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
        if self.accelerator.log_with:  # last: a setup error leaves no logs behind
            self.accelerator.init_trackers("dit")

    def _check_latent_channels(self) -> None:
        """The feature shards' latent channels must be the model's ``in_channels``."""
        expected = getattr(self.model.config, "in_channels", None)
        found = sorted({size[0] for size in self.dataset.sizes})
        if expected is not None and found != [expected]:
            raise ConfigError(
                f"data.path={self.config.data.path!r}: the features have {', '.join(map(str, found))} latent "
                f"channels, but {self.config.model.cls} takes in_channels={expected}. Use features extracted with a "
                f"VAE of {expected} latent channels, or set model.kwargs.in_channels (and out_channels) to match."
            )

    def _check_base_objective(self) -> None:
        """The objective should train what ``model.pretrained`` was trained to predict (as its pipeline folder's
        scheduler records it): an error for a frozen base (ControlNet), a warning when fine-tuning."""
        recorded = recorded_prediction(self.config.model.pretrained) if self.config.model.pretrained else None
        if recorded is None:
            return
        sampler = self.objective.sampling_scheduler()
        ours = _prediction_of(type(sampler).__name__, sampler.config.get("prediction_type"))
        if recorded[0] == ours:
            return
        name, base = self.config.objective.name, self.config.model.pretrained
        message = (
            f"objective.name={name} trains prediction_type={ours!r}, but the base model.pretrained={base} was "
            f"trained for prediction_type={recorded[0]!r} ({recorded[1]}); objective.name="
            f"{OBJECTIVE_OF.get(recorded[0], '?')} trains that"
        )
        if self.config.controlnet.enabled:
            raise ConfigError(f"{message}. A ControlNet adapter on a frozen base must train the base's objective.")
        warnings.warn(f"{message}; fine-tuning to another objective has to unlearn the base's first.", stacklevel=4)

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
        """``save_state`` plus diffusers folders of the model and its EMA, written atomically. A full disk removes the
        half-written folder and raises :class:`~dit.train.checkpointing.NoSpaceLeft` (the last checkpoint stays)."""
        tmp = checkpointing.temporary_path(self.root, self.step, clear=self.accelerator.is_main_process)
        try:
            return self._write_checkpoint(tmp)
        except Exception as error:
            if not checkpointing.is_disk_full(error):
                raise
            raise checkpointing.no_space(self.root, tmp, self.step) from error

    def _write_checkpoint(self, tmp: Path) -> Path:
        acc = self.accelerator
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
            # overwrite was done at the start; the saved config resumes (resume and overwrite exclude each other)
            (tmp / "config.yaml").write_text(to_yaml(dataclasses.replace(self.config, overwrite=False)))
            checkpointing.write_trainer_state(tmp, self.root, self.step)
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

    def resume(self, resume: str) -> Path:
        """Load a checkpoint (a path, or ``latest``) and continue from its step. ``latest`` falls back to the newest
        checkpoint that loads, with a warning naming each one skipped and why; returns the one loaded."""
        candidates, skipped = checkpointing.resume_candidates(resume, self.root)
        for path in candidates:
            try:
                self.step = self._load_checkpoint(path)
            except checkpointing.CheckpointError as error:
                if resume != checkpointing.LATEST:
                    raise
                skipped.append(str(error))
                continue
            if skipped:
                warnings.warn(f"resume=latest skipped {'; '.join(skipped)}; resuming from {path}.", stacklevel=4)
            return path
        folder = checkpointing.checkpoint_dir(self.root)
        raise FileNotFoundError(f"resume=latest: {'; '.join(skipped)}; no checkpoint in {folder} loads.")

    def _load_checkpoint(self, path: Path) -> int:
        step = checkpointing.verify(path)
        try:
            self.accelerator.load_state(str(path / "state"))
        except Exception as error:  # reported with the folder; an older checkpoint may load
            raise checkpointing.CheckpointError(f"{path / 'state'}: {type(error).__name__}: {error}") from error
        return step

    # ----- the loop -----------------------------------------------------------------------------------------
    def train(self) -> list[float]:
        """Train to ``max_steps`` (from ``resume`` when set), then write ``output_dir/pipeline``; returns the logged
        loss of every step. ``output_dir`` is locked until it returns or raises."""
        if self.accelerator.is_main_process and not self.lock.held:
            self.lock.acquire()
        try:
            return self._train()
        finally:
            self.release()

    def _train(self) -> list[float]:
        cfg, acc = self.config, self.accelerator
        if cfg.resume:
            self.resume(cfg.resume)
        accumulate = cfg.gradient_accumulation_steps
        remaining = cfg.max_steps - self.step
        batches = self._batches(self.step * accumulate, remaining * accumulate)
        history: list[float] = []
        if acc.is_main_process:
            checkpointing.checkpoint_dir(self.root).mkdir(parents=True, exist_ok=True)
            checkpointing.truncate_metrics(self.root, self.step)  # the steps a resume repeats are logged again
        log = (self.root / checkpointing.METRICS).open("a") if acc.is_main_process else None
        world, batch = acc.num_processes, cfg.data.batch_size * acc.num_processes * accumulate
        scale = {"world_size": world, "global_batch": batch}  # in the first record this run writes
        desc = f"train ({world} process{'es' if world > 1 else ''}, global batch {batch})"
        progress = tqdm(total=cfg.max_steps, initial=self.step, disable=not acc.is_main_process, desc=desc)
        started = time.perf_counter()
        while self.step < cfg.max_steps:
            loss, grad_norm = self._optimizer_step(batches, accumulate)
            if not math.isfinite(loss):
                raise TrainingDiverged(f"Loss is {loss} at step {self.step + 1}; stopping. {self._last_checkpoint()}")
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
                          "grad_norm": grad_norm, "steps_per_s": rate, **self._model_stats(), **scale}  # fmt: skip
                scale = {}
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
        if acc.is_main_process:
            self.save_pipeline()
        acc.end_training()
        return history

    def _last_checkpoint(self) -> str:
        """What a stopped run leaves to resume from, in words."""
        latest = checkpointing.latest_name(self.root)
        if latest is None:
            return "No checkpoint was finished yet: nothing to resume from (start again with overwrite=true)."
        path = checkpointing.checkpoint_dir(self.root) / latest
        return f"The last finished checkpoint, {path}, is intact (resume=latest)."

    def _model_stats(self) -> dict[str, float]:
        """Extra figures to log: the masked share of the last step, and expert utilisation of MoE models."""
        stats = {}
        if self.masking is not None:
            stats["mask_ratio"] = self.config.masking.ratio if self.masking.active(self.step - 1) else 0.0
        routing = getattr(self.accelerator.unwrap_model(self.model), "routing_stats", None)
        if routing is not None:
            stats.update({f"moe_{key}": value for key, value in routing().items()})
        return stats

    def save_pipeline(self) -> Path | None:
        """``output_dir/pipeline`` (see :func:`dit.train.run_outputs.save_pipeline`)."""
        return save_pipeline(self)

    def save_lcm_folder(self) -> Path:
        """``output_dir/lcm`` (see :func:`dit.train.run_outputs.save_lcm_folder`)."""
        return save_lcm_folder(self)

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

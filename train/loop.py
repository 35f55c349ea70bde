"""The one training loop: accelerate, pluggable objectives and features, EMA, atomic checkpoints, exact resume.

What a run adds to plain training (token masking, mixed sizes, ControlNet, a distillation objective) comes in as
:class:`~dit.train.features.base.Feature` plug-ins; the loop calls their hooks alike and names none of them.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import sys
import time
import weakref
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from safetensors.torch import load_file
from tqdm.auto import tqdm

from dit.models.base import compile_repeated_blocks
from dit.models.capabilities import capability
from dit.nn.text_padding import trimmed_text_length

from .config import ConfigError, TrainConfig, validate
from .data.batch_plan import BatchPlan, PlannedBatches
from .data.buckets import Batching, bucketed
from .data.dataset import NULL_CAPTION_FILE, FeatureDataset, collate, feature_files
from .data.step_inputs import _to_device, _with_caption, call_network, sample_draws
from .ema import EMA, is_sharded
from .engine import _check_engine, _tracker
from .features.base import StepInputs, check_features, merge
from .model_setup import build_backbone, build_features, check_base_objective, wrap_model
from .objectives.build import build_objective
from .optim import build_optimizer, lr_factor
from .precision import MasterWeights, full_precision, master_weights
from .run.checkpointing import METRICS, checkpoint_dir, truncate_metrics
from .run.folder import RunFolder
from .run.interrupts import InterruptGuard, TrainingInterrupted
from .run.loss_plot import save_loss_plot
from .run.outputs import RunOutputs, encoders_source
from .run.validation import Validator, resolve_validation_pipeline


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last finished checkpoint is left as it was."""


class Trainer(RunFolder, RunOutputs):
    """Trains a backbone from a :class:`TrainConfig`; ``train()`` returns the logged loss of every step.

    ``model`` is what trains (as accelerate prepared it), ``backbone`` the base backbone inside it (unwrapped: a
    ControlNet run's frozen base), ``features`` the run's plug-ins (the objective among them when it distils).
    """

    interrupts: InterruptGuard | None = None  # while train() runs
    masters: MasterWeights | None = None  # mixed_precision_weights=bf16: the fp32 masters of the bf16 weights
    stop_agreed = False  # set by each step in train(): every process stops after it (a signal reached one of them)

    def __init__(self, config: TrainConfig):
        self.config = validate(config)
        if config.data.source == "features":
            feature_files(config.data.path)  # missing data is said first, before what validation would need of it
        encoders_source(config)  # output_dir/pipeline can be complete: checked before anything is written
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

    # ----- setup --------------------------------------------------------------------------------------------
    def _setup(self, config: TrainConfig) -> None:
        set_seed(config.seed)  # the initial weights; every later draw comes from sample_draws
        self.objective = build_objective(config.objective)
        self.backbone = build_backbone(config, self.objective)  # its config records the objective's prediction
        self.features = build_features(config, self.backbone, self.objective)
        check_features(self.features, self.backbone)
        self.model = wrap_model(self.backbone, self.features)
        resolve_validation_pipeline(config)
        if config.compile:
            # regional and in place: parameter names (EMA, checkpoints) stay; a graph break is an error
            compile_repeated_blocks(self.model, fullgraph=True, backend=config.compile_backend)
        check_base_objective(config, self.objective, frozen_base=any(f.freezes_base for f in self.features))
        self._load_data(config)
        self.masters = master_weights(self.model, config, self.accelerator)  # bf16 compute weights: fp32 masters
        masters = self.masters.masters if self.masters is not None else None
        self.optimizer = build_optimizer(self.model, config, self.accelerator.device, masters)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, functools.partial(lr_factor, config))
        self.sharded = _check_engine(self.accelerator, config)
        # FSDP2 shards the model in place: the main process keeps a weightless copy to write full diffusers folders
        keep_twin = self.sharded and self.accelerator.is_main_process
        self.twin = copy.deepcopy(self.model).to("meta") if keep_twin else None
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        with full_precision(self.masters):  # the EMA and a target network start from (and follow) the fp32 masters
            self._prepare_beside_the_model(config)
        self.validator = None
        if config.validation.every:
            self.validator = Validator(config.validation, self.root, self.objective.sampling_scheduler())
        self.step = 0
        if self.accelerator.log_with:  # last: a setup error leaves no logs behind
            self.accelerator.init_trackers("dit")

    def _load_data(self, config: TrainConfig) -> None:
        if config.data.source != "features":
            raise ConfigError(
                f"data.source={config.data.source!r}: the loop trains from feature shards; turn images into them "
                "with `dit extract DATA --source imagefolder|webdataset|hf --pipeline P --out D`, then data.path=D."
            )
        self.dataset = FeatureDataset(config.data.path)
        self._check_latent_channels()
        global_batch = config.data.batch_size * self.accelerator.num_processes
        self.batching = self._batching(global_batch)
        self.plan = BatchPlan(self.batching.buckets, global_batch, config.seed)
        if self.accelerator.is_main_process:
            print(self.batching.summary, file=sys.stderr)

    def _batching(self, global_batch: int) -> Batching:
        """How the samples are batched: as a feature decides (at most one may), else one latent size per batch."""
        decided = [(f, b) for f in self.features if (b := f.batching(self.dataset, global_batch)) is not None]
        if len(decided) > 1:
            raise ConfigError(f"{' and '.join(f.label for f, _ in decided)} each decide the batching; turn one off.")
        return decided[0][1] if decided else bucketed(self.dataset, global_batch)

    def _check_latent_channels(self) -> None:
        """The feature shards' latent channels must be the model's ``in_channels``."""
        expected = getattr(self.backbone.config, "in_channels", None)
        found = sorted({size[0] for size in self.dataset.sizes})
        if expected is not None and found != [expected]:
            raise ConfigError(
                f"data.path={self.config.data.path!r}: the features have {', '.join(map(str, found))} latent "
                f"channels, but {self.config.model.cls} takes in_channels={expected}. Use features extracted with a "
                f"VAE of {expected} latent channels, or set model.kwargs.in_channels (and out_channels) to match."
            )

    def _prepare_beside_the_model(self, config: TrainConfig) -> None:
        """Everything kept beside the model is made from the placed model, or moved to its device, here, once; the
        EMA is registered for checkpoints before what the features keep (the order of older checkpoints)."""
        device = self.accelerator.device
        self.objective.to(device)
        for feature in self.features:
            feature.prepare(self)
        null_caption = self.empty_caption(self.backbone) if config.data.caption_dropout > 0 else None
        substituted = {name: c for f in self.features for name, c in f.captions().items() if c is not None}
        # the text of every batch is trimmed to a few fixed lengths, never below what a substituted caption keeps
        masks = [c[1] for c in (null_caption, *substituted.values()) if c is not None and c[1] is not None]
        self.min_text_length = max((trimmed_text_length(m[None]) for m in masks), default=0)
        # a backbone that reads every text token without a mask (the original MicroDiT) gets them all, unmasked
        self.reads_text_mask = bool(capability(self.backbone, "uses_text_mask"))
        if not self.reads_text_mask:
            self.min_text_length = sys.maxsize
        self.null_caption = _to_device(null_caption, device)
        self.substituted = {name: _to_device(c, device) for name, c in substituted.items()}
        unwrapped = self.accelerator.unwrap_model(self.model)
        self.ema = EMA(unwrapped, config.ema_decay) if config.ema_decay is not None else None
        self.accelerator.register_for_checkpointing(self.scheduler)
        states = [self.ema] if self.ema is not None else []
        for state in states + [s for f in self.features for s in f.checkpoint_states()]:
            self.accelerator.register_for_checkpointing(state)

    def empty_caption(self, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The unconditional caption (caption dropout, a teacher's CFG branch): ``model``'s learned null caption,
        else the extracted empty caption (``None`` mask: keep the prompt's mask, as PixArt's inference does)."""
        length = self.dataset[0]["text_embeds"].shape[0]
        model = self.accelerator.unwrap_model(model)
        if capability(model, "has_null_caption"):
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

    # ----- what tests and tools read ------------------------------------------------------------------------
    @property
    def teacher(self) -> torch.nn.Module | None:
        """The distillation teacher the objective keeps, or None."""
        return getattr(self.objective, "teacher", None)

    @property
    def target(self) -> EMA | None:
        """The target network the objective keeps (an :class:`EMA` with ``module``), or None."""
        return getattr(self.objective, "target", None)

    @property
    def uncond_caption(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The unconditional caption a feature substitutes for a network's ``uncond`` branch, on the device."""
        return self.substituted.get("uncond")

    # ----- one step -----------------------------------------------------------------------------------------
    def _batches(self, start_micro: int, count: int):
        sampler = PlannedBatches(
            self.plan, start_micro, self.accelerator.process_index, self.accelerator.num_processes, count
        )
        collate_fn = functools.partial(collate, pad=self.batching.pad, min_text_length=self.min_text_length)
        return iter(
            torch.utils.data.DataLoader(
                self.dataset,
                batch_sampler=sampler,
                collate_fn=collate_fn,
                num_workers=self.config.data.num_workers,
                pin_memory=self.accelerator.device.type == "cuda",  # page-locked: copies to the GPU overlap compute
            )
        )

    def _draws(self, latents: torch.Tensor, micro_step: int) -> dict[str, torch.Tensor]:
        """The micro-step's per-sample draws; with a batching's ``draw_size`` they are drawn at that size and cropped
        to the batch, so that a sample's noise ignores its batch's canvas."""
        share = self.config.data.batch_size
        first = self.accelerator.process_index * share
        canvas = self.batching.draw_size
        shape = (latents.shape[1], *canvas) if canvas is not None else latents.shape[1:]
        token_grid = any(f.needs_token_draws(self.step) for f in self.features)
        draws = sample_draws(self.config.seed, micro_step, list(range(first, first + share)), shape,
                             self.accelerator.device, token_mask=token_grid)  # fmt: skip
        if canvas is not None:
            draws.update({k: draws[k][..., : latents.shape[-2], : latents.shape[-1]] for k in ("noise", "eps")})
        return draws

    def _captions(self, batch: dict, draws: dict[str, torch.Tensor]) -> dict[bool, tuple]:
        """The step's text by ``uncond``: the batch's (with caption dropout), and a substituted unconditional one."""
        device = self.accelerator.device
        text = batch["text_embeds"].to(device, non_blocking=True)  # (B, L', C): trimmed by collate
        mask = batch["text_mask"].to(device, non_blocking=True)  # (B, L')
        if self.null_caption is not None:
            drop = draws["coin"] < self.config.data.caption_dropout  # (B,)
            text, mask = _with_caption(text, mask, self.null_caption, where=drop)
        captions = {False: (text, mask)}
        if self.uncond_caption is not None:
            captions[True] = _with_caption(text, mask, self.uncond_caption, where=torch.ones_like(draws["coin"]) > 0)
        if not self.reads_text_mask:
            return {uncond: (text, None) for uncond, (text, _) in captions.items()}
        return captions

    def _loss(self, batch: dict, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.accelerator.device
        latents = batch["latent_mean"].to(device, non_blocking=True)
        draws = self._draws(latents, micro_step)
        if batch["latent_std"] is not None and self.config.data.sample_posterior:
            latents = latents + batch["latent_std"].to(device, non_blocking=True) * draws["eps"]
        call = functools.partial(call_network, captions=self._captions(batch, draws))
        inputs = StepInputs(self.step, batch, latents, draws)
        step = merge([feature.contribute(inputs) for feature in self.features])
        student = functools.partial(call, self.model, **step.student)  # teachers and targets get no student feature
        per_sample, _ = self.objective.step_loss(student, call, latents, draws, step.loss_mask)
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
        if self.masters is not None:
            self.masters.grads_to_masters()  # the step's bf16 gradients, in fp32 on the masters
        params = self.masters.masters if self.masters is not None else self.model.parameters()
        if self.config.optim.grad_clip is not None:
            grad_norm = self.accelerator.clip_grad_norm_(params, self.config.optim.grad_clip)
            if is_sharded(grad_norm):  # FSDP2: a DTensor of per-shard partial norms, reduced on the device
                grad_norm = grad_norm.full_tensor()
            figures.append(torch.as_tensor(grad_norm, device=figures[0].device).float())
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.masters is not None:
            self.masters.refresh()  # the bf16 compute weights from the stepped masters, in one multi-tensor copy
        if self.interrupts is not None:  # in train(): whether any process got SIGINT/SIGTERM, read with the figures
            stop = self.interrupts.flag(figures[0].device, self.accelerator.num_processes)
            if stop is not None:
                figures.append(stop)
            else:
                self.stop_agreed = self.interrupts.requested  # one process: its own flag, on the host
        return torch.stack(figures)  # not read here: _read_figures reads it after the next step was launched

    def _read_figures(self, figures: torch.Tensor) -> tuple[float, float | None]:
        """A step's (loss, gradient norm) on the host: the step's one read (a sync on CUDA). Under several processes
        the all-reduced interrupt flag read with them sets :attr:`stop_agreed`."""
        values = figures.tolist()
        if self.interrupts is not None and self.accelerator.num_processes > 1:  # InterruptGuard.flag's last figure
            self.stop_agreed = bool(values.pop())
        return values[0], (values[1] if self.config.optim.grad_clip is not None else None)

    # ----- the loop -----------------------------------------------------------------------------------------
    def train(self) -> list[float]:
        """Train to ``max_steps`` (from ``resume`` when set), then write ``output_dir/pipeline``; returns the logged
        loss of every step. ``output_dir`` is locked until it returns or raises."""
        if self.accelerator.is_main_process and not self.lock.held:
            self.lock.acquire()
        self.stop_agreed = False
        try:
            # SIGINT/SIGTERM: stop after the step in flight with a checkpoint (dit.train.run.interrupts); a second
            # signal stops a single process at once (launchers of several forward the first one again)
            abort = self._aborted if self.accelerator.num_processes == 1 else None
            with InterruptGuard(abort) as self.interrupts:
                return self._train()
        finally:
            self.interrupts = None  # the previous signal handlers are back
            self.release()

    def _aborted(self, signum: int) -> TrainingInterrupted:
        """What a second SIGINT/SIGTERM raises: the run stops at once, without a checkpoint of this step."""
        message = f"interrupted again at step {self.step}: stopped without saving it. {self._last_checkpoint()}"
        return TrainingInterrupted(self.step, signum, message)

    def _stop(self, log, progress) -> TrainingInterrupted:
        """After an interrupted step: its checkpoint (every process), the logs closed; the exception to raise."""
        self.save_checkpoint()
        progress.close()
        if log is not None:
            log.close()
        self.accelerator.end_training()  # trackers flush what they logged
        return self.interrupts.stop(self.step, report=self.accelerator.is_main_process)

    def _train(self) -> list[float]:
        """The loop. Each step's loss is read on the host one step late, after the next step was launched (no host
        sync per step on CUDA), so the progress bar and the log show it then; it is read at once before anything is
        saved (a checkpoint, a validation grid, the stop of an interrupt, the end), so a non-finite loss stops the run
        at its step before any weights updated from it are written."""
        cfg, acc = self.config, self.accelerator
        if cfg.resume:
            with full_precision(self.masters, writes=True):  # a checkpoint's fp32 weights load into the masters
                self.resume(cfg.resume)
        accumulate = cfg.gradient_accumulation_steps
        batches = self._batches(self.step * accumulate, (cfg.max_steps - self.step) * accumulate)
        history: list[float] = []
        log = self._open_metrics()
        world, batch = acc.num_processes, cfg.data.batch_size * acc.num_processes * accumulate
        scale = {"world_size": world, "global_batch": batch}  # in the first record this run writes
        desc = f"train ({world} process{'es' if world > 1 else ''}, global batch {batch})"
        progress = tqdm(total=cfg.max_steps, initial=self.step, disable=not acc.is_main_process, desc=desc)
        started = time.perf_counter()

        def read(step: int, figures: torch.Tensor, lr: float) -> None:
            """Step ``step``'s figures on the host: the NaN stop, the history, the progress bar and the log."""
            nonlocal scale
            loss, grad_norm = self._read_figures(figures)
            if not math.isfinite(loss):
                raise TrainingDiverged(f"Loss is {loss} at step {step}; stopping. {self._last_checkpoint()}")
            history.append(loss)
            rate = len(history) / (time.perf_counter() - started)
            progress.set_postfix(loss=f"{loss:.4f}", steps_per_s=f"{rate:.2f}")
            progress.update()
            record = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "steps_per_s": rate}
            scale = self._log_step(log, step, record, scale)

        unread = None  # the last step's (step, figures on the device, lr), read after the next step is launched
        while self.step < cfg.max_steps:
            figures = self._optimizer_step(batches, accumulate)
            self.step += 1
            self._follow(acc.unwrap_model(self.model))
            if unread is not None:
                read(*unread)
            unread = (self.step, figures, self.scheduler.get_last_lr()[0])
            validating = self.validator is not None and (
                self.step % cfg.validation.every == 0 or self.step == cfg.max_steps
            )  # and at the last step: a run shorter than validation.every shows a grid too
            saving = self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps
            if self.stop_agreed or validating or saving:  # nothing is saved before its step's loss was read
                read(*unread)
                unread = None
            if self.stop_agreed:  # every process agreed on this step: save it and stop
                raise self._stop(log, progress)
            if validating:
                self.validate()
            if saving:
                self.save_checkpoint()
        if unread is not None:
            read(*unread)
        progress.close()
        if log is not None:
            log.close()
        self._finish()
        return history

    def _open_metrics(self):
        """``metrics.jsonl`` opened for appending on the main process (None elsewhere), without the rows of the
        steps a resume repeats (they are logged again)."""
        if not self.accelerator.is_main_process:
            return None
        checkpoint_dir(self.root).mkdir(parents=True, exist_ok=True)
        truncate_metrics(self.root, self.step)
        return (self.root / METRICS).open("a")

    def _log_step(self, log, step: int, figures: dict, scale: dict) -> dict:
        """On a logging step, write step ``step``'s record (``figures``, the features' and the model's stats, and
        ``scale`` once) to ``log`` and the tracker; returns the ``scale`` still to write."""
        cfg = self.config
        if log is None or not (step % cfg.log_every == 0 or step == cfg.max_steps):
            return scale
        record = {"step": step, **figures, **self._model_stats(step), **scale}
        log.write(json.dumps(record) + "\n")
        log.flush()
        self.accelerator.log({k: v for k, v in record.items() if v is not None and k != "step"}, step=step)
        return {}

    def _finish(self) -> None:
        """The end of a run: the features' exports, ``output_dir/pipeline`` and ``loss.png`` (main process), then the
        trackers."""
        if self.accelerator.is_main_process:
            with full_precision(self.masters):  # the exports and the pipeline hold the fp32 masters
                for feature in self.features:
                    feature.export(self)
                if self.config.pipeline:
                    self.save_pipeline()
            save_loss_plot(self.root)
        self.accelerator.end_training()

    def _follow(self, model: torch.nn.Module) -> None:
        """After an optimizer step: the EMA, then whatever the features keep, follow ``model`` (unwrapped; its fp32
        masters when it computes in bf16)."""
        with full_precision(self.masters):
            if self.ema is not None:
                self.ema.update(model)
            for feature in self.features:
                feature.after_optimizer_step(model)

    def save_checkpoint(self) -> Path:
        """:meth:`RunFolder.save_checkpoint <dit.train.run.folder.RunFolder.save_checkpoint>`; of the fp32 masters
        when the model computes in bf16 (the same files as an fp32 run's: a resume continues exactly)."""
        with full_precision(self.masters):
            return super().save_checkpoint()

    def _model_stats(self, step: int) -> dict[str, float]:
        """Extra figures to log after step ``step``: the features' (the masked share of the step), and expert
        utilisation of MoE models (of the last forward)."""
        stats = {}
        for feature in self.features:
            stats.update(feature.stats(step))
        routing = getattr(self.accelerator.unwrap_model(self.model), "routing_stats", None)
        if routing is not None:
            stats.update({f"moe_{key}": value for key, value in routing().items()})
        return stats

    def validate(self) -> Path | None:
        """Sample the validation prompts with the EMA weights (when kept); main process only."""
        acc = self.accelerator
        if not acc.is_main_process:
            return None
        model = acc.unwrap_model(self.model)
        context = self.ema.swapped_in(model) if self.ema is not None else contextlib.nullcontext()
        with full_precision(self.masters), context:
            path, grid = self.validator.run(model, self.step)
        if "tensorboard" in [t.name for t in acc.trackers]:
            acc.get_tracker("tensorboard", unwrap=True).add_image("validation", grid, self.step, dataformats="HWC")
        return path

"""The trainer's run folder: claiming ``output_dir``, writing checkpoints atomically (``state/`` from accelerate,
``model/`` and ``model_ema/`` diffusers folders, ``config.yaml``, ``trainer_state.json``) and resuming from them.

:class:`RunFolder` holds these methods of :class:`~dit.train.loop.Trainer`; the file operations they build on are in
:mod:`dit.train.run.checkpointing`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import warnings
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list

from ..config import ConfigError
from ..config_io import to_yaml
from .checkpointing import (
    LATEST,
    CheckpointError,
    RunLock,
    RunLocked,
    checkpoint_dir,
    is_disk_full,
    latest_name,
    no_space,
    prepare_output_dir,
    publish,
    resume_candidates,
    start_again,
    temporary_path,
    verify,
    write_trainer_state,
)
from .loss_plot import save_loss_plot


def save_model(model: torch.nn.Module, folder: Path) -> None:
    """A diffusers folder of the model, or of its LoRA alone (``pytorch_lora_weights.safetensors``) when it has one."""
    if getattr(model, "peft_config", None):
        model.save_lora_adapter(folder)
    else:
        model.save_pretrained(folder)


class RunFolder:
    """The :class:`~dit.train.loop.Trainer`'s methods on its ``output_dir``: the lock, checkpoints and resume."""

    def _claim_output_dir(self) -> RunLock:
        """The main process locks ``output_dir`` and refuses (or, with ``overwrite``, clears) a previous run; every
        process raises the same error when it fails."""
        lock, outcome = RunLock(self.root), [None]
        if self.accelerator.is_main_process:
            try:
                lock.acquire()
                prepare_output_dir(self.root, self.config.resume, self.config.overwrite)
            except (ConfigError, RunLocked, OSError) as error:
                lock.release()
                outcome = [error]
        broadcast_object_list(outcome)
        if outcome[0] is not None:
            raise outcome[0]
        return lock

    def release(self) -> None:
        """Free ``output_dir`` for another run (``train`` does at its end, and on any error)."""
        self.lock.release()

    def save_checkpoint(self) -> Path:
        """``save_state`` plus diffusers folders of the model and its EMA, written atomically. A full disk removes the
        half-written folder and raises :class:`~dit.train.run.checkpointing.NoSpaceLeft` (the last checkpoint
        stays)."""
        tmp = temporary_path(self.root, self.step, clear=self.accelerator.is_main_process)
        try:
            return self._write_checkpoint(tmp)
        except Exception as error:
            if not is_disk_full(error):
                raise
            raise no_space(self.root, tmp, self.step) from error

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
            write_trainer_state(tmp, self.root, self.step)
            save_loss_plot(self.root, tmp)  # output_dir/loss.png refreshed, and a copy in the checkpoint
            final = publish(self.root, tmp, self.step, self.config.checkpoints_total_limit)
        acc.wait_for_everyone()
        return final or checkpoint_dir(self.root) / f"checkpoint-{self.step}"

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
        candidates, skipped = resume_candidates(resume, self.root)
        for path in candidates:
            try:
                self.step = self._load_checkpoint(path)
            except CheckpointError as error:
                if resume != LATEST:
                    raise
                skipped.append(str(error))
                continue
            if skipped:
                warnings.warn(f"resume=latest skipped {'; '.join(skipped)}; resuming from {path}.", stacklevel=4)
            if self.accelerator.is_main_process:
                print(f"resuming from checkpoint-{self.step} ({path})", file=sys.stderr, flush=True)
            return path
        raise FileNotFoundError(
            f"Nothing to resume: {'; '.join(skipped)}; no checkpoint in {checkpoint_dir(self.root)} loads. "
            f"{start_again(self.root)}"
        )

    def _load_checkpoint(self, path: Path) -> int:
        step = verify(path)
        try:
            self.accelerator.load_state(str(path / "state"))
        except Exception as error:  # reported with the folder; an older checkpoint may load
            raise CheckpointError(f"{path / 'state'}: {type(error).__name__}: {error}") from error
        return step

    def _last_checkpoint(self) -> str:
        """What a stopped run leaves to resume from, in words."""
        latest = latest_name(self.root)
        if latest is None:
            return f"No checkpoint was finished yet: nothing to resume from. {start_again(self.root)}"
        path = checkpoint_dir(self.root) / latest
        return f"The last finished checkpoint, {path}, is intact (resume=latest)."

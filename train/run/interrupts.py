"""Interrupts keep the work: SIGINT and SIGTERM during training stop the run after the optimizer step in flight, at a
step every process agrees on, with a checkpoint at that step.

:class:`InterruptGuard` replaces the two signals' handlers while :meth:`~dit.train.loop.Trainer.train` runs (and puts
the previous ones back): the first signal only raises a flag; the loop reads it once per step, folded into the step's
one read on the host (under several processes the flag is all-reduced with ``max`` first, so a signal that reached any
process stops them all at the same step), saves a checkpoint and raises :class:`TrainingInterrupted`.

A second signal to a single process stops it at once, without saving (checkpoints are written under a temporary name
and renamed, so the last finished one stays intact). Under several processes repeated signals are ignored: a launcher
(torchrun, ``accelerate launch``) forwards the terminal's Ctrl-C to processes that got it already, and gives them 30 s
before it kills them.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

import torch

#: The signals that stop a run with a checkpoint.
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """A run stopped by SIGINT or SIGTERM. ``step``: the step it stopped at; ``signal_name``: ``"SIGINT"`` or
    ``"SIGTERM"``; ``exit_code``: 128 + the signal's number (130, 143), as a shell reports a process it killed;
    ``report``: whether this process prints the message (the main process; the others exit quietly)."""

    def __init__(self, step: int, signum: int, message: str | None = None, report: bool = True):
        self.step = step
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + int(signum)
        self.report = report
        super().__init__(message or f"interrupted at step {step}; continue with resume=latest")


class InterruptGuard:
    """SIGINT and SIGTERM handlers for the duration of a ``with`` block (on the main thread; elsewhere Python cannot
    set handlers and the guard does nothing). ``on_abort`` returns the exception a second signal raises at once;
    without it, repeated signals are ignored."""

    def __init__(self, on_abort: Callable[[int], BaseException] | None = None):
        self.on_abort = on_abort
        self.signum: int | None = None  # the first signal received, if any
        self._previous: dict[int, object] = {}

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            if self.on_abort is not None:
                raise self.on_abort(signum)
            return
        self.signum = signum

    @property
    def requested(self) -> bool:
        """Whether this process received a signal."""
        return self.signum is not None

    def flag(self, device: torch.device, world_size: int) -> torch.Tensor | None:
        """Under several processes: this process's flag, all-reduced with ``max`` (every process must call it at the
        same point of the step); None under one process, where :attr:`requested` is read directly. Built on the
        device without a copy, and reduced on the device: read it with the step's other figures."""
        if world_size == 1:
            return None
        flag = torch.full((), float(self.requested), dtype=torch.float32, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return flag

    def stop(self, step: int, report: bool) -> TrainingInterrupted:
        """The exception ending a run stopped at ``step`` (its checkpoint written). A process that received no signal
        itself (another process did) reports SIGTERM, the signal a launcher forwards."""
        return TrainingInterrupted(step, self.signum or signal.SIGTERM, report=report)

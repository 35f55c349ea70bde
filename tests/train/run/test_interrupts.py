"""Interrupts keep the work (issue 29, item 2): SIGINT and SIGTERM save a checkpoint at the step reached (all processes
agreeing on it) and exit with one line; resuming says where it resumes from; shipped configs checkpoint within
``max_steps``; a failed run's messages only point at ``resume=latest`` when there is a checkpoint to resume."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dit.train import Trainer, TrainingDiverged, TrainingInterrupted, load_config
from dit.train.config import ConfigError
from dit.train.run.checkpointing import (
    LATEST,
    list_checkpoints,
    no_space,
    prepare_output_dir,
    resume_candidates,
    verify,
)
from dit.train.run.interrupts import InterruptGuard
from tests.tiny import TINY, free_port, make_features

ROOT = Path(__file__).resolve().parents[3]
SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    return make_features(tmp_path_factory.mktemp("interrupt_features"))


def _overrides(features: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.path={features}", f"output_dir={out}", "report_to=none", *extra]


def _steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


def _wait_for_steps(run: Path, processes: list[subprocess.Popen], steps: int = 2) -> None:
    """Poll ``metrics.jsonl`` until the run has logged ``steps`` steps (a started run is never left waiting)."""
    deadline = time.monotonic() + 300
    while len(_steps(run)) < steps:
        for process in processes:
            if process.poll() is not None:
                pytest.fail(f"the run ended before it was signalled: {process.communicate()[1][-3000:]}")
        assert time.monotonic() < deadline, "the run logged no step"
        time.sleep(0.05)


def _lines(stderr: str) -> list[str]:
    """stderr's lines as a terminal shows them (progress bars redraw with carriage returns)."""
    return [line.strip() for line in stderr.replace("\r", "\n").splitlines() if line.strip()]


def _assert_checkpoint_at(run: Path, step: int) -> None:
    folder = run / "checkpoints" / f"checkpoint-{step}"
    assert verify(folder) == step  # complete: every file's header and directory intact
    assert (run / "checkpoints" / LATEST).read_text() == folder.name
    assert (folder / "model").is_dir() and (folder / "state").is_dir()
    assert not list((run / "checkpoints").glob("*.tmp"))


# ----- 1, 2. a signal saves the step reached; resuming says so ------------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_a_checkpoint_and_exits_with_one_line(features, tmp_path, signum, capfd):
    """Before: a KeyboardInterrupt traceback (SIGTERM: killed silently) and no checkpoint below checkpoint_every."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "dit.train", "--config", str(TINY),
               *_overrides(features, run, "max_steps=100000", "checkpoint_every=100000")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    _wait_for_steps(run, [process])
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)

    step = _steps(run)[-1]
    assert process.returncode == EXIT_CODES[signum], stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    lines = _lines(stderr)
    assert lines[-1] == f"interrupted at step {step}; continue with resume=latest"
    assert sum("interrupted" in line for line in lines) == 1
    _assert_checkpoint_at(run, step)
    assert not (run / ".lock").exists()

    capfd.readouterr()
    resumed = Trainer(load_config(TINY, _overrides(features, run, "resume=latest", f"max_steps={step + 2}")))
    assert len(resumed.train()) == 2 and resumed.step == step + 2
    assert f"resuming from checkpoint-{step} " in capfd.readouterr().err
    assert _steps(run)[-3:] == [step, step + 1, step + 2]
    _assert_checkpoint_at(run, step + 2)


def _send_during_step(monkeypatch, step: int, *signals: signal.Signals) -> None:
    """Send ``signals`` to this process in the forward pass of optimizer step ``step`` (counted from 1)."""
    loss = Trainer._loss

    def signal_then_loss(self, batch, micro_step):
        if micro_step == step - 1:  # gradient_accumulation_steps=1
            for signum in signals:
                os.kill(os.getpid(), signum)
        return loss(self, batch, micro_step)

    monkeypatch.setattr(Trainer, "_loss", signal_then_loss)


def test_in_process_the_step_in_flight_ends_then_stops_and_the_handlers_come_back(features, tmp_path, monkeypatch):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    _send_during_step(monkeypatch, 2, signal.SIGTERM)
    trainer = Trainer(load_config(TINY, _overrides(features, tmp_path, "max_steps=50", "checkpoint_every=100")))
    with pytest.raises(TrainingInterrupted) as caught:
        trainer.train()
    error = caught.value
    assert (error.step, error.signal_name, error.exit_code) == (2, "SIGTERM", 143)
    assert str(error) == "interrupted at step 2; continue with resume=latest"
    _assert_checkpoint_at(tmp_path, 2)
    assert _steps(tmp_path) == [1, 2] and not (tmp_path / "pipeline").exists()
    assert {sig: signal.getsignal(sig) for sig in before} == before
    assert not trainer.lock.held


def test_a_second_signal_stops_a_single_process_at_once_without_saving(features, tmp_path, monkeypatch):
    """The second Ctrl-C stops at once: nothing half-written is published, and the message does not send the user
    to a checkpoint that does not exist."""
    _send_during_step(monkeypatch, 2, signal.SIGINT, signal.SIGINT)
    trainer = Trainer(load_config(TINY, _overrides(features, tmp_path, "max_steps=50", "checkpoint_every=100")))
    with pytest.raises(TrainingInterrupted, match="interrupted again at step 1") as caught:
        trainer.train()
    assert caught.value.exit_code == 130
    assert list_checkpoints(tmp_path) == []
    assert "resume=latest" not in str(caught.value) and "without resume" in str(caught.value)  # the folder is empty


def test_repeated_signals_are_ignored_when_no_abort_is_given():
    """Several processes: a launcher forwards the terminal's Ctrl-C to processes that already got it."""
    with InterruptGuard() as guard:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
    assert guard.signum == signal.SIGINT and guard.requested


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with open(task / "children") as handle:
            for child in map(int, handle.read().split()):
                found += [child, *_children(child)]
    return found


def _rank(pid: int) -> str | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((e.split(b"=", 1)[1].decode() for e in environ if e.startswith(b"RANK=")), None)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the launcher's processes through /proc")
def test_two_processes_agree_on_the_step_when_one_is_signalled(features, tmp_path):
    """SIGTERM to the second process alone: both stop after the same step and save it together."""
    run = tmp_path / "run"
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "dit.train",
               "--config", str(TINY), *_overrides(features, run, "max_steps=100000", "checkpoint_every=100000",
                                                  "data.batch_size=2")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        _wait_for_steps(run, [launcher])
        second = [pid for pid in _children(launcher.pid) if _rank(pid) == "1"]
        assert len(second) == 1
        os.kill(second[0], signal.SIGTERM)
        _, stderr = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    step = _steps(run)[-1]
    assert launcher.returncode != 0
    assert sum(f"interrupted at step {step}; continue with resume=latest" in line for line in _lines(stderr)) == 1
    _assert_checkpoint_at(run, step)
    state = run / "checkpoints" / f"checkpoint-{step}" / "state"
    assert sorted(p.name for p in state.glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]


# ----- 3. shipped configs checkpoint within max_steps -----------------------------------------------------------------
@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_configs_checkpoint_within_max_steps(path):
    config = load_config(path)
    assert config.checkpoint_every <= config.max_steps, f"{path.name}: no checkpoint before the last step"


def test_a_run_shorter_than_checkpoint_every_still_checkpoints_its_last_step(features, tmp_path):
    """The README's ``max_steps=500`` under ``checkpoint_every: 2500``."""
    Trainer(load_config(TINY, _overrides(features, tmp_path, "max_steps=2", "checkpoint_every=5"))).train()
    _assert_checkpoint_at(tmp_path, 2)


# ----- 4. messages never point in a circle ----------------------------------------------------------------------------
def _previous_run(root: Path, checkpoint: bool) -> Path:
    (root / "checkpoints").mkdir(parents=True)
    (root / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    if checkpoint:
        (root / "checkpoints" / "checkpoint-1").mkdir()
        (root / "checkpoints" / "checkpoint-1" / "trainer_state.json").write_text('{"step": 1}')
        (root / "checkpoints" / LATEST).write_text("checkpoint-1")
    return root


@pytest.mark.parametrize("checkpoint", [False, True], ids=["no-checkpoint", "checkpoint"])
def test_a_used_output_dir_points_at_resume_only_with_a_checkpoint(tmp_path, checkpoint):
    root = _previous_run(tmp_path / "run", checkpoint)
    with pytest.raises(ConfigError, match=r"overwrite=true") as caught:
        prepare_output_dir(root, resume=None, overwrite=False)
    assert ("resume=latest" in str(caught.value)) == checkpoint and str(root) in str(caught.value)


@pytest.mark.parametrize("checkpoint", [False, True], ids=["no-checkpoint", "checkpoint"])
def test_a_full_disk_points_at_resume_only_with_a_checkpoint(tmp_path, checkpoint):
    root = _previous_run(tmp_path / "run", checkpoint)
    message = str(no_space(root, root / "checkpoints" / "checkpoint-2.tmp", 2))
    assert ("resume=latest" in message) == checkpoint and ("overwrite=true" in message) != checkpoint


def test_resume_without_a_checkpoint_says_how_to_start_again(tmp_path):
    root = _previous_run(tmp_path / "run", checkpoint=False)
    with pytest.raises(FileNotFoundError, match=r"no finished checkpoint.*overwrite=true") as caught:
        resume_candidates(LATEST, root)
    assert "resume=latest" not in str(caught.value) and str(root) in str(caught.value)
    with pytest.raises(FileNotFoundError, match="without resume"):
        resume_candidates(LATEST, tmp_path / "empty")


def test_a_run_that_failed_before_its_first_checkpoint_is_never_sent_to_resume(features, tmp_path, monkeypatch):
    """The user's journey: the run stops before any checkpoint; every message after says start again."""
    original = Trainer._loss

    def poisoned(self, batch, micro_step):
        loss, per_sample = original(self, batch, micro_step)
        return (loss * float("nan"), per_sample) if micro_step >= 1 else (loss, per_sample)

    monkeypatch.setattr(Trainer, "_loss", poisoned)
    overrides = _overrides(features, tmp_path, "max_steps=5", "checkpoint_every=100")
    with pytest.raises(TrainingDiverged) as diverged:
        Trainer(load_config(TINY, overrides)).train()
    with pytest.raises(ConfigError) as rerun:
        Trainer(load_config(TINY, overrides))
    with pytest.raises(FileNotFoundError) as resumed:
        Trainer(load_config(TINY, [*overrides, "resume=latest"])).train()
    for error in (diverged.value, rerun.value, resumed.value):
        assert "resume=latest" not in str(error) and "overwrite=true" in str(error), error

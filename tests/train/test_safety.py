"""Nothing lost and nothing wrong is silent (issue 19, trainer items 1, 2, 7, 8, 10): the output folder, its lock,
config ranges, disk-full and corrupt files, resume fallback, and setup checks against the data and the base."""

import errno
import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dit.cli import main as cli_main
from dit.tiny import tiny_pipeline
from dit.train import Trainer, TrainingDiverged, load_config
from dit.train.config import ConfigError
from dit.train.run.checkpointing import list_checkpoints
from tests.tiny import TINY, make_features


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    return make_features(tmp_path_factory.mktemp("safety_features"))


def _config(features: Path, out: Path, *overrides: str):
    return load_config(TINY, [f"data.path={features}", f"output_dir={out}", "report_to=none", *overrides])


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _latest(run: Path) -> str:
    return (run / "checkpoints" / "latest").read_text()


def _names(run: Path) -> list[str]:
    return [p.name for p in list_checkpoints(run)]


# ----- 1. the output folder ---------------------------------------------------------------------------------------
def test_rerun_into_a_used_output_dir_is_refused(features, tmp_path):
    Trainer(_config(features, tmp_path, "max_steps=3")).train()
    with pytest.raises(ConfigError, match=r"output_dir .* holds a previous run .*resume=latest.*overwrite=true"):
        Trainer(_config(features, tmp_path, "max_steps=2"))
    assert _names(tmp_path) == ["checkpoint-3"] and _latest(tmp_path) == "checkpoint-3"  # nothing touched


def test_overwrite_empties_the_previous_run(features, tmp_path):
    Trainer(_config(features, tmp_path, "max_steps=6")).train()
    Trainer(_config(features, tmp_path, "max_steps=2", "checkpoint_every=1", "overwrite=true")).train()
    assert _names(tmp_path) == ["checkpoint-1", "checkpoint-2"] and _latest(tmp_path) == "checkpoint-2"
    assert _steps(tmp_path) == [1, 2]  # no row of the previous run


def test_overwrite_and_resume_exclude_each_other():
    with pytest.raises(ConfigError, match=r"overwrite=true deletes the previous run that resume='latest'"):
        load_config(TINY, ["overwrite=true", "resume=latest"])


def test_pruning_keeps_the_newest_checkpoints_and_latest(features, tmp_path):
    """A run resumed from an early checkpoint writes steps below the old run's: pruning keeps what it wrote last and
    never the checkpoint ``latest`` names (the old trainer kept the highest step numbers and deleted ``latest``)."""
    Trainer(_config(features, tmp_path, "max_steps=9", "checkpoints_total_limit=3")).train()
    early = tmp_path / "checkpoints" / "checkpoint-3"
    Trainer(_config(features, tmp_path, f"resume={early}", "max_steps=5", "checkpoint_every=1",
                    "checkpoints_total_limit=2")).train()  # fmt: skip
    assert _latest(tmp_path) == "checkpoint-5" and (tmp_path / "checkpoints" / "checkpoint-5").is_dir()
    assert _names(tmp_path) == ["checkpoint-4", "checkpoint-5"]
    assert (tmp_path / "checkpoints" / "latest-checkpoint").resolve() == (tmp_path / "checkpoints" / "checkpoint-5")


# ----- 2. one run per output folder -------------------------------------------------------------------------------
def test_a_second_trainer_on_the_same_output_dir_is_refused(features, tmp_path):
    first = Trainer(_config(features, tmp_path, "max_steps=1"))
    lock = json.loads((tmp_path / ".lock").read_text())
    assert lock["pid"] == os.getpid() and lock["hostname"] == socket.gethostname()
    with pytest.raises(RuntimeError, match=rf"in use by process {os.getpid()} on {socket.gethostname()}"):
        Trainer(_config(features, tmp_path, "max_steps=1"))
    first.train()
    assert not (tmp_path / ".lock").exists()  # released at the end


def test_a_stale_lock_is_taken_over_with_a_warning(features, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / ".lock").write_text(json.dumps({"pid": dead.pid, "hostname": socket.gethostname()}))
    with pytest.warns(UserWarning, match=rf"stale lock .*process {dead.pid}"):
        trainer = Trainer(_config(features, tmp_path, "max_steps=1"))
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    trainer.train()
    assert not (tmp_path / ".lock").exists()


def test_the_lock_is_held_while_training_and_released_on_an_error(features, tmp_path, monkeypatch):
    trainer, seen = Trainer(_config(features, tmp_path)), []
    original = Trainer._loss

    def poisoned(self, batch, micro_step):
        seen.append((tmp_path / ".lock").is_file())
        loss, per_sample = original(self, batch, micro_step)
        return loss * float("nan"), per_sample * float("nan")

    monkeypatch.setattr(Trainer, "_loss", poisoned)
    with pytest.raises(TrainingDiverged):
        trainer.train()
    assert seen == [True, True] and not (tmp_path / ".lock").exists()  # step 2 runs before step 1's loss is read


# ----- 7. values checked at load time -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, key",
    [
        ("data.batch_size=0", "data.batch_size"),
        ("data.batch_size=-3", "data.batch_size"),
        ("checkpoint_every=0", "checkpoint_every"),
        ("gradient_accumulation_steps=0", "gradient_accumulation_steps"),
        ("max_steps=-5", "max_steps"),
        ("data.caption_dropout=1.5", "data.caption_dropout"),
        ("ema_decay=1.5", "ema_decay"),
        ("ema_decay=1", "ema_decay"),
        ("optim.lr=0", "optim.lr"),
        ("optim.lr=.nan", "optim.lr"),
        ("log_every=0", "log_every"),
        ("checkpoints_total_limit=0", "checkpoints_total_limit"),
        ("validation.steps=0", "validation.steps"),
        ("optim.schedule=linear", "optim.schedule"),
    ],
)
def test_out_of_range_values_are_refused_at_load(override, key):
    value = override.split("=", 1)[1]
    with pytest.raises(ConfigError, match=rf"config\.{key}: .*{value.strip('.')}.* (must be|is not one of)"):
        load_config(TINY, [override])


def test_nan_stop_without_a_finished_checkpoint_says_so(features, tmp_path, monkeypatch):
    trainer = Trainer(_config(features, tmp_path, "checkpoint_every=100"))
    original = Trainer._loss

    def poisoned(self, batch, micro_step):
        loss, per_sample = original(self, batch, micro_step)
        return (loss * float("nan"), per_sample * float("nan")) if micro_step >= 1 else (loss, per_sample)

    monkeypatch.setattr(Trainer, "_loss", poisoned)
    with pytest.raises(TrainingDiverged) as caught:
        trainer.train()
    message = str(caught.value).lower()
    assert "no checkpoint was finished" in message and "intact" not in message


def test_cli_config_error_is_one_line_and_non_zero(capsys):
    code = cli_main(["train", "--config", str(TINY), "data.batch_size=0"])
    err = capsys.readouterr().err
    assert code != 0
    assert err.strip().splitlines() == [err.strip()] and err.startswith("error: config.data.batch_size: 0")
    assert "Traceback" not in err


# ----- 8. disk full, corrupt files, resume fallback, metrics ------------------------------------------------------
def _fail_second_save(monkeypatch, error: Exception):
    """The model folder of the second checkpoint fails after writing part of a file, as a full disk does."""
    from dit.train.run import folder as loop

    original, calls = loop.save_model, {"n": 0}

    def failing(model, folder):
        calls["n"] += 1
        if calls["n"] >= 3:  # checkpoint-3 wrote model and model_ema; checkpoint-6's model fails
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 1000)
            raise error
        return original(model, folder)

    monkeypatch.setattr(loop, "save_model", failing)


@pytest.mark.parametrize("wrapped", [False, True])
def test_disk_full_during_a_checkpoint(features, tmp_path, monkeypatch, wrapped):
    from safetensors import SafetensorError

    if wrapped:  # what safetensors raises for a failed write
        error = SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                                'space left on device" })')  # fmt: skip
    else:
        error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    _fail_second_save(monkeypatch, error)
    with pytest.raises(
        OSError, match=r"No space left on the device .*checkpoint-6.* checkpoint-3 is intact"
    ) as caught:
        Trainer(_config(features, tmp_path)).train()
    assert caught.value.errno == errno.ENOSPC
    assert str(tmp_path / "checkpoints") in str(caught.value)
    assert not (tmp_path / "checkpoints" / "checkpoint-6.tmp").exists()
    assert _latest(tmp_path) == "checkpoint-3" and not (tmp_path / ".lock").exists()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_resume_latest_falls_back_past_a_corrupt_checkpoint(features, tmp_path):
    full = Trainer(_config(features, tmp_path / "full")).train()
    Trainer(_config(features, tmp_path / "run")).train()
    _truncate(tmp_path / "run" / "checkpoints" / "checkpoint-6" / "state" / "model.safetensors")
    with pytest.warns(UserWarning, match=r"skipped .*checkpoint-6.*model\.safetensors.*incomplete"):
        resumed = Trainer(_config(features, tmp_path / "run", "resume=latest", "max_steps=6"))
        losses = resumed.train()
    assert losses == full[3:] and _latest(tmp_path / "run") == "checkpoint-6"
    assert _steps(tmp_path / "run") == [1, 2, 3, 4, 5, 6]  # the repeated steps' old rows were dropped


def test_an_explicit_corrupt_checkpoint_names_the_file(features, tmp_path):
    Trainer(_config(features, tmp_path, "max_steps=3")).train()
    state = tmp_path / "checkpoints" / "checkpoint-3" / "state"
    _truncate(state / "model.safetensors")
    with pytest.raises(RuntimeError, match=rf"{state / 'model.safetensors'}.*incomplete"):
        Trainer(_config(features, tmp_path, f"resume={state.parent}")).train()


def test_empty_or_dangling_latest(features, tmp_path):
    Trainer(_config(features, tmp_path, "max_steps=3")).train()
    pointer = tmp_path / "checkpoints" / "latest"
    pointer.write_text("checkpoint-99")
    with pytest.warns(UserWarning, match=r"latest names checkpoint-99, which does not exist"):
        Trainer(_config(features, tmp_path, "resume=latest", "max_steps=4")).train()
    assert _latest(tmp_path) == "checkpoint-4"
    pointer.write_text("")
    for path in list_checkpoints(tmp_path):
        _truncate(path / "trainer_state.json")
    with pytest.raises(FileNotFoundError, match=r"checkpoints/latest is empty.*no checkpoint .* loads"):
        Trainer(_config(features, tmp_path, "resume=latest", "max_steps=5")).train()


def test_metrics_have_no_duplicate_steps_after_a_resume(features, tmp_path):
    """A run killed after logging steps 4-5 but before checkpoint 6: the resume repeats steps 4-6."""
    Trainer(_config(features, tmp_path, "max_steps=5", "checkpoint_every=3")).train()
    import shutil

    shutil.rmtree(tmp_path / "checkpoints" / "checkpoint-5")
    (tmp_path / "checkpoints" / "latest").write_text("checkpoint-3")
    Trainer(_config(features, tmp_path, "resume=latest", "max_steps=6")).train()
    assert _steps(tmp_path) == [1, 2, 3, 4, 5, 6]


def test_a_truncated_feature_shard_names_the_file(tmp_path):
    folder = make_features(tmp_path / "f")
    shard = folder / "shard-001.safetensors"
    _truncate(shard)
    with pytest.raises(ValueError, match=rf"{shard}.*(incomplete|truncated)"):
        Trainer(_config(folder, tmp_path / "run"))


# ----- 10. setup checks against the data and the base -------------------------------------------------------------
def test_features_of_another_channel_count_are_refused_at_setup(tmp_path):
    folder = make_features(tmp_path / "f", sizes=((8, 8),))
    shard = folder / "shard-000.safetensors"
    from safetensors.torch import load_file

    tensors = load_file(shard)
    tensors["latent_mean"] = torch.cat([tensors["latent_mean"]] * 2, dim=1)  # 8 channels
    tensors["latent_std"] = torch.cat([tensors["latent_std"]] * 2, dim=1)
    save_file(tensors, shard)
    with pytest.raises(ConfigError, match=r"8 latent channels.*in_channels=4"):
        Trainer(_config(folder, tmp_path / "run"))


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    """A tiny pipeline folder whose scheduler records x0 prediction (``prediction_type="sample"``), as MicroShapes."""
    folder = tmp_path_factory.mktemp("pipeline")
    pipe = tiny_pipeline()
    pipe.scheduler.register_to_config(prediction_type="sample")
    pipe.save_pretrained(folder)
    return folder


def test_pretrained_accepts_a_pipeline_folder(features, pipeline_dir, tmp_path):
    config = _config(features, tmp_path, f"model.pretrained={pipeline_dir}", "max_steps=1", "objective.name=x0")
    assert len(Trainer(config).train()) == 1


def test_objective_must_match_the_frozen_base(features, pipeline_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"objective.name=v.*v_prediction.*prediction_type='sample'"):
        Trainer(_config(features, tmp_path / "a", f"model.pretrained={pipeline_dir}", "controlnet.num_blocks=1",
                        "objective.name=v"))  # fmt: skip
    with pytest.warns(UserWarning, match=r"objective.name=v.*prediction_type='sample'"):
        Trainer(_config(features, tmp_path / "b", f"model.pretrained={pipeline_dir}/transformer", "objective.name=v"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # x0 matches: no warning
        Trainer(_config(features, tmp_path / "c", f"model.pretrained={pipeline_dir}", "objective.name=x0"))


def test_validation_takes_its_pipeline_from_the_features(tmp_path, pipeline_dir):
    folder = make_features(tmp_path / "f", sizes=((8, 8),), record=False)
    common = ["max_steps=1", "validation.every=1", "validation.prompts=[a red circle]", "validation.steps=1"]
    with pytest.raises(ConfigError, match=r"validation.every=1 .*validation.pipeline.*extract_config.json"):
        Trainer(_config(folder, tmp_path / "a", *common))
    (folder / "extract_config.json").write_text(json.dumps({"pipeline": str(pipeline_dir)}))
    Trainer(_config(folder, tmp_path / "b", *common)).train()
    assert (tmp_path / "b" / "validation" / "step-0000001.png").is_file()


def test_shipped_configs_load_and_match_their_base():
    microshapes = load_config(TINY.parent / "microshapes.yaml", ["data.path=x"])
    assert microshapes.validation.pipeline is None  # filled from the features' extract_config.json at setup
    controlnet = load_config(TINY.parent / "controlnet_microshapes.yaml")
    assert controlnet.objective.name == microshapes.objective.name == "x0"  # the shipped base predicts x0


def test_world_size_and_global_batch_are_logged(features, tmp_path):
    Trainer(_config(features, tmp_path, "max_steps=2", "gradient_accumulation_steps=2")).train()
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first["world_size"] == 1 and first["global_batch"] == 8  # 4 per process x 1 process x 2 accumulated

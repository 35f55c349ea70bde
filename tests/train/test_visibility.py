"""Training you can see: TensorBoard by default when installed, loss.png at checkpoints and at the end, captioned
validation grids on the run's own captions, validation at the last step, and shipped configs that show all of it."""

import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dit.microshapes.recipe import DEFAULT_CONFIG, VALIDATION_PROMPTS
from dit.train import Trainer, engine, load_config
from dit.train.config import ConfigError
from dit.train.extract.extraction import extract
from dit.train.run.loss_plot import SIZE
from dit.train.run.validation import MIN_CELL, captioned_grid
from dit.train.run.validation_prompts import PROMPTS_FILE, CaptionSample, read_validation_prompts
from tests.tiny import CAPTIONS, TINY, _image_folder, make_features, save_tiny_pipeline

PROMPTS = ["a red circle on the left", "a blue square"]
# sampling at the tiny features' size (8x8 latents, VAE factor 2) in one step: the wiring is under test
QUICK = ["validation.steps=1", "validation.height=16", "validation.width=16"]


def _features(folder: Path, prompts: list[str] | None = PROMPTS) -> Path:
    make_features(folder, sizes=((8, 8),))
    if prompts is not None:  # as `dit extract` leaves them
        (folder / PROMPTS_FILE).write_text(json.dumps({"prompts": prompts}))
    return folder


def _train(features: Path, out: Path, *overrides: str) -> Trainer:
    trainer = Trainer(load_config(TINY, [f"data.path={features}", f"output_dir={out}", *overrides]))
    trainer.train()
    return trainer


def _events(run: Path) -> list[Path]:
    return list((run / "logs").rglob("events.out.tfevents.*"))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Trainer, Path]:
    """A run with the defaults under test: report_to=auto, validation every 100 steps (past max_steps), no
    validation.prompts (the features' own), checkpoints at 2 and 3."""
    root = tmp_path_factory.mktemp("visible")
    trainer = _train(_features(root / "features"), root / "run", "max_steps=3", "checkpoint_every=2",
                     "report_to=auto", "validation.every=100", *QUICK)  # fmt: skip
    return trainer, root / "run"


# ----- TensorBoard ------------------------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_report_to_auto_writes_tensorboard_events(run):
    assert _events(run[1])


def test_report_to_none_writes_no_events(tmp_path):
    _train(_features(tmp_path / "f", None), tmp_path / "run", "max_steps=1", "report_to=none")
    assert (tmp_path / "run" / "metrics.jsonl").is_file() and not _events(tmp_path / "run")


def test_report_to_defaults_to_auto_and_refuses_others():
    assert load_config(TINY).report_to == "auto"
    with pytest.raises(ConfigError, match=r"config.report_to: 'wandb' is not one of 'auto', 'tensorboard', 'none'"):
        load_config(TINY, ["report_to=wandb"])


def test_auto_without_tensorboard_logs_metrics_only_and_says_so_once(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a)
    )
    monkeypatch.setattr(engine, "_said", set())
    with pytest.warns(UserWarning, match="report_to=auto: tensorboard is not installed") as said:
        assert engine._tracker("auto") is None
        assert engine._tracker("auto") is None
    assert len(said) == 1
    assert engine._tracker("none") is None


# ----- the loss plot ----------------------------------------------------------------------------------------
def test_loss_plot_at_the_end_and_in_every_checkpoint(run):
    folder = run[1]
    for path in (folder / "loss.png", folder / "checkpoints" / "checkpoint-2" / "loss.png",
                 folder / "checkpoints" / "checkpoint-3" / "loss.png"):  # fmt: skip
        image = Image.open(path)
        assert image.size == SIZE, path
        pixels = np.asarray(image.convert("RGB"))
        assert (pixels != 255).any(axis=-1).mean() > 0.01, f"{path} is blank"
    # checkpoint-2's plot was drawn at step 2, before step 3's record: the plots differ
    assert (folder / "checkpoints" / "checkpoint-2" / "loss.png").read_bytes() != (folder / "loss.png").read_bytes()


def test_a_failing_plot_does_not_fail_the_run(tmp_path, monkeypatch):
    from dit.train.run import loss_plot

    def broken(*args):
        raise RuntimeError("no plotting today")

    monkeypatch.setattr(loss_plot, "draw_loss_curve", broken)
    with pytest.warns(UserWarning, match="loss.png not written: RuntimeError: no plotting today"):
        _train(_features(tmp_path / "f", None), tmp_path / "run", "max_steps=1", "report_to=none")
    assert (tmp_path / "run" / "pipeline").is_dir()


# ----- validation -------------------------------------------------------------------------------------------
def test_validation_runs_at_the_last_step_on_the_features_captions(run):
    trainer, folder = run
    assert [p.name for p in (folder / "validation").iterdir()] == ["step-0000003.png"]  # every=100 > max_steps
    assert trainer.config.validation.prompts == PROMPTS  # the features' own, recorded in the checkpoints' config
    saved = load_config(folder / "checkpoints" / "checkpoint-3" / "config.yaml")
    assert saved.validation.prompts == PROMPTS


def test_validation_every_and_last_step(tmp_path):
    _train(_features(tmp_path / "f"), tmp_path / "run", "max_steps=3", "validation.every=2", "report_to=none", *QUICK)
    assert sorted(p.name for p in (tmp_path / "run" / "validation").iterdir()) == [
        "step-0000002.png",
        "step-0000003.png",
    ]


def test_config_prompts_win_over_the_features(tmp_path):
    trainer = Trainer(load_config(TINY, [f"data.path={_features(tmp_path / 'f')}", f"output_dir={tmp_path / 'r'}",
                                         "validation.every=5", "validation.prompts=[a green triangle]"]))  # fmt: skip
    trainer.release()
    assert trainer.config.validation.prompts == ["a green triangle"]


def test_no_prompts_anywhere_turns_validation_off_in_one_line(tmp_path):
    with pytest.warns(
        UserWarning, match=r"validation.every=5: no prompts .*validation_prompts.json.*validation is off"
    ):
        trainer = Trainer(load_config(TINY, [f"data.path={_features(tmp_path / 'f', None)}",
                                             f"output_dir={tmp_path / 'r'}", "validation.every=5"]))  # fmt: skip
    trainer.release()
    assert trainer.validator is None and trainer.config.validation.every == 0


def test_the_grid_is_captioned(run):
    grid = np.asarray(Image.open(run[1] / "validation" / "step-0000003.png").convert("L"))
    cell = MIN_CELL  # 16 px samples scaled up 8x
    assert grid.shape[1] == 2 * cell and grid.shape[0] > cell + 8
    band = grid[cell:]
    for i in range(2):  # dark text under each image, on white
        assert (band[:, i * cell : (i + 1) * cell] < 100).sum() > 20


def test_long_captions_wrap_under_their_image():
    images = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    short = captioned_grid(images, ["a", "b"])
    long = captioned_grid(images, ["a", "a green circle to the left of a cyan square, on a white background"])
    assert short.width == long.width == 2 * MIN_CELL
    assert long.height > short.height > MIN_CELL  # more lines under the same width
    assert _text_height(long, 1) > 2 * _text_height(short, 1)


def _text_height(grid: Image.Image, column: int) -> int:
    """Rows from the first to the last with dark (text) pixels under image ``column``."""
    band = np.asarray(grid.convert("L"))[MIN_CELL:, column * MIN_CELL : (column + 1) * MIN_CELL]
    rows = np.flatnonzero((band < 100).any(axis=1))
    return int(rows.max() - rows.min() + 1)


# ----- dit extract keeps captions for validation ----------------------------------------------------------
def test_extract_keeps_a_sample_of_the_captions(tmp_path):
    data = _image_folder(tmp_path / "images")  # 4 captions, a broken image and an empty caption
    pipeline = save_tiny_pipeline(tmp_path / "pipeline")
    for out in ("a", "b"):
        extract("imagefolder", data, pipeline, tmp_path / out, resolution=16, bucketing=False, max_length=8)
    prompts = read_validation_prompts(tmp_path / "a")
    assert sorted(prompts) == sorted(CAPTIONS)  # every non-empty caption, the empty one left out
    assert read_validation_prompts(tmp_path / "b") == prompts  # a fixed sample


def test_caption_sample_is_uniform_and_fixed():
    def sample(seed=0):
        captions = CaptionSample(size=4, seed=seed)
        for i in range(1000):
            captions.add(f"caption {i}")
        return captions

    assert sample().prompts == sample().prompts and sample().seen == 1000
    assert max(int(p.split()[1]) for p in sample().prompts) >= 100  # not the first four
    assert sample().prompts != sample(seed=1).prompts


# ----- shipped configs ----------------------------------------------------------------------------------------
CONFIGS = sorted(p for p in TINY.parent.glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_report_and_validate_within_the_run(path):
    config = load_config(path, ["data.path=x"])
    assert config.report_to == "auto"
    assert config.validation.every <= config.max_steps


def test_the_own_images_config_validates_on_the_users_captions():
    """README "Train on your own images": CONFIG=DEFAULT_CONFIG; validation is on, with no MicroShapes prompts of
    its own (the features' captions), and the recipe passes the MicroShapes ones."""
    config = load_config(DEFAULT_CONFIG, ["data.path=x", "max_steps=500"])
    assert 0 < config.validation.every and config.validation.prompts == []
    assert len(VALIDATION_PROMPTS) == 5 and all("background" in p for p in VALIDATION_PROMPTS)


def test_readme_flow_validates_on_extracted_captions(tmp_path):
    """Extract a folder of captioned images, train without validation.prompts: the grid shows the data's captions."""
    data = _image_folder(tmp_path / "images", broken=False)
    pipeline = save_tiny_pipeline(tmp_path / "pipeline")
    extract("imagefolder", data, pipeline, tmp_path / "features", resolution=16, bucketing=False, max_length=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer = _train(tmp_path / "features", tmp_path / "run", "max_steps=2", "data.batch_size=2",
                         "validation.every=1000", *QUICK)  # fmt: skip
    assert sorted(trainer.config.validation.prompts) == sorted(CAPTIONS)
    assert (tmp_path / "run" / "validation" / "step-0000002.png").is_file()

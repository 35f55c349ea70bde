"""Every run ends with ``output_dir/pipeline`` (issue 19, item 9): images -> ``dit extract`` -> ``dit train`` ->
a pipeline folder that ``TextToImagePipeline.from_pretrained`` loads and samples. It is always complete (issue 29,
item 3): a run without the encoders its features were made with refuses at setup."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from dit import PixArtTransformer
from dit.cli import main as cli_main
from dit.pipelines import TextToImagePipeline
from dit.pipelines.defaults import sampling_defaults
from dit.pipelines.schedulers import prediction_of
from dit.tiny import tiny_pipeline
from dit.train import Trainer, load_config
from dit.train.config import ConfigError
from dit.train.run.outputs import encoders_source
from tests.tiny import TINY, _image_folder, make_features


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """The pipeline the features are extracted with (``dit.tiny``: 4 latent channels, 32-wide T5)."""
    folder = tmp_path_factory.mktemp("source") / "pipeline"
    tiny_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def features(tmp_path_factory, source) -> Path:
    root = tmp_path_factory.mktemp("extracted")
    images = _image_folder(root / "images", broken=False)
    code = cli_main(["extract", str(images), "--pipeline", str(source), "--out", str(root / "features"),
                     "--resolution", "16", "--no-bucketing", "--max-length", "8"])  # fmt: skip
    assert code == 0
    record = json.loads((root / "features" / "extract_config.json").read_text())  # what the trainer reads
    assert Path(record["pipeline"]).resolve() == source.resolve()
    return root / "features"


def _train(features: Path, out: Path, *overrides: str) -> Trainer:
    config = load_config(TINY, [f"data.path={features}", f"output_dir={out}", "report_to=none", "max_steps=2",
                                "data.batch_size=2", "checkpoint_every=2", *overrides])  # fmt: skip
    trainer = Trainer(config)
    trainer.train()
    return trainer


def _sample(folder: Path) -> torch.Tensor:
    pipe = TextToImagePipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle", num_inference_steps=2, height=16, width=16, output_type="pt",
               generator=torch.Generator().manual_seed(0))  # fmt: skip
    return out.images


def test_a_run_ends_with_a_pipeline_that_loads_and_samples(features, source, tmp_path):
    trainer = _train(features, tmp_path / "run", "validation.steps=7", "validation.guidance_scale=3.0")
    folder = tmp_path / "run" / "pipeline"
    images = _sample(folder)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    # the EMA weights of the last checkpoint, the objective's sampler, the validation settings as defaults
    ema = PixArtTransformer.from_pretrained(tmp_path / "run" / "checkpoints" / "checkpoint-2" / "model_ema")
    saved = PixArtTransformer.from_pretrained(folder / "transformer")
    for (name, a), b in zip(ema.state_dict().items(), saved.state_dict().values()):
        assert torch.equal(a, b), name
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == trainer.objective.sampling_scheduler().config.prediction_type
    assert sampling_defaults(folder) == {"num_inference_steps": 7, "guidance_scale": 3.0}
    # the encoders the features were extracted with, linked rather than copied
    for name in ("tokenizer", "text_encoder", "vae"):
        assert (folder / name).resolve() == (source / name).resolve(), name
    latest = tmp_path / "run" / "checkpoints" / "latest-checkpoint"
    assert latest.resolve() == (tmp_path / "run" / "checkpoints" / "checkpoint-2").resolve()


def test_the_objective_picks_the_scheduler(features, tmp_path):
    _train(features, tmp_path / "run", "objective.name=flow", "ema_decay=null")
    index = json.loads((tmp_path / "run" / "pipeline" / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert _sample(tmp_path / "run" / "pipeline").shape == (1, 3, 16, 16)


def test_validation_pipeline_is_the_encoder_source_without_a_record(source, tmp_path):
    folder = make_features(tmp_path / "f", sizes=((8, 8),), record=False)
    _train(folder, tmp_path / "run", f"validation.pipeline={source}")
    assert _sample(tmp_path / "run" / "pipeline").shape == (1, 3, 16, 16)


@pytest.mark.parametrize("extra", [[], ["validation.every=1", "validation.prompts=[a red circle]"]])
def test_without_an_encoder_source_the_run_refuses_at_setup(extra, tmp_path):
    """Features without ``extract_config.json`` (as the MicroShapes recipes wrote them) and no
    ``validation.pipeline``: a one-line ConfigError before any step, and nothing written to output_dir."""
    folder = make_features(tmp_path / "f", sizes=((8, 8),), record=False)
    out = tmp_path / "run"
    config = load_config(TINY, [f"data.path={folder}", f"output_dir={out}", "report_to=none", *extra])
    with pytest.raises(ConfigError) as error:
        Trainer(config)
    message = str(error.value)
    assert "\n" not in message and "validation.pipeline" in message and "extract_config.json" in message
    assert extra or str(folder) in message and "validation.pipeline=FOLDER" in message
    assert not out.exists()


def test_pipeline_false_trains_without_an_encoder_source_and_writes_no_pipeline(tmp_path):
    """``pipeline=false`` (benchmarks on synthetic features): no encoders needed, checkpoints only."""
    folder = make_features(tmp_path / "f", sizes=((8, 8),), record=False)
    trainer = _train(folder, tmp_path / "run", "pipeline=false")
    assert trainer.step == 2 and (tmp_path / "run" / "checkpoints" / "checkpoint-2" / "model").is_dir()
    assert not (tmp_path / "run" / "pipeline").exists()


def test_mixed_size_features_record_their_encoders(source, tmp_path):
    from dit.microshapes.mixed_sizes import build

    build(tmp_path / "f", 4, encoders=source, sides=(16,))
    config = load_config(TINY, [f"data.path={tmp_path / 'f'}", f"output_dir={tmp_path / 'run'}"])
    assert encoders_source(config) == source.resolve()


@pytest.mark.parametrize("objective", ["ddpm_eps", "v", "x0", "flow", "edm"])
def test_every_objective_ends_with_a_complete_pipeline(objective, features, tmp_path):
    """The folder lists every component, its transformer records what the objective trains it to predict, and
    ``scheduler=None`` on that transformer samples as the folder's own scheduler does."""
    shift = [] if objective in ("flow", "edm") else ["objective.discrete.noise_shift=2.0"]  # the discrete schedule
    trainer = _train(features, tmp_path / "run", f"objective.name={objective}", "ema_decay=null", "max_steps=1",
                     "checkpoint_every=1", *shift)  # fmt: skip
    folder = tmp_path / "run" / "pipeline"
    index = json.loads((folder / "model_index.json").read_text())
    assert all(None not in index[name] for name in ("tokenizer", "text_encoder", "vae", "transformer", "scheduler"))
    pipe = TextToImagePipeline.from_pretrained(str(folder))
    assert pipe.transformer.prediction_type == prediction_of(trainer.objective.sampling_scheduler())
    parts = {name: part for name, part in pipe.components.items() if name != "scheduler"}
    default = TextToImagePipeline(**parts, scheduler=None).scheduler
    saved = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    assert type(default) is type(pipe.scheduler)
    assert {k: default.config[k] for k in ("prediction_type", "trained_betas") if k in saved} == {
        k: saved[k] for k in ("prediction_type", "trained_betas") if k in saved
    }
    assert _sample(folder).shape == (1, 3, 16, 16)


def test_a_lora_run_writes_the_fused_transformer(features, source, tmp_path):
    pytest.importorskip("peft")
    _train(features, tmp_path / "run", f"model.pretrained={source}", "model.lora_rank=4", "optim.lr=0.05")
    transformer = PixArtTransformer.from_pretrained(tmp_path / "run" / "pipeline" / "transformer")
    base = PixArtTransformer.from_pretrained(source / "transformer")
    assert set(transformer.state_dict()) == set(base.state_dict())  # plain keys: the LoRA is fused in
    assert not torch.equal(transformer.proj_out.weight, base.proj_out.weight)
    assert _sample(tmp_path / "run" / "pipeline").shape == (1, 3, 16, 16)


def test_a_bare_encoders_folder_is_linked_with_its_classes(source, tmp_path):
    """The MicroShapes recipe's ``validation.pipeline`` holds tokenizer/, text_encoder/ and vae/ only (no
    model_index.json): the run's pipeline names their classes from their own configs."""
    encoders = tmp_path / "encoders"
    for name in ("tokenizer", "text_encoder", "vae"):
        shutil.copytree(source / name, encoders / name)
    folder = make_features(tmp_path / "f", sizes=((8, 8),), record=False)
    _train(folder, tmp_path / "run", f"validation.pipeline={encoders}")
    index = json.loads((tmp_path / "run" / "pipeline" / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "T5EncoderModel"] and index["vae"] == [
        "diffusers",
        "AutoencoderKL",
    ]
    assert _sample(tmp_path / "run" / "pipeline").shape == (1, 3, 16, 16)

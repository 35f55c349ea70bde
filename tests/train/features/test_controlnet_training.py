"""ControlNet training in the one loop: base frozen and bit-identical, only the adapter trains and is checkpointed."""

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dit import ControlNetAdapter, PixArtTransformer
from dit.pipelines import ControlNetPipeline
from dit.tiny import tiny_pipeline
from dit.train import Trainer, load_config
from dit.train.config import ConfigError
from dit.train.extract.feature_writer import ControlFeatureWriter
from dit.train.features.controlnet import ControlledTransformer
from tests.tiny import TINY, _losses, launch_two_processes, make_features, randomize_

BASE = dict(load_config(TINY, ["data.path=x"]).model.kwargs, num_layers=3)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("base")
    randomize_(PixArtTransformer(**BASE), std=0.05).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    """The trainer tests' shards (two latent sizes) plus a control latent per sample."""
    folder = make_features(tmp_path_factory.mktemp("control_features"))
    gen = torch.Generator().manual_seed(7)
    for shard in sorted(folder.glob("shard-*.safetensors")):
        tensors = load_file(shard)
        tensors["control_latent"] = torch.randn(tensors["latent_mean"].shape, generator=gen)
        save_file(tensors, shard)
    return folder


def _config(features: Path, base: Path, out: Path, *overrides: str):
    return load_config(
        TINY,
        [f"data.path={features}", f"output_dir={out}", f"model.pretrained={base}", "controlnet.num_blocks=2",
         "max_steps=2", "checkpoint_every=2", "report_to=none", *overrides],
    )  # fmt: skip


def test_only_the_adapter_trains_and_the_base_stays_bit_identical(features, base, tmp_path):
    trainer = Trainer(_config(features, base, tmp_path))
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert isinstance(model, ControlledTransformer)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("controlnet.") for n in trainable)
    assert {id(p) for group in trainer.optimizer.param_groups for p in group["params"]} == {
        id(p) for p in model.controlnet.parameters()
    }
    before = {k: v.clone() for k, v in model.controlnet.state_dict().items()}
    losses = trainer.train()
    assert len(losses) == 2 and all(map(math.isfinite, losses))
    original = PixArtTransformer.from_pretrained(base).state_dict()
    for name, value in model.transformer.state_dict().items():  # .cpu(): the trainer's model is on CUDA there
        assert torch.equal(value.cpu(), original[name]), name
    after = model.controlnet.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "controlnet_blocks.0.after_proj.weight" in changed and "before_proj.weight" in changed
    assert any(".transformer_block." in k for k in changed)
    saved = tmp_path / "checkpoints" / "checkpoint-2"
    for folder in ("model", "model_ema"):
        assert not list((saved / folder).glob("*.bin"))
        assert ControlNetAdapter.from_pretrained(saved / folder).positions == [0, 1]
    for key, value in ControlNetAdapter.from_pretrained(saved / "model").state_dict().items():
        assert torch.equal(value, after[key].cpu()), key


def test_gradient_checkpointing_gives_the_same_run(features, base, tmp_path):
    plain = Trainer(_config(features, base, tmp_path / "plain", "ema_decay=null")).train()
    trainer = Trainer(
        _config(features, base, tmp_path / "ckpt", "ema_decay=null", "model.gradient_checkpointing=true")
    )
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert model.controlnet.gradient_checkpointing and model.transformer.gradient_checkpointing
    torch.testing.assert_close(torch.tensor(trainer.train()), torch.tensor(plain), rtol=1e-6, atol=1e-7)
    a = ControlNetAdapter.from_pretrained(tmp_path / "plain/checkpoints/checkpoint-2/model").state_dict()
    b = ControlNetAdapter.from_pretrained(tmp_path / "ckpt/checkpoints/checkpoint-2/model").state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_slim_positions_and_continuing_from_an_adapter(features, base, tmp_path):
    slim = Trainer(
        _config(features, base, tmp_path / "slim", "controlnet.num_blocks=null", "controlnet.positions=[1]")
    )
    slim.train()
    folder = tmp_path / "slim/checkpoints/checkpoint-2/model"
    assert ControlNetAdapter.from_pretrained(folder).positions == [1]
    again = Trainer(_config(features, base, tmp_path / "again", "controlnet.num_blocks=null",
                            f"controlnet.pretrained={folder}"))  # fmt: skip
    start = again.accelerator.unwrap_model(again.model).controlnet.state_dict()
    for key, value in ControlNetAdapter.from_pretrained(folder).state_dict().items():
        assert torch.equal(start[key].cpu(), value), key


def test_config_and_data_errors_name_the_problem(features, base, tmp_path):
    with pytest.raises(ConfigError, match="model.pretrained"):
        Trainer(_config(features, base, tmp_path / "a", "model.pretrained=null"))
    with pytest.raises(ConfigError, match="validation.every=0"):
        Trainer(_config(features, base, tmp_path / "b", "validation.every=1", "validation.prompts=[x]"))
    with pytest.raises(ValueError, match="num_blocks=3 does not fit a base with 3 blocks"):
        Trainer(_config(features, base, tmp_path / "c", "controlnet.num_blocks=3"))
    plain = make_features(tmp_path / "plain_features")
    with pytest.raises(ValueError, match="control_latent"):
        Trainer(_config(plain, base, tmp_path / "d")).train()


def test_control_feature_writer_matches_the_pipeline_encoding(tmp_path):
    pipe = tiny_pipeline()
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    controls = (torch.rand(3, 3, 16, 16) > 0.5).float() * 2 - 1
    writer = ControlFeatureWriter(tmp_path, pipe.tokenizer, pipe.text_encoder, pipe.vae, 8, shard_size=2, rank=0)
    writer.add((16, 16), images, ["a red circle", "a blue square", "a cat"], controls)
    writer.flush()
    shards = [load_file(p) for p in sorted(tmp_path.glob("*.safetensors"))]
    assert [s["control_latent"].shape[0] for s in shards] == [3]
    latent = torch.cat([s["control_latent"] for s in shards])
    assert latent.shape == shards[0]["latent_mean"].shape
    with torch.no_grad():
        expected = pipe.vae.encode(controls).latent_dist.mean * pipe.vae.config.scaling_factor
    torch.testing.assert_close(latent, expected)
    adapter = ControlNetAdapter.from_transformer(pipe.transformer, num_blocks=1)
    with torch.no_grad():
        torch.testing.assert_close(
            ControlNetPipeline(**pipe.components, controlnet=adapter).encode_control(controls), expected
        )


@pytest.mark.slow
def test_two_processes_match_one(features, base, tmp_path):
    """accelerate launch with two CPU processes (gloo): the adapter run's losses equal the one-process run's."""
    overrides = [f"data.path={features}", f"model.pretrained={base}", "controlnet.num_blocks=2", "max_steps=3",
                 "checkpoint_every=100", "report_to=none"]  # fmt: skip
    Trainer(load_config(TINY, [*overrides, f"output_dir={tmp_path / 'one'}"])).train()
    two = launch_two_processes(overrides, tmp_path / "two")
    torch.testing.assert_close(torch.tensor(two), torch.tensor(_losses(tmp_path / "one")), rtol=1e-4, atol=1e-5)


def test_a_fit_base_trains_a_control_adapter(features, tmp_path):
    """ControlNet on the flow backbone: the loop trains FiT's adapter (one size per batch) and the base stays put."""
    from dit import FiTTransformer
    from tests.tiny import FIT_KWARGS

    torch.manual_seed(0)
    config = _config(features, tmp_path / "unused", tmp_path / "run", "model.cls=FiTTransformer",
                     f"model.kwargs={FIT_KWARGS}", "objective.name=flow", "controlnet.num_blocks=1")  # fmt: skip
    fit = randomize_(FiTTransformer(**config.model.kwargs), std=0.05)
    fit.save_pretrained(tmp_path / "fit")
    config.model.pretrained = str(tmp_path / "fit")
    trainer = Trainer(config)
    model = trainer.accelerator.unwrap_model(trainer.model)
    before = {k: v.clone() for k, v in model.controlnet.state_dict().items()}
    losses = trainer.train()
    assert len(losses) == 2 and all(map(math.isfinite, losses))
    for name, value in model.transformer.state_dict().items():
        assert torch.equal(value.cpu(), fit.state_dict()[name]), name
    after = model.controlnet.state_dict()
    assert not torch.equal(before["before_proj.weight"], after["before_proj.weight"])
    assert ControlNetAdapter.from_pretrained(
        tmp_path / "run" / "checkpoints" / "checkpoint-2" / "model"
    ).positions == [0]


def test_a_run_ends_with_a_controlnet_pipeline(features, base, tmp_path):
    """output_dir/pipeline of a ControlNet run: a ControlNetPipeline of the frozen base and the trained adapter (its
    EMA), with the objective's scheduler and the encoders the features were extracted with."""
    Trainer(_config(features, base, tmp_path)).train()
    folder = tmp_path / "pipeline"
    index = (folder / "model_index.json").read_text()
    assert '"ControlNetPipeline"' in index and '"controlnet"' in index
    assert all((folder / name / "config.json").is_file() for name in ("text_encoder", "vae"))
    adapter = ControlNetAdapter.from_pretrained(folder / "controlnet")
    ema = ControlNetAdapter.from_pretrained(tmp_path / "checkpoints" / "checkpoint-2" / "model_ema")
    for key, value in ema.state_dict().items():
        assert torch.equal(adapter.state_dict()[key], value), key
    transformer = PixArtTransformer.from_pretrained(folder / "transformer")
    for key, value in PixArtTransformer.from_pretrained(base).state_dict().items():
        assert torch.equal(transformer.state_dict()[key], value), key
    assert (folder / "sampling_defaults.json").is_file() and (folder / "scheduler").is_dir()

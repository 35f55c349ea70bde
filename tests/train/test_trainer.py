"""Reliability of the training loop: exact resume, atomic checkpoints, NaN stop, two processes."""

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dit import PixArtTransformer
from dit.train import Trainer, TrainingDiverged, load_config
from dit.train.run.checkpointing import list_checkpoints
from tests.tiny import TINY, _losses, launch_two_processes, make_features


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    return make_features(tmp_path_factory.mktemp("features"))


def _config(features: Path, out: Path, *overrides: str):
    return load_config(TINY, [f"data.path={features}", f"output_dir={out}", *overrides])


def test_config_errors_name_the_key():
    from dit.train.config import ConfigError

    with pytest.raises(ConfigError, match=r"config.optim: unknown key\(s\) learning_rate"):
        load_config(TINY, ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match=r"config.max_steps: expected int, got 'many'"):
        load_config(TINY, ["max_steps=many"])
    assert load_config(TINY, ["optim.lr=3e-4"]).optim.lr == 3e-4
    assert load_config(TINY, ["mixed_precision=no"]).mixed_precision == "no"  # YAML 1.2 booleans only
    with pytest.raises(ConfigError, match="config.ema_decay"):
        load_config(TINY, ["ema_decay=yes"])


@pytest.mark.parametrize("objective", ["ddpm_eps", "v", "flow"])
def test_exact_resume(features, tmp_path, objective):
    """Steps k+1..2k after resuming from step k equal the uninterrupted run's, data order included."""
    full = Trainer(_config(features, tmp_path / "full", f"objective.name={objective}")).train()
    assert len(full) == 6
    first = Trainer(_config(features, tmp_path / "split", f"objective.name={objective}", "max_steps=3")).train()
    assert first == full[:3]
    resumed = Trainer(_config(features, tmp_path / "split", f"objective.name={objective}", "resume=latest")).train()
    assert resumed == full[3:]
    ema_full = PixArtTransformer.from_pretrained(tmp_path / "full/checkpoints/checkpoint-6/model_ema")
    ema_split = PixArtTransformer.from_pretrained(tmp_path / "split/checkpoints/checkpoint-6/model_ema")
    for (name, a), b in zip(ema_full.state_dict().items(), ema_split.state_dict().values()):
        assert torch.equal(a, b), name


def test_checkpoint_layout_and_limit(features, tmp_path):
    Trainer(_config(features, tmp_path, "max_steps=9", "checkpoints_total_limit=2")).train()
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["checkpoint-6", "checkpoint-9"]
    latest = tmp_path / "checkpoints" / "checkpoint-9"
    assert (tmp_path / "checkpoints" / "latest").read_text() == "checkpoint-9"
    assert {"state", "model", "model_ema", "config.yaml", "trainer_state.json"} <= {p.name for p in latest.iterdir()}
    assert load_config(latest / "config.yaml").max_steps == 9
    assert (
        not list((latest / "model").glob("*.bin"))
        and (latest / "model_ema" / "diffusion_pytorch_model.safetensors").is_file()
    )


def test_every_process_finishes_saving_before_the_checkpoint_is_renamed(features, tmp_path, monkeypatch):
    """accelerate's save_state ends without a barrier; the main process may only publish (rename the folder every
    rank writes its RNG state into) after all ranks are past it, or a slower rank writes into a moved folder."""
    from dit.train.run import folder as checkpointing_module

    trainer, calls = Trainer(_config(features, tmp_path)), []

    def recorded(name, fn):
        return lambda *args, **kwargs: calls.append(name) or fn(*args, **kwargs)

    for name in ("save_state", "wait_for_everyone"):
        monkeypatch.setattr(trainer.accelerator, name, recorded(name, getattr(trainer.accelerator, name)))
    monkeypatch.setattr(checkpointing_module, "publish", recorded("publish", checkpointing_module.publish))
    trainer.save_checkpoint()
    assert calls.index("publish") > calls.index("save_state") + 1
    assert "wait_for_everyone" in calls[calls.index("save_state") : calls.index("publish")]


def test_interrupted_save_leaves_previous_checkpoint(features, tmp_path, monkeypatch):
    trainer = Trainer(_config(features, tmp_path))
    original = PixArtTransformer.save_pretrained
    calls = {"n": 0}

    def dying_save(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # model and EMA of checkpoint 3, then the model of checkpoint 6: killed mid-save
            raise KeyboardInterrupt("killed while saving")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PixArtTransformer, "save_pretrained", dying_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    monkeypatch.setattr(PixArtTransformer, "save_pretrained", original)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "checkpoint-3"
    assert (tmp_path / "checkpoints" / "checkpoint-6.tmp").exists()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3"]
    PixArtTransformer.from_pretrained(tmp_path / "checkpoints" / "checkpoint-3" / "model")
    resumed = Trainer(_config(features, tmp_path, "resume=latest"))
    assert len(resumed.train()) == 3 and resumed.step == 6


def test_nan_loss_stops_with_checkpoint_intact(features, tmp_path, monkeypatch):
    trainer = Trainer(_config(features, tmp_path))
    original = Trainer._loss

    def poisoned(self, batch, micro_step):
        loss, per_sample = original(self, batch, micro_step)
        if micro_step >= 4:
            return loss * float("nan"), per_sample * float("nan")
        return loss, per_sample

    monkeypatch.setattr(Trainer, "_loss", poisoned)
    with pytest.raises(TrainingDiverged, match="Loss is nan at step 5"):
        trainer.train()
    assert (tmp_path / "checkpoints" / "latest").read_text() == "checkpoint-3"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3"]


def test_caption_dropout_needs_a_null_caption(tmp_path):
    folder = make_features(tmp_path / "f")
    (folder / "null_caption.safetensors").unlink()
    from dit.train.config import ConfigError

    with pytest.raises(ConfigError, match="null_caption.safetensors"):
        Trainer(_config(folder, tmp_path / "run"))


def test_two_processes_match_one(features, tmp_path):
    """Two CPU processes over gloo: same global batch, same losses."""
    overrides = [f"data.path={features}", "max_steps=4", "checkpoint_every=100"]
    Trainer(load_config(TINY, [*overrides, f"output_dir={tmp_path / 'one'}"])).train()
    two = launch_two_processes(overrides, tmp_path / "two")
    one = _losses(tmp_path / "one")
    assert len(one) == len(two) == 4
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-4, atol=1e-5)


def test_lit_inherits_from_pixart_and_distills_from_it(features, tmp_path):
    """model.inherit_from + objective.teacher: a LiT student trained against a frozen PixArt teacher."""
    base = load_config(TINY, ["data.path=x"]).model.kwargs
    teacher = PixArtTransformer(**base)
    teacher.save_pretrained(tmp_path / "teacher")
    config = _config(
        features, tmp_path / "run", "model.cls=LiTTransformer", f"model.inherit_from={tmp_path / 'teacher'}",
        f"objective.teacher={tmp_path / 'teacher'}", "max_steps=2", "ema_decay=null",
    )  # fmt: skip
    trainer = Trainer(config)
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert model.config.self_attention_type == "linear"
    assert torch.equal(model.proj_out.weight.cpu(), teacher.proj_out.weight)  # on CUDA in tests/gpu
    losses = trainer.train()
    assert len(losses) == 2 and all(map(math.isfinite, losses))
    assert not any(p.requires_grad for p in trainer.teacher.parameters())


def test_sample_posterior_false_trains_on_the_latent_mean(tmp_path):
    """data.sample_posterior=false ignores latent_std: shards that differ only in it give the same first loss."""
    losses = []
    for scale in (0.0, 50.0):
        folder = make_features(tmp_path / f"f{scale}", sizes=((8, 8),))
        shard = folder / "shard-000.safetensors"
        from safetensors.torch import load_file

        tensors = load_file(shard)
        tensors["latent_std"] = torch.full_like(tensors["latent_std"], scale)
        save_file(tensors, shard)
        config = _config(folder, tmp_path / f"run{scale}", "data.sample_posterior=false", "max_steps=1")
        losses.append(Trainer(config).train()[0])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_compiled_blocks_train_like_eager_and_save_plain_names(features, tmp_path):
    """compile: true compiles the repeated blocks in place (fullgraph): the same losses, the same checkpoint keys."""
    import torch._dynamo

    torch._dynamo.reset()
    common = ["max_steps=2", "checkpoint_every=2", "report_to=none"]
    eager = Trainer(_config(features, tmp_path / "eager", *common)).train()
    compiled = Trainer(_config(features, tmp_path / "compiled", *common, "compile=true", "compile_backend=aot_eager"))
    torch.testing.assert_close(torch.tensor(compiled.train()), torch.tensor(eager), rtol=1e-5, atol=1e-6)
    saved = PixArtTransformer.from_pretrained(tmp_path / "compiled" / "checkpoints" / "checkpoint-2" / "model")
    assert set(saved.state_dict()) == set(PixArtTransformer(**saved.config).state_dict())
    torch._dynamo.reset()

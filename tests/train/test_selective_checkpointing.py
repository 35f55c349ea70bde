"""``model.gradient_checkpointing: false | true | selective`` in the trainer: selective trains as the others do (with
compiled blocks too), bad values are ConfigErrors."""

from pathlib import Path

import pytest

from dit.models.activation_checkpointing import selective_checkpointing_func
from dit.train import Trainer, load_config
from dit.train.config import ConfigError
from tests.tiny import TINY, make_features


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    return make_features(tmp_path_factory.mktemp("features"))


def _config(features: Path, out: Path, *overrides: str):
    return load_config(
        TINY,
        [f"data.path={features}", f"output_dir={out}", "max_steps=3", "checkpoint_every=100", "ema_decay=null",
         "report_to=none", "pipeline=false", *overrides],
    )  # fmt: skip


def test_selective_checkpointing_trains_as_without_checkpointing(features, tmp_path):
    runs = {}
    for mode in ("false", "true", "selective"):
        trainer = Trainer(_config(features, tmp_path / mode, f"model.gradient_checkpointing={mode}"))
        model = trainer.accelerator.unwrap_model(trainer.model)
        assert model.gradient_checkpointing == (mode != "false")
        assert (model._gradient_checkpointing_func is selective_checkpointing_func) == (mode == "selective")
        runs[mode] = trainer.train()
    assert len(runs["false"]) == 3
    assert runs["selective"] == runs["false"] and runs["true"] == runs["false"]


def test_the_yaml_values_and_the_refused_ones(tmp_path):
    config = tmp_path / "config.yaml"
    for text, value in (("selective", "selective"), ("true", True), ("false", False)):
        config.write_text(f"model:\n  gradient_checkpointing: {text}\n")
        assert load_config(config).model.gradient_checkpointing == value
    for bad in ("yes", "full", "Selective"):  # YAML 1.2: `yes` is a string, not a boolean
        with pytest.raises(
            ConfigError, match=r"model.gradient_checkpointing: .* is not one of False, True, 'selective'"
        ):
            load_config(None, [f"model.gradient_checkpointing={bad}"])
    with pytest.raises(ConfigError, match="model.gradient_checkpointing"):
        load_config(None, ["model.gradient_checkpointing=1"])


def test_selective_checkpointing_with_compiled_blocks(features, tmp_path):
    """compile: true puts each block's checkpoint inside its compiled graph: the eager run's losses."""
    import torch
    import torch._dynamo

    torch._dynamo.reset()
    eager = Trainer(_config(features, tmp_path / "eager", "model.gradient_checkpointing=false")).train()
    overrides = ("model.gradient_checkpointing=selective", "compile=true", "compile_backend=aot_eager")
    compiled = Trainer(_config(features, tmp_path / "compiled", *overrides)).train()
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()

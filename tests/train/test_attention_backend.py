"""``model.attention_backend`` in the trainer: the backbone (and a ControlNet adapter) run the chosen kernel; an
unknown or unusable name is a ConfigError before anything loads."""

from pathlib import Path

import pytest

from dit.nn.attention import DiTAttention
from dit.train import Trainer, load_config
from dit.train.config import ConfigError
from tests.tiny import TINY, make_features


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    return make_features(tmp_path_factory.mktemp("features"))


def _config(features: Path, out: Path, *overrides: str):
    return load_config(TINY, [f"data.path={features}", f"output_dir={out}", "max_steps=2", "report_to=none",
                              "pipeline=false", "ema_decay=null", *overrides])  # fmt: skip


def test_the_backbone_trains_with_the_chosen_backend(features, tmp_path):
    """sdpa_flex on the CPU: its forward with gradients runs SDPA with the bias, so the losses are sdpa's exactly."""
    losses = {}
    for name in ("sdpa", "sdpa_flex"):
        trainer = Trainer(_config(features, tmp_path / name, f"model.attention_backend={name}"))
        model = trainer.accelerator.unwrap_model(trainer.model)
        assert {m.backend.name for m in model.modules() if isinstance(m, DiTAttention)} == {name}
        losses[name] = trainer.train()
    assert losses["sdpa_flex"] == losses["sdpa"]


def test_bad_backends_are_config_errors():
    assert load_config(TINY).model.attention_backend == "sdpa"
    with pytest.raises(ConfigError, match=r"config.model.attention_backend: Unknown attention backend 'flashy'"):
        load_config(TINY, ["model.attention_backend=flashy"])
    with pytest.raises(ConfigError, match=r"config.model.attention_backend: .*'flash' cannot be used here"):
        load_config(TINY, ["model.attention_backend=flash"])

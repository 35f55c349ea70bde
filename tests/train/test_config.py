"""The objective section: a sub-config per loss and per distillation, checked in one place (validate_objective);
keys of the old flat section name their new place; a run's saved config.yaml loads and resumes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from dit.train import Trainer, load_config
from dit.train.config import MOVED_KEYS, ConfigError, ObjectiveConfig, TrainConfig, validate_objective
from dit.train.config_io import to_yaml
from tests.tiny import TINY, _losses, make_features


@pytest.mark.parametrize("old, new", sorted(MOVED_KEYS.items()))
def test_a_key_of_the_flat_objective_section_names_its_new_place(tmp_path, old, new):
    with pytest.raises(ConfigError, match=rf"config\.{old} is now {new} .*write {new}="):
        load_config(TINY, [f"{old}=1"])
    section, key = old.split(".")
    (tmp_path / "old.yaml").write_text(yaml.safe_dump({section: {"name": "x0", key: 1}}))
    with pytest.raises(ConfigError, match=rf"config\.{old} is now {new}"):
        load_config(tmp_path / "old.yaml")


def test_every_new_key_exists():
    config = TrainConfig()
    for new in MOVED_KEYS.values():
        node = config
        for part in new.split("."):
            assert hasattr(node, part), new
            node = getattr(node, part)


REFUSED = {
    "flow-section-on-x0": (["objective.name=x0", "objective.flow.logit_normal_std=2"],
                           r"objective.flow.logit_normal_std=2.0 is a setting of objective.name=flow"),
    "schedule-on-flow": (["objective.name=flow", "objective.discrete.noise_shift=2"],
                         r"objective.discrete.noise_shift=2.0 is a setting of objective.name=ddpm_eps or v or x0"),
    "vlb-on-v": (["objective.name=v", "objective.ddpm_eps.vlb_weight=0.5"], r"setting of objective.name=ddpm_eps"),
    "lcm-without-lcm": (["objective.lcm.guidance_scale=3"], r"objective.lcm.guidance_scale=3.0 is a setting of "
                        r"objective.distill=lcm, which this run does not train"),
    "hybrid-section-with-lcm": (["objective.distill=lcm", "objective.teacher=t", "objective.hybrid.eps_weight=1"],
                                r"objective.distill=hybrid"),
    "distill-without-teacher": (["objective.distill=hybrid"], r"needs objective.teacher"),
    "unknown-distillation": (["objective.distill=ddim", "objective.teacher=t"], r"unknown distillation 'ddim'"),
    "unknown-loss": (["objective.name=score"], r"config.objective.name: 'score' is not one of"),
    "weighting": (["objective.name=x0", "objective.x0.weighting=snr"], r"objective.x0.weighting: 'snr' is not one"),
    "range": (["objective.discrete.beta_end=2"], r"objective.discrete.beta_end: 2.0 is out of range"),
    "guidance-range": (["objective.distill=lcm", "objective.teacher=t", "objective.lcm.guidance_range=[0.5, 2]"],
                       r"objective.lcm.guidance_range: \(0.5, 2.0\) is out of range; it must be >= 1"),
    "guidance-order": (["objective.distill=lcm", "objective.teacher=t", "objective.lcm.guidance_range=[5, 2]"],
                       r"low <= high"),
}  # fmt: skip


@pytest.mark.parametrize("overrides, message", REFUSED.values(), ids=REFUSED.keys())
def test_the_objective_section_is_checked_in_one_place(overrides, message):
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(TINY, ["data.path=x", *overrides])
    assert any(entry.name == "validate_objective" for entry in caught.traceback)


def test_each_loss_and_method_reads_its_own_section():
    overrides = ["objective.name=x0", "objective.x0.weighting=uniform", "objective.teacher=t",
                 "objective.discrete.noise_shift=2", "objective.hybrid.eps_weight=1"]  # fmt: skip
    objective = load_config(TINY, overrides).objective
    assert objective.distillation == "hybrid"  # a teacher alone: LiT's hybrid distillation
    assert (objective.x0.weighting, objective.discrete.noise_shift, objective.hybrid.eps_weight) == ("uniform", 2, 1)
    assert validate_objective(ObjectiveConfig()) == ObjectiveConfig() and ObjectiveConfig().distillation is None


def test_a_saved_config_round_trips(tmp_path):
    overrides = ["objective.name=flow", "objective.flow.logit_normal_mean=0.5", "objective.distill=lcm",
                 "objective.teacher=t", "objective.lcm.guidance_range=[2, 7]"]  # fmt: skip
    config = load_config(TINY, ["data.path=x", *overrides])
    (tmp_path / "config.yaml").write_text(to_yaml(config))
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())["objective"]
    assert saved["flow"]["logit_normal_mean"] == 0.5 and saved["lcm"]["guidance_range"] == [2.0, 7.0]
    assert dataclasses.asdict(load_config(tmp_path / "config.yaml")) == dataclasses.asdict(config)


def test_a_run_resumes_from_the_config_it_saved(tmp_path):
    """A checkpoint's config.yaml (the new objective layout) loads as the run's config and resumes it exactly."""
    features: Path = make_features(tmp_path / "features")
    objective = ["objective.name=x0", "objective.x0.weighting=uniform", "objective.discrete.noise_shift=2"]
    common = [f"data.path={features}", "max_steps=4", "checkpoint_every=2", *objective]
    full = Trainer(load_config(TINY, [*common, f"output_dir={tmp_path / 'full'}"])).train()
    Trainer(load_config(TINY, [*common, f"output_dir={tmp_path / 'split'}", "max_steps=2"])).train()
    saved = tmp_path / "split" / "checkpoints" / "checkpoint-2" / "config.yaml"
    config = load_config(saved, ["resume=latest", "max_steps=4"])
    assert config.objective.discrete.noise_shift == 2 and config.objective.x0.weighting == "uniform"
    assert Trainer(config).train() == full[2:] and _losses(tmp_path / "split") == full

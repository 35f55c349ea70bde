"""Weight files the toolkit writes get the umask's normal permissions (safetensors alone writes them 0o600)."""

import os
import stat
from pathlib import Path

import pytest
import torch

from dit.checkpoint import default_file_mode, restore_default_permissions
from dit.train import Trainer, load_config
from dit.train.extract.progress import save_atomically
from tests.tiny import TINY, make_features, save_tiny_pipeline


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _modes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): oct(stat.S_IMODE(p.stat().st_mode))
        for p in folder.rglob("*.safetensors")
        if not p.is_symlink()
    }


def test_default_file_mode_follows_the_umask(umask_022):
    assert default_file_mode() == 0o644
    os.umask(0o077)
    assert default_file_mode() == 0o600


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_saved_pipeline_weights_are_readable_by_others(tmp_path, umask_022, variant):
    folder = save_tiny_pipeline(tmp_path / "pipe")
    if variant:
        from dit.pipelines import TextToImagePipeline

        TextToImagePipeline.from_pretrained(folder).save_pretrained(tmp_path / "variant", variant=variant)
        folder = tmp_path / "variant"
    modes = _modes(folder)
    assert {"transformer", "vae", "text_encoder"} <= {Path(name).parts[0] for name in modes}
    assert set(modes.values()) == {"0o644"}, modes


def test_feature_shards_and_checkpoints_are_readable_by_others(tmp_path, umask_022):
    save_atomically({"x": torch.zeros(2)}, tmp_path / "shard.safetensors")
    assert _modes(tmp_path) == {"shard.safetensors": "0o644"}
    features = make_features(tmp_path / "features", n=4)
    config = load_config(TINY, [f"data.path={features}", f"output_dir={tmp_path / 'run'}", "max_steps=1"])
    Trainer(config).train()
    modes = _modes(tmp_path / "run" / "checkpoints")
    assert any("/state/" in name for name in modes) and any("/model_ema/" in name for name in modes), modes
    assert set(modes.values()) == {"0o644"}, modes


def test_restore_default_permissions_leaves_other_files_alone(tmp_path, umask_022):
    (tmp_path / "notes.txt").write_text("private")
    (tmp_path / "notes.txt").chmod(0o600)
    (tmp_path / "w.safetensors").write_bytes(b"")
    (tmp_path / "w.safetensors").chmod(0o600)
    restore_default_permissions(tmp_path)
    assert stat.S_IMODE((tmp_path / "notes.txt").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o644

"""Recipe stages on a handful of images: data without the held-out pair, a VAE that trains, a loadable pipeline, and
every stage computing on the ``device`` it is given."""

import functools
import json

import pytest
import torch

from dit.microshapes import recipe
from dit.microshapes.recipe import T5_CONFIG, make_dataset, train_vae
from dit.microshapes.text_encoder import train_text_encoder
from dit.tiny import WORDS, tiny_t5, tiny_tokenizer


def test_dataset_images_and_captions():
    images, captions = make_dataset(64, seed=3)
    assert images.shape == (64, 3, 64, 64) and images.min() >= -1 and images.max() <= 1
    assert len(captions) == 64 and not any("magenta triangle" in c for c in captions)


def test_vae_trains_and_sets_its_scaling_factor():
    images, _ = make_dataset(32, seed=4)
    vae = train_vae(images, steps=3, batch_size=4)
    with torch.no_grad():
        latents = vae.encode(images[:2].to(vae.device)).latent_dist.mean  # the default device: CUDA if any
    assert latents.shape == (2, 8, 32, 32)  # 2x down
    assert vae.config.scaling_factor != 0.18215 and vae.config.scaling_factor > 0


@pytest.fixture
def no_cuda(monkeypatch):
    """The default device as on a CPU-only machine, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_device_cpu_is_the_default_without_cuda(no_cuda):
    images, _ = make_dataset(8, seed=5)
    default, cpu = train_vae(images, steps=2, batch_size=2), train_vae(images, steps=2, batch_size=2, device="cpu")
    assert default.config.scaling_factor == cpu.config.scaling_factor
    assert all(torch.equal(v, cpu.state_dict()[k]) for k, v in default.state_dict().items())

    tokenizer, encoders = tiny_tokenizer(WORDS, max_length=24), [tiny_t5(**T5_CONFIG) for _ in range(2)]
    accuracies = [
        train_text_encoder(tokenizer, encoder, steps=2, batch_size=16, **kwargs)
        for encoder, kwargs in zip(encoders, [{}, {"device": torch.device("cpu")}])
    ]
    assert accuracies[0] == accuracies[1]
    assert all(torch.equal(v, encoders[1].state_dict()[k]) for k, v in encoders[0].state_dict().items())


def test_tf32_only_on_cuda_and_restored():
    before = torch.backends.cuda.matmul.allow_tf32
    with recipe._tf32(torch.device("cpu")):
        assert torch.backends.cuda.matmul.allow_tf32 == before
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with recipe._tf32(torch.device("cuda")):  # sets the flag only: no CUDA needed
            assert torch.backends.cuda.matmul.allow_tf32
        assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_tiny_run_places_every_model_on_the_device(tmp_path, monkeypatch):
    """The whole recipe on 16 images (2 steps of each model): each model it builds is moved to the given device, the
    report records it, and the pipeline folder is complete."""
    moves = []
    module_to = torch.nn.Module.to

    def recording_to(self, *args, **kwargs):
        target = args[0] if args and isinstance(args[0], (str, torch.device)) else kwargs.get("device")
        if target is not None:
            moves.append((type(self).__name__, torch.device(target)))
        return module_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", recording_to)
    # small batches and suite: the stages' wiring is under test, not their cost
    monkeypatch.setattr(recipe, "train_vae", functools.partial(recipe.train_vae, batch_size=4))
    monkeypatch.setattr(recipe, "train_text_encoder", functools.partial(recipe.train_text_encoder, batch_size=32))
    monkeypatch.setattr(recipe, "autoencoder_ceiling", functools.partial(recipe.autoencoder_ceiling, n=2))
    overrides = ["max_steps=2", "checkpoint_every=2", "validation.every=0", "data.batch_size=4"]
    report = recipe.run(
        str(tmp_path), "configs/microshapes.yaml", 16, 2, overrides, device="cpu", text_encoder_steps=2
    )

    moved = {name for name, device in moves if device == torch.device("cpu")}
    assert {"AutoencoderKL", "T5EncoderModel", "SlotHead"} <= moved, moves
    assert report["device"] == report["encoder_device"] == "cpu"
    assert (report["vae_steps"], report["text_encoder_steps"]) == (2, 2)
    assert set(report["stages"]) == {"data_s", "vae_s", "text_encoder_s", "features_s", "dit_s", "total_s"}
    assert json.loads((tmp_path / "recipe_report.json").read_text())["device"] == "cpu"
    index = json.loads((tmp_path / "pipeline" / "model_index.json").read_text())
    assert {"tokenizer", "text_encoder", "vae", "transformer", "scheduler"} <= set(index)


def test_the_shipped_config_is_found_from_any_directory(tmp_path, monkeypatch):
    """``python -m dit.microshapes.recipe`` outside the repository: the default config is package data."""
    from pathlib import Path

    from dit.train import load_config

    monkeypatch.chdir(tmp_path)
    assert Path(recipe.DEFAULT_CONFIG).is_absolute() and Path(recipe.DEFAULT_CONFIG).is_file()
    config = load_config(recipe.DEFAULT_CONFIG, ["data.path=x"])
    assert config.model.kwargs["in_channels"] == 8 and config.objective.name == "x0"

"""The README's "Train on your own images" journey on photo-like images of mixed sizes and formats (one empty
caption, one corrupt file, one malformed metadata line): ``dit extract`` with the shipped MicroShapes model warns
that it cannot represent them, and training with a batch that no size bucket fills trains on every sample."""

import contextlib
import io
import json
import random

import numpy as np
import pytest
from PIL import Image

from dit.cli import default_model
from dit.cli import main as cli_main
from dit.microshapes.world import paraphrase, random_scene, render
from dit.train import Trainer, load_config
from tests.tiny import TINY, photo_folder

# the shipped model's features: 8 latent channels, 64-wide text features; at 32 px its VAE gives 16x16 latents
SHIPPED_FEATURES = ["model.kwargs.in_channels=8", "model.kwargs.out_channels=16", "model.kwargs.caption_channels=64"]


def _extract(data, out) -> tuple[int, str]:
    """``dit extract`` with the shipped model, in process: (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli_main(["extract", str(data), "--pipeline", str(default_model()), "--out", str(out),
                         "--resolution", "32", "--max-length", "24", "--batch-size", "4"])  # fmt: skip
    return code, err.getvalue()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """(features folder, usable samples, extract's stderr) of the photo-like folder."""
    root = tmp_path_factory.mktemp("own")
    data, usable = photo_folder(root / "photos")
    code, err = _extract(data, root / "features")
    assert code == 0, err
    return root / "features", usable, err


def _report(features) -> dict:
    return json.loads((features / "extract_report-p0.json").read_text())


def test_extract_warns_that_the_shipped_base_cannot_represent_photos(photos):
    features, usable, err = photos
    report = _report(features)
    assert report["written"] == usable and report["broken"] == 2 and report["empty_captions"] == 1
    assert report["unk_share"] > 0.3 and "astronaut" in report["unknown_words"]
    assert report["reconstruction_psnr"] < 20 and report["checked_images"] == 4
    warnings = [line for line in err.splitlines() if "cannot represent this data" in line]
    assert len(warnings) == 1 and "<unk>" in warnings[0] and "dB PSNR" in warnings[0]
    assert "--pipeline" in warnings[0] and "PixArt" in warnings[0]


def test_extract_of_microshapes_data_gives_no_warning(tmp_path):
    rng, rows = random.Random(0), []
    (tmp_path / "shapes").mkdir()
    for i in range(6):
        scene = random_scene(rng)
        Image.fromarray(np.asarray(render(scene, 32, 32))).save(tmp_path / "shapes" / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": paraphrase(scene, rng)}))
    (tmp_path / "shapes" / "metadata.jsonl").write_text("\n".join(rows))
    code, err = _extract(tmp_path / "shapes", tmp_path / "features")
    report = _report(tmp_path / "features")
    assert code == 0 and "cannot represent" not in err
    assert report["unk_share"] == 0 and report["reconstruction_psnr"] > 20


def test_training_on_photos_with_a_batch_no_bucket_fills_uses_every_sample(photos, tmp_path, capsys):
    features, usable, _ = photos
    sizes = _report(features)["buckets"]
    assert len(sizes) > 1 and min(sizes.values()) < 4  # buckets a batch of 4 does not fill
    config = load_config(TINY, [f"data.path={features}", f"output_dir={tmp_path / 'run'}", *SHIPPED_FEATURES,
                                "data.batch_size=4", "max_steps=2", "checkpoint_every=2"])  # fmt: skip
    trainer = Trainer(config)
    line = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("training on"))
    assert line.startswith(f"training on {usable} of {usable} samples") and " from " in line
    epoch = trainer.plan.epoch_batches(0)
    assert sorted(i for batch in epoch for i in batch) == list(range(usable))  # 12 samples: 3 batches of 4
    losses = trainer.train()
    assert len(losses) == 2 and all(np.isfinite(losses))

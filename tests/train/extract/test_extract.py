"""dit extract (image folder, webdataset, broken samples, any resolution, control features) and training from its
shards with validation grids. Resume and multi-process extraction: test_extract_resume.py."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dit.cli import main as cli_main
from dit.train import Trainer, load_config
from dit.train.extract.extraction import bucket_of, extract
from tests.tiny import TINY, _image_folder, _png, save_tiny_pipeline


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("pipeline"))


def _extract_cli(data, pipeline_dir, out, *extra) -> int:
    return cli_main(["extract", str(data), "--pipeline", str(pipeline_dir), "--out", str(out), "--resolution", "16",
                     "--no-bucketing", "--max-length", "8", *extra])  # fmt: skip


def test_extract_image_folder_skips_and_counts_broken(tmp_path, pipeline_dir):
    data = _image_folder(tmp_path / "images")
    with (data / "metadata.jsonl").open("a") as f:
        f.write("\n" + json.dumps({"file_name": "gone.png", "text": "a missing file"}))
    assert _extract_cli(data, pipeline_dir, tmp_path / "features", "--batch-size", "6") == 0
    report = json.loads((tmp_path / "features" / "extract_report-p0.json").read_text())
    assert report["written"] == 5 and report["broken"] == 2 and report["empty_captions"] == 1
    broken = {b["line"]: b for b in report["broken_samples"]}
    assert sorted(broken) == [5, 7]  # metadata.jsonl line numbers (bad.png, gone.png)
    assert "unreadable image" in broken[5]["reason"] and broken[5]["key"] == "bad.png"
    assert "gone.png" in broken[7]["reason"] and broken[7]["index"] == 6
    shards = [load_file(p) for p in sorted((tmp_path / "features").glob("16x16-*.safetensors"))]
    assert sum(s["latent_mean"].shape[0] for s in shards) == 5
    assert shards[0]["latent_mean"].shape[1:] == (4, 8, 8) and shards[0]["text_embeds"].shape[1:] == (8, 32)
    null = load_file(tmp_path / "features" / "null_caption.safetensors")
    assert null["text_mask"].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]  # "" is just the end-of-sequence token


def test_broken_samples_never_abort_a_batch(tmp_path, pipeline_dir):
    data = _image_folder(tmp_path / "images")
    rows = [{"file_name": "bad.png", "text": "x"}] * 3 + [{"file_name": "0.png", "text": "a red circle"}]
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    report = extract("imagefolder", data, pipeline_dir, tmp_path / "f", resolution=16, batch_size=4, bucketing=False)
    assert report["written"] == 1 and report["broken"] == 3
    assert [b["line"] for b in report["broken_samples"]] == [1, 2, 3]


def test_malformed_metadata_lines_are_skipped_with_their_line_number(tmp_path, pipeline_dir):
    data = _image_folder(tmp_path / "images", broken=False)
    lines = (data / "metadata.jsonl").read_text().splitlines()
    lines[1:1] = ['{"file_name": "1.png", "text": ', "", "[1, 2]", '{"text": "no file name"}']
    (data / "metadata.jsonl").write_text("\n".join(lines))
    report = extract("imagefolder", data, pipeline_dir, tmp_path / "f", resolution=16, bucketing=False)
    assert report["written"] == 4 and report["broken"] == 3
    reasons = {b["line"]: b["reason"] for b in report["broken_samples"]}
    assert sorted(reasons) == [2, 4, 5]  # the blank line 3 is no sample
    assert "malformed metadata.jsonl line 2" in reasons[2] and "not a JSON object" in reasons[4]
    assert "file_name" in reasons[5]


def test_an_empty_caption_is_an_unconditional_sample_unless_skipped(tmp_path, pipeline_dir):
    data = _image_folder(tmp_path / "images", broken=False)
    rows = [{"file_name": "0.png", "text": ""}, {"file_name": "1.png", "text": "  "}, {"file_name": "2.png"}]
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    report = extract(
        "imagefolder", data, pipeline_dir, tmp_path / "kept", resolution=16, bucketing=False, max_length=8
    )
    assert report["written"] == 2 and report["empty_captions"] == 2 and report["broken"] == 1
    assert "no caption" in report["broken_samples"][0]["reason"]  # no text/caption field at all
    (shard,) = [load_file(p) for p in (tmp_path / "kept").glob("16x16-*.safetensors")]
    null = load_file(tmp_path / "kept" / "null_caption.safetensors")
    torch.testing.assert_close(shard["text_embeds"][0], null["text_embeds"])
    assert _extract_cli(data, pipeline_dir, tmp_path / "skipped", "--skip-empty-captions") == 0
    report = json.loads((tmp_path / "skipped" / "extract_report-p0.json").read_text())
    assert report["written"] == 0 and report["broken"] == 3
    assert [b["reason"] for b in report["broken_samples"][:2]] == ["empty caption (--skip-empty-captions)"] * 2


def test_a_corrupt_tar_shard_is_one_broken_sample(tmp_path, pipeline_dir):
    folder = tmp_path / "shards"
    folder.mkdir()
    _tar(folder / "000.tar", [("a", "a red circle"), ("b", "a blue square")])
    (folder / "001.tar").write_bytes(b"not a tar file at all" * 40)
    report = extract("webdataset", folder, pipeline_dir, tmp_path / "f", resolution=16, bucketing=False, max_length=8)
    assert report["written"] == 2 and report["broken"] == 1
    assert (
        report["broken_samples"][0]["key"] == "001.tar" and "unreadable tar" in report["broken_samples"][0]["reason"]
    )


def _tar(path, items):
    with tarfile.open(path, "w") as tar:
        for key, caption in items:
            for name, data in [(f"{key}.png", _png((200, 10, 10), (16, 16))), (f"{key}.txt", caption.encode())]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_extract_webdataset(tmp_path, pipeline_dir):
    shard = tmp_path / "shards" / "000.tar"
    shard.parent.mkdir()
    _tar(shard, [("a", "a red circle"), ("b", "a blue square")])
    report = extract(
        "webdataset", shard.parent, pipeline_dir, tmp_path / "f", resolution=16, bucketing=False, max_length=8
    )
    assert report["written"] == 2 and report["broken"] == 0


def test_pixart_buckets():
    assert bucket_of(300, 200, 256) == (208, 304)  # the 256px bin nearest to a 3:2 landscape
    assert bucket_of(200, 200, 512) == (512, 512)


def test_buckets_at_resolutions_without_pixart_bins():
    """Other resolutions: the nearest bin set scaled to them, sides rounded to the VAE factor x patch size."""
    assert bucket_of(300, 200, 64, multiple=4) == (52, 76)  # 208x304 / 4
    assert bucket_of(64, 64, 64, multiple=4) == (64, 64)
    assert bucket_of(1000, 250, 64, multiple=4) == (32, 128)
    for size in [(10, 10), (300, 7), (7, 300), (640, 480)]:
        height, width = bucket_of(*size, 100, multiple=16)
        assert height % 16 == 0 and width % 16 == 0 and 0.5 < height * width / 100**2 < 1.5


def test_extract_at_a_resolution_without_pixart_bins(tmp_path, pipeline_dir, capsys):
    data = _image_folder(tmp_path / "images", broken=False)  # 20x16 .. 32x16 images
    code = cli_main(["extract", str(data), "--pipeline", str(pipeline_dir), "--out", str(tmp_path / "f"),
                     "--resolution", "32", "--max-length", "8"])  # fmt: skip
    assert code == 0
    assert "256 px bins scaled to 32 px" in capsys.readouterr().out
    sizes = {tuple(load_file(p)["latent_mean"].shape[-2:]) for p in (tmp_path / "f").glob("*x*-p0-*.safetensors")}
    assert sizes and all(h < w <= 32 for h, w in sizes)  # landscape latents of buckets of about 32x32 px


def test_a_resolution_that_does_not_divide_into_patches_is_a_clear_error(tmp_path, pipeline_dir, capsys):
    data = _image_folder(tmp_path / "images", broken=False)
    assert _extract_cli(data, pipeline_dir, tmp_path / "f", "--resolution", "18") == 2
    err = capsys.readouterr().err
    assert "--resolution 18" in err and "multiple of 4" in err and "16 or 20" in err
    assert "Traceback" not in err and not (tmp_path / "f").exists()
    assert _extract_cli(data, pipeline_dir, tmp_path / "f", "--resolution", "0") == 2
    assert "--resolution 0" in capsys.readouterr().err


def test_train_from_extracted_features_with_validation(tmp_path, pipeline_dir):
    data = _image_folder(tmp_path / "images", broken=False)
    extract("imagefolder", data, pipeline_dir, tmp_path / "features", resolution=16, bucketing=False, max_length=8)
    config = load_config(TINY, [f"data.path={tmp_path / 'features'}", f"output_dir={tmp_path / 'run'}", "max_steps=2",
                                "data.batch_size=2", "validation.every=2", f"validation.pipeline={pipeline_dir}",
                                "validation.steps=2", "validation.height=16", "validation.width=16"])  # fmt: skip
    config.validation.prompts = ["a red circle", "a blue square"]
    Trainer(config).train()
    grid = Image.open(tmp_path / "run" / "validation" / "step-0000002.png")
    assert grid.width == 2 * 128 and grid.height > 128  # two 16 px samples scaled up 8x, captions under them
    assert np.asarray(grid).std() > 0
    assert list((tmp_path / "run" / "logs").rglob("events.out.tfevents.*"))  # TensorBoard scalars and images


def test_extract_saved_hf_dataset(tmp_path, pipeline_dir):
    datasets = pytest.importorskip("datasets")
    images = [Image.new("RGB", (16, 16), c) for c in [(200, 20, 20), (20, 20, 200), (20, 200, 20)]]
    dataset = datasets.Dataset.from_dict({"image": images, "text": ["a red square", "a blue square", ""]})
    dataset = dataset.cast_column("image", datasets.Image())
    dataset.save_to_disk(str(tmp_path / "hf"))
    report = extract("hf", tmp_path / "hf", pipeline_dir, tmp_path / "f", resolution=16, bucketing=False, max_length=8)
    assert report["written"] == 3 and report["broken"] == 0 and report["empty_captions"] == 1


def _shapes_folder(root, n: int = 4, size: int = 16) -> list:
    """MicroShapes scenes rendered into an image folder (one and two objects on plain backgrounds)."""
    from dit.microshapes.control import control_scenes
    from dit.microshapes.world import caption, render

    scenes = control_scenes(n, seed=1, two_objects=0.5)
    root.mkdir()
    for i, scene in enumerate(scenes):
        Image.fromarray(render(scene, size, size)).save(root / f"{i}.png")
    rows = [{"file_name": f"{i}.png", "text": caption(scene)} for i, scene in enumerate(scenes)]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return scenes


def _encode_controls(pipeline_dir, controls: torch.Tensor) -> torch.Tensor:
    from diffusers import AutoencoderKL

    from dit.pipelines.controlnet import encode_control

    with torch.no_grad():
        return encode_control(AutoencoderKL.from_pretrained(pipeline_dir / "vae"), controls)


def test_controls_computed_from_images_match_microshapes_controls():
    from dit.microshapes.control import control_image, control_scenes
    from dit.microshapes.world import render
    from dit.train.extract.control_images import control_from_image

    for scene in control_scenes(20, seed=3, two_objects=0.5):
        for kind in ("silhouette", "edges"):
            expected = control_image(scene, 40, 32, kind)
            np.testing.assert_array_equal(control_from_image(render(scene, 40, 32), kind), expected)
    with pytest.raises(ValueError, match="silhouette"):
        control_from_image(np.zeros((4, 4, 3), np.uint8), "canny")


@pytest.mark.parametrize("kind", ["silhouette", "edges"])
def test_extract_control_latents_computed_from_each_image(tmp_path, pipeline_dir, kind):
    from dit.microshapes.control import control_image
    from dit.pipelines.controlnet import control_tensor

    scenes = _shapes_folder(tmp_path / "images")
    assert _extract_cli(tmp_path / "images", pipeline_dir, tmp_path / "f", "--control", kind) == 0
    (shard,) = [load_file(p) for p in (tmp_path / "f").glob("16x16-*.safetensors")]
    controls = control_tensor([control_image(scene, 16, 16, kind) for scene in scenes])  # (B, 3, 16, 16)
    torch.testing.assert_close(shard["control_latent"], _encode_controls(pipeline_dir, controls))
    assert shard["control_latent"].shape == shard["latent_mean"].shape
    assert json.loads((tmp_path / "f" / "extract_config.json").read_text())["control"] == kind


def test_extract_control_images_from_a_folder(tmp_path, pipeline_dir):
    """FOLDER holds one control image per image under the same file name; a missing one is a broken sample."""
    from dit.train.extract.extraction import image_tensor

    data = _image_folder(tmp_path / "images", broken=False)
    controls = tmp_path / "controls"
    controls.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):  # no control for 3.png
        pixels = (rng.random((16, 20 + 4 * i)) > 0.5).astype(np.uint8) * 255
        Image.fromarray(pixels).save(controls / f"{i}.png")
    assert _extract_cli(data, pipeline_dir, tmp_path / "f", "--control", str(controls)) == 0
    report = json.loads((tmp_path / "f" / "extract_report-p0.json").read_text())
    assert report["written"] == 3 and report["broken"] == 1
    assert "no control image" in report["broken_samples"][0]["reason"] and report["broken_samples"][0]["line"] == 4
    (shard,) = [load_file(p) for p in (tmp_path / "f").glob("16x16-*.safetensors")]
    expected = torch.stack([image_tensor(Image.open(controls / f"{i}.png").convert("RGB"), 16, 16) for i in range(3)])
    torch.testing.assert_close(shard["control_latent"], _encode_controls(pipeline_dir, expected))


def test_controlnet_trains_from_extracted_control_features(tmp_path, pipeline_dir):
    """`dit extract --control edges` writes what the trainer reads for ControlNet training."""
    _shapes_folder(tmp_path / "images")
    assert _extract_cli(tmp_path / "images", pipeline_dir, tmp_path / "f", "--control", "edges") == 0
    config = load_config(TINY, [f"data.path={tmp_path / 'f'}", f"output_dir={tmp_path / 'run'}", "max_steps=2",
                                "data.batch_size=2", f"model.pretrained={pipeline_dir / 'transformer'}",
                                "controlnet.num_blocks=1", "checkpoint_every=2", "report_to=none"])  # fmt: skip
    losses = Trainer(config).train()
    assert len(losses) == 2 and all(np.isfinite(losses))

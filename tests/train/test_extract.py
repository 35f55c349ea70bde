"""dit extract (image folder, webdataset, broken samples) and training from its shards with validation grids."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from dit import PixArtTransformer
from dit.cli import main as cli_main
from dit.pipelines import TextToImagePipeline
from dit.train import Trainer, load_config
from dit.train.extract import bucket_of, extract
from tests.tiny import SIGMA, randomize_, tiny_t5, tiny_tokenizer, tiny_vae
from tests.train.test_trainer import TINY

CAPTIONS = ["a red circle", "a blue square on the left", "a green triangle", "a cyan circle on the right"]


def _png(color, size) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    transformer = randomize_(PixArtTransformer(**SIGMA), std=0.05)
    pipe = TextToImagePipeline(
        tokenizer=tiny_tokenizer(), text_encoder=tiny_t5(), vae=tiny_vae(), transformer=transformer, scheduler=None
    )
    pipe.save_pretrained(folder)
    return folder


def _image_folder(root, broken=True):
    root.mkdir()
    rows = []
    for i, caption in enumerate(CAPTIONS):
        (root / f"{i}.png").write_bytes(_png((40 * i, 100, 200), (20 + 4 * i, 16)))
        rows.append({"file_name": f"{i}.png", "text": caption})
    if broken:
        (root / "bad.png").write_bytes(b"not an image")
        rows += [{"file_name": "bad.png", "text": "broken"}, {"file_name": "0.png", "text": ""}]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def test_extract_image_folder_skips_and_counts_broken(tmp_path, pipeline_dir):
    data = _image_folder(tmp_path / "images")
    code = cli_main(["extract", str(data), "--pipeline", str(pipeline_dir), "--out", str(tmp_path / "features"),
                     "--resolution", "16", "--no-bucketing", "--batch-size", "6", "--max-length", "8"])  # fmt: skip
    assert code == 0
    report = json.loads((tmp_path / "features" / "extract_report-p0.json").read_text())
    assert report["written"] == 4 and report["broken"] == 2
    assert any("unreadable image" in r for r in report["broken_samples"])
    assert any("missing caption" in r for r in report["broken_samples"])
    shards = [load_file(p) for p in sorted((tmp_path / "features").glob("16x16-*.safetensors"))]
    assert sum(s["latent_mean"].shape[0] for s in shards) == 4
    assert shards[0]["latent_mean"].shape[1:] == (4, 8, 8) and shards[0]["text_embeds"].shape[1:] == (8, 32)
    null = load_file(tmp_path / "features" / "null_caption.safetensors")
    assert null["text_mask"].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]  # "" is just the end-of-sequence token


def test_too_many_broken_in_a_batch_is_an_error(tmp_path, pipeline_dir):
    data = _image_folder(tmp_path / "images")
    rows = [{"file_name": "bad.png", "text": "x"}] * 3 + [{"file_name": "0.png", "text": "a red circle"}]
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(RuntimeError, match="3 of 4 samples in a batch are broken"):
        extract("imagefolder", data, pipeline_dir, tmp_path / "f", resolution=16, batch_size=4, bucketing=False)


def test_extract_webdataset(tmp_path, pipeline_dir):
    shard = tmp_path / "shards" / "000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for key, caption in [("a", "a red circle"), ("b", "a blue square")]:
            for name, data in [(f"{key}.png", _png((200, 10, 10), (16, 16))), (f"{key}.txt", caption.encode())]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    report = extract(
        "webdataset", shard.parent, pipeline_dir, tmp_path / "f", resolution=16, bucketing=False, max_length=8
    )
    assert report["written"] == 2 and report["broken"] == 0


def test_pixart_buckets():
    assert bucket_of(300, 200, 256) == (208, 304)  # the 256px bin nearest to a 3:2 landscape
    assert bucket_of(200, 200, 512) == (512, 512)
    with pytest.raises(ValueError, match="bins exist"):
        bucket_of(10, 10, 100)


def test_train_from_extracted_features_with_validation(tmp_path, pipeline_dir):
    data = _image_folder(tmp_path / "images", broken=False)
    extract("imagefolder", data, pipeline_dir, tmp_path / "features", resolution=16, bucketing=False, max_length=8)
    config = load_config(TINY, [f"data.path={tmp_path / 'features'}", f"output_dir={tmp_path / 'run'}", "max_steps=2",
                                "data.batch_size=2", "validation.every=2", f"validation.pipeline={pipeline_dir}",
                                "validation.steps=2", "validation.height=16", "validation.width=16"])  # fmt: skip
    config.validation.prompts = ["a red circle", "a blue square"]
    Trainer(config).train()
    grid = Image.open(tmp_path / "run" / "validation" / "step-0000002.png")
    assert grid.size == (32, 16)
    assert np.asarray(grid).std() > 0
    assert list((tmp_path / "run" / "logs").rglob("events.out.tfevents.*"))  # TensorBoard scalars and images


def test_extract_saved_hf_dataset(tmp_path, pipeline_dir):
    datasets = pytest.importorskip("datasets")
    images = [Image.new("RGB", (16, 16), c) for c in [(200, 20, 20), (20, 20, 200), (20, 200, 20)]]
    dataset = datasets.Dataset.from_dict({"image": images, "text": ["a red square", "a blue square", ""]})
    dataset = dataset.cast_column("image", datasets.Image())
    dataset.save_to_disk(str(tmp_path / "hf"))
    report = extract("hf", tmp_path / "hf", pipeline_dir, tmp_path / "f", resolution=16, bucketing=False, max_length=8)
    assert report["written"] == 2 and report["broken"] == 1

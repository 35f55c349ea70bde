"""dit extract writes shards as it goes, resumes where it stopped, checks its settings on resume, and splits the
records across processes under accelerate."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dit.train.extract.extraction import extract
from dit.train.extract.sources import Record
from tests.tiny import free_port, save_tiny_pipeline

N = 11  # images; record 3 is corrupt


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("pipeline"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"picture number {i}"})
    (root / "3.png").write_bytes(b"corrupt")
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


@pytest.fixture(scope="module")
def one_run(tmp_path_factory, data, pipeline_dir) -> Path:
    """A one-process run without interruption: the reference for resumed and two-process runs."""
    out = tmp_path_factory.mktemp("one") / "features"
    extract("imagefolder", data, pipeline_dir, out, **SETTINGS)
    return out


SETTINGS = dict(resolution=16, bucketing=False, max_length=8, batch_size=2, shard_size=3)


def samples_by_record(out: Path) -> dict[int, dict[str, torch.Tensor]]:
    """Every sample of every shard listed in the progress files, by record index (ranges are [start, stop, step])."""
    samples = {}
    for progress in sorted(out.glob("extract_progress-p*.json")):
        for name, ranges in json.loads(progress.read_text())["shards"].items():
            tensors = load_file(out / name)
            indices = [i for start, stop, step in ranges for i in range(start, stop, step)]
            assert len(indices) == tensors["latent_mean"].shape[0], name
            for row, index in enumerate(indices):
                assert index not in samples, f"record {index} is in two shards"
                samples[index] = {k: v[row] for k, v in tensors.items()}
    return samples


def assert_same_samples(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for index in a:
        for key in ("latent_mean", "latent_std", "text_embeds", "text_mask"):
            torch.testing.assert_close(a[index][key], b[index][key], rtol=1e-5, atol=1e-6, msg=f"{index} {key}")


def _crash_at(monkeypatch, file_name: str) -> None:
    load = Record.load

    def crashing(self):
        if file_name in self.key:
            raise RuntimeError("simulated crash")
        return load(self)

    monkeypatch.setattr(Record, "load", crashing)


def test_shards_are_written_as_they_go_and_a_rerun_resumes(tmp_path, data, pipeline_dir, one_run, monkeypatch):
    out = tmp_path / "features"
    _crash_at(monkeypatch, "8.png")
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract("imagefolder", data, pipeline_dir, out, **SETTINGS)
    # records 0-7 were read (3 broken): 7 good, two full shards of 3 written, one sample lost
    progress = json.loads((out / "extract_progress-p0.json").read_text())
    assert progress["shards"] == {"16x16-p0-00000.safetensors": [[0, 3, 1]],
                                  "16x16-p0-00001.safetensors": [[4, 7, 1]]}  # fmt: skip
    assert sorted(p.name for p in out.glob("*-p0-*.safetensors")) == list(progress["shards"])
    monkeypatch.undo()
    report = extract("imagefolder", data, pipeline_dir, out, **SETTINGS)
    assert report["resumed"] == 6 and report["written"] == 4 and report["broken"] == 1 and report["records"] == N
    assert [b["index"] for b in report["broken_samples"]] == [3]
    assert len(list(out.glob("16x16-p0-*.safetensors"))) == 4  # 3 + 3 + 3 + 1
    assert_same_samples(samples_by_record(out), samples_by_record(one_run))
    again = extract("imagefolder", data, pipeline_dir, out, **SETTINGS)  # a finished run: nothing to do
    assert again["resumed"] == 10 and again["written"] == 0


def test_unfinished_and_unlisted_shards_do_not_count(tmp_path, data, pipeline_dir, one_run):
    """A shard still under its temporary name, or renamed but not yet in the progress file, is redone."""
    out = tmp_path / "features"
    shutil.copytree(one_run, out)
    progress = json.loads((out / "extract_progress-p0.json").read_text())
    del progress["shards"]["16x16-p0-00003.safetensors"]  # the crash came before the progress file was written
    (out / "extract_progress-p0.json").write_text(json.dumps(progress))
    shutil.copy(out / "16x16-p0-00002.safetensors", out / "16x16-p0-00004.safetensors.tmp")
    report = extract("imagefolder", data, pipeline_dir, out, **SETTINGS)
    assert report["written"] == 1 and report["resumed"] == 9
    assert not list(out.glob("*.tmp"))
    assert_same_samples(samples_by_record(out), samples_by_record(one_run))
    assert len(list(out.glob("16x16-*.safetensors"))) == 4


def test_a_resume_with_another_number_of_processes_skips_what_every_process_did(tmp_path, data, pipeline_dir, one_run):
    """Shards of a rank beyond this run's world size count as done; its unlisted shards are removed."""
    out = tmp_path / "features"
    shutil.copytree(one_run, out)
    progress = json.loads((out / "extract_progress-p0.json").read_text())
    for name in progress["shards"]:
        (out / name).rename(out / name.replace("-p0-", "-p1-"))
    shards = {name.replace("-p0-", "-p1-"): ranges for name, ranges in progress["shards"].items()}
    (out / "extract_progress-p1.json").write_text(json.dumps({"rank": 1, "shards": shards}))
    (out / "extract_progress-p0.json").unlink()
    shutil.copy(out / "16x16-p1-00000.safetensors", out / "16x16-p1-00007.safetensors")  # renamed, never listed
    report = extract("imagefolder", data, pipeline_dir, out, **SETTINGS)
    assert report["resumed"] == 10 and report["written"] == 0
    assert not (out / "16x16-p1-00007.safetensors").exists()
    assert_same_samples(samples_by_record(out), samples_by_record(one_run))


def test_extract_config_and_resuming_with_other_settings(tmp_path, data, pipeline_dir, one_run):
    config = json.loads((one_run / "extract_config.json").read_text())
    assert config == {"pipeline": str(pipeline_dir.resolve()), "resolution": 16, "max_length": 8,
                      "source": "imagefolder", "data": str(data.resolve()), "bucketing": False, "control": None}  # fmt: skip
    out = tmp_path / "features"
    shutil.copytree(one_run, out)
    for change, message in [({"resolution": 32}, "resolution=16.*resolution=32"), ({"max_length": 6}, "max_length"),
                            ({"bucketing": True}, "bucketing")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            extract("imagefolder", data, pipeline_dir, out, **{**SETTINGS, **change})
    other = save_tiny_pipeline(tmp_path / "other_pipeline")
    with pytest.raises(ValueError, match="pipeline=.*other_pipeline.*another --out"):
        extract("imagefolder", data, other, out, **SETTINGS)


def test_shards_of_an_unknown_extraction_are_not_mixed_in(tmp_path, data, pipeline_dir, one_run):
    out = tmp_path / "features"
    shutil.copytree(one_run, out)
    (out / "extract_config.json").unlink()
    with pytest.raises(ValueError, match="no extract_config.json"):
        extract("imagefolder", data, pipeline_dir, out, **SETTINGS)


def _launch(args: list[str]) -> subprocess.CompletedProcess:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("entry", ["module", "dit"])
def test_two_processes_split_the_records(tmp_path, data, pipeline_dir, one_run, entry):
    """`accelerate launch -m dit.train.extract` and `accelerate launch $(which dit) extract`: each process takes
    every second record and writes its own shards and report; together they hold the one-process run's samples."""
    out = tmp_path / "features"
    options = [str(data), "--pipeline", str(pipeline_dir), "--out", str(out), "--resolution", "16", "--no-bucketing",
               "--max-length", "8", "--batch-size", "2", "--shard-size", "3"]  # fmt: skip
    dit = shutil.which("dit", path=str(Path(sys.executable).parent))
    args = ["-m", "dit.train.extract", *options] if entry == "module" else [dit, "extract", *options]
    result = _launch(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0 of 2" in result.stdout and "rank 1 of 2" in result.stdout
    reports = [json.loads((out / f"extract_report-p{r}.json").read_text()) for r in range(2)]
    assert [(r["rank"], r["world_size"]) for r in reports] == [(0, 2), (1, 2)]
    assert [r["records"] for r in reports] == [6, 5] and [r["written"] for r in reports] == [6, 4]
    assert reports[1]["broken_samples"][0]["index"] == 3
    for rank in range(2):
        ranges = json.loads((out / f"extract_progress-p{rank}.json").read_text())["shards"].values()
        assert all(i % 2 == rank for r in ranges for start, stop, step in r for i in range(start, stop, step))
        assert list(out.glob(f"16x16-p{rank}-*.safetensors"))
    assert_same_samples(samples_by_record(out), samples_by_record(one_run))
    assert (out / "null_caption.safetensors").is_file() and (out / "extract_config.json").is_file()

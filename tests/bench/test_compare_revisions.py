"""bench/compare_revisions.py: each tree imports its own code, the two trees must measure the same model config, and
the summary is the median of our model's runs per case, after / before."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
import compare_revisions  # noqa: E402


def _forward(ours, diffusers, memory=100, config=None) -> dict:
    case = {"variant": "sigma", "size_px": 64, "dtype": "fp32"}
    case.update({"ours": {"runs_s": ours, "peak_memory_bytes": memory},
                 "diffusers": {"runs_s": diffusers, "peak_memory_bytes": 2 * memory}})  # fmt: skip
    return {"config": config or {"num_layers": 1}, "cases": [case]}


def test_a_tree_imports_its_own_packages(tmp_path):
    head = compare_revisions.git("rev-parse", "HEAD")
    tree = compare_revisions.export(head, tmp_path / "tree")
    farm = compare_revisions.link_farm(tree, tmp_path / "path")
    files = compare_revisions.check_imports(tree, farm)
    assert set(files) == {"dit", "dit.pipelines", "dit.train", "dit.configs"}
    assert all(Path(path).is_relative_to(tree) for path in files.values()), files


def test_a_package_imported_from_elsewhere_is_refused(tmp_path):
    """Without the links at dit.pipelines/... the editable install brings the working tree's: an error."""
    head = compare_revisions.git("rev-parse", "HEAD")
    tree = compare_revisions.export(head, tmp_path / "tree")
    farm = tmp_path / "path"
    (farm / "dit").mkdir(parents=True)
    for entry in (tree / "dit").iterdir():
        (farm / "dit" / entry.name).symlink_to(entry)
    with pytest.raises(RuntimeError, match=r"resolve outside .*dit\.pipelines"):
        compare_revisions.check_imports(tree, farm)


def test_medians_pool_every_round_and_ratios_are_after_over_before():
    runs = {
        "before": {"backbone_forward": [_forward([1.0, 3.0], [2.0, 2.0]), _forward([2.0], [2.0])]},
        "after": {"backbone_forward": [_forward([1.0, 1.0], [4.0, 4.0], 50), _forward([1.0], [4.0], 50)]},
    }
    case = compare_revisions.summarize(runs)["backbone_forward: sigma 64px fp32"]
    assert case["before_median_s"] == 2.0 and case["after_median_s"] == 1.0 and case["ratio"] == 0.5
    assert case["diffusers_ratio"] == 2.0 and case["memory_ratio"] == 0.5
    # ours over diffusers per run: before 0.5, 1.5 (round 1), 1.0 (round 2); after 0.25, 0.25 (round 1), 0.25
    assert case["relative_ratio"] == 0.25
    assert case["before_runs_s"] == [1.0, 3.0, 2.0]


def test_trees_that_measured_different_configs_are_an_error():
    same = {"before": [_forward([1.0], [1.0])], "after": [_forward([1.0], [1.0])]}
    assert compare_revisions.check_configs("backbone_forward", same) == {"num_layers": 1}
    other = {"before": same["before"], "after": [_forward([1.0], [1.0], config={"num_layers": 2})]}
    with pytest.raises(RuntimeError, match=r"different configs: \{'num_layers': \[1, 2\]\}"):
        compare_revisions.check_configs("backbone_forward", other)


def test_the_before_tree_takes_its_own_arguments():
    args = compare_revisions.parse_args(["--before", "HEAD", "--before-train-args", "--size 64"])
    assert compare_revisions.bench_args(args, "before", "train_step") == ["--size", "64", "--device", "cpu"]
    assert compare_revisions.bench_args(args, "after", "train_step")[:2] == ["--dtype", "fp32"]
    assert compare_revisions.bench_args(args, "before", "backbone_forward") == compare_revisions.bench_args(
        args, "after", "backbone_forward"
    )


@pytest.mark.slow  # about a minute: six processes that import torch and diffusers
def test_head_against_the_working_tree_writes_the_comparison(tmp_path):
    """One round of the forward benchmark at toy size (the scripts of both trees take these options)."""
    options = "--dtypes fp32 --sizes 64 --variants sigma --layers 1 --batch 1 --runs 1"
    cmd = [sys.executable, str(BENCH / "compare_revisions.py"), "--before", "HEAD", "--rounds", "1",
           "--benches", "backbone_forward", "--forward-args", options, "--out", str(tmp_path)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = tmp_path.glob("compare_revisions_*_worktree_cpu.json")
    payload = json.loads(path.read_text())
    assert payload["before"]["revision"] == compare_revisions.git("rev-parse", "HEAD")
    assert payload["after"]["revision"] == "working tree"
    assert payload["config"]["backbone_forward"]["num_layers"] == 1
    (case,) = payload["cases"].values()
    assert case["ratio"] > 0 and len(case["before_runs_s"]) == len(case["after_runs_s"]) == 1

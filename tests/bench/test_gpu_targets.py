"""bench/gpu_targets.py --tiny: issue 28's targets file at toy size on the CPU, its schema exactly as the GPU run
writes it (the values are meaningless here), the forward's profiles, and a group that fails or overruns its time."""

import json
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
NAMES = {
    "forward_512_b1_ms",
    "forward_speedup_vs_diffusers_eager",
    "forward_1024_b4_mfu",
    "train_step_mfu",
    "train_step_speedup_vs_diffusers",
    "lcm_1024_4step_end_to_end_s",
    "lit_layer_4096_speedup",
    "lit_xl_forward_speedup",
    "lit_xl_train_speedup",
    "diffusers_pipeline_speedup",
    "gpu_tests_failed",
}


@pytest.fixture(scope="module")
def gpu_targets():
    sys.path.insert(0, str(BENCH))
    import gpu_targets

    return gpu_targets


@pytest.fixture(scope="module")
def tiny_run(gpu_targets, tmp_path_factory):
    out = tmp_path_factory.mktemp("targets")
    return out, gpu_targets.main(["--tiny", "--out-dir", str(out)])


def test_every_target_is_measured_with_the_issue_schema(tiny_run):
    out, payload = tiny_run
    assert payload == json.loads((out / "gpu_targets.json").read_text())
    assert payload["benchmark"] == "gpu_targets" and payload["tiny"] is True
    assert isinstance(payload["machine"]["gpu"], str) and payload["machine"]["torch"]
    assert isinstance(payload["commit"], str) and payload["commit"]
    assert set(payload["targets"]) == NAMES
    for name, target in payload["targets"].items():
        assert "error" not in target, (name, target["error"])
        assert isinstance(target["value"], (int, float)) and not isinstance(target["value"], bool), name
        assert isinstance(target["target"], str) and isinstance(target["met"], bool), name
        assert target["wall_s"] >= 0
    assert payload["met"] is all(t["met"] for t in payload["targets"].values())
    assert json.loads((out / "gpu_suite.json").read_text())["parts"]["targets"]["met"] is payload["met"]


def test_the_forward_compares_every_mode_and_names_the_fastest(tiny_run):
    out, payload = tiny_run
    forward = payload["targets"]["forward_512_b1_ms"]
    modes = {"diffusers_eager", "diffusers_compiled", "ours_eager", "ours_regional", "ours_graphs"}
    assert set(forward["ms"]) == modes and forward["errors"] == {}
    assert forward["value"] == min(v for k, v in forward["ms"].items() if k.startswith("ours_"))
    assert forward["ms"][forward["fastest_mode"]] == forward["value"]
    assert all(diff < 1e-4 for diff in forward["max_abs_diff"].values())  # every mode computes the same
    speedup = payload["targets"]["forward_speedup_vs_diffusers_eager"]
    assert speedup["value"] == pytest.approx(forward["ms"]["diffusers_eager"] / forward["value"], rel=1e-2)
    assert speedup["diffusers_compiled_ms"] == forward["ms"]["diffusers_compiled"]
    profile = (out / forward["profile"]).read_text()
    for mode in {"ours_eager", forward["fastest_mode"]}:
        assert f"== {mode}" in profile
    assert profile.count("top ops by device time") == profile.count("top ops by host time") >= 1


def test_a_failing_or_overrunning_group_records_its_error_and_is_not_met(gpu_targets, monkeypatch):
    import argparse

    monkeypatch.setattr(gpu_targets, "MIN_GROUP_S", 0.5)
    args = argparse.Namespace(tiny=False, device="cpu")

    def broken(args, peak):
        raise RuntimeError("no such kernel")

    def slow(args, peak):
        time.sleep(30)

    failed = gpu_targets._run_group(broken, ["lit_layer_4096_speedup"], 60, args, 1.0)["lit_layer_4096_speedup"]
    assert failed["met"] is False and failed["value"] is None and "no such kernel" in failed["error"]
    names = ["train_step_mfu", "train_step_speedup_vs_diffusers"]
    started = time.perf_counter()
    timed_out = gpu_targets._run_group(slow, names, 1.0, args, 1.0)
    assert time.perf_counter() - started < 10
    assert all(t["met"] is False and "TimeoutError" in t["error"] for t in timed_out.values())
    skipped = gpu_targets._run_group(slow, names, 0.2, args, 1.0)
    assert all(t["met"] is False and "no time left" in t["error"] for t in skipped.values())


def test_a_nested_limit_ends_with_the_outer_one(gpu_targets):
    with pytest.raises(TimeoutError):
        with gpu_targets.time_limit(0.3):
            with gpu_targets.time_limit(60):
                time.sleep(2)


def test_targets_is_a_suite_part_but_not_a_default_one():
    sys.path.insert(0, str(BENCH))
    import gpu_suite

    assert "targets" in gpu_suite.PARTS
    assert "targets" not in gpu_suite.parse_args(["--tiny"]).parts.split(",")
    assert gpu_suite.parse_args(["--tiny", "--parts", "targets"]).parts == "targets"


def test_the_pipeline_target_takes_ours_fastest(tiny_run):
    _, payload = tiny_run
    pipeline = payload["targets"]["diffusers_pipeline_speedup"]
    assert set(pipeline["s"]) == {"diffusers", "ours_eager", "ours_flex", "ours_flex_graphs"}
    assert pipeline["s"][pipeline["fastest_mode"]] == min(v for k, v in pipeline["s"].items() if k != "diffusers")
    assert pipeline["value"] == pytest.approx(
        pipeline["s"]["diffusers"] / pipeline["s"][pipeline["fastest_mode"]], rel=1e-2
    )


def test_chosen_groups_run_and_the_others_are_recorded_as_not_run(gpu_targets, monkeypatch, tmp_path):
    import argparse

    monkeypatch.setenv(gpu_targets.GROUPS_ENV, "lit_layer")
    args = argparse.Namespace(tiny=True, device="cpu", out_dir=tmp_path, runs=1, calls=1)
    ran = []
    monkeypatch.setattr(gpu_targets, "_run_group", lambda function, names, *rest: ran.append(names) or
                        {name: {"value": 1.0, "met": True} for name in names})  # fmt: skip
    monkeypatch.setattr(gpu_targets, "machine", lambda device: {})
    payload = gpu_targets.targets_part(args, 1.0)
    assert ran == [["lit_layer_4096_speedup"]]
    assert set(payload["targets"]) == NAMES and payload["met"] is False
    others = [t for name, t in payload["targets"].items() if name != "lit_layer_4096_speedup"]
    assert all(
        t["value"] is None and t["met"] is False and "not in $DIT_TARGET_GROUPS" in t["not_run"] for t in others
    )
    monkeypatch.setenv(gpu_targets.GROUPS_ENV, "lit_layer,warp")
    with pytest.raises(ValueError, match=r"unknown groups \['warp'\]"):
        gpu_targets.targets_part(args, 1.0)


def test_the_lcm_target_is_the_encoding_plus_the_fastest_student(tiny_run):
    _, payload = tiny_run
    lcm = payload["targets"]["lcm_1024_4step_end_to_end_s"]
    assert set(lcm["student_s"]) == {"eager", "graphs", "graphs_vae_compiled"} and lcm["errors"] == {}
    assert lcm["student_s"][lcm["fastest_mode"]] == min(lcm["student_s"].values())
    assert lcm["value"] == pytest.approx(lcm["t5_encode_s"] + min(lcm["student_s"].values()), abs=2e-4)

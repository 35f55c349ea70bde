"""bench/gpu_suite.py --tiny: every part runs at toy size on the CPU and writes its JSON (so the suite cannot rot
between GPU sessions); the figures themselves are only meaningful on a GPU."""

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    sys.path.insert(0, str(BENCH))
    import gpu_suite

    out = tmp_path_factory.mktemp("suite")
    summary = gpu_suite.main(["--tiny", "--out-dir", str(out)])
    return out, summary


def test_every_part_runs_and_writes_its_json(suite):
    out, summary = suite
    assert set(summary["parts"]) == {
        "forward",
        "train",
        "pytest",
        "attention",
        "lit",
        "profile",
        "microshapes",
        "lcm",
        "recipe",
    }
    errors = {name: part["error"] for name, part in summary["parts"].items() if "error" in part}
    assert not errors
    for name in summary["parts"]:
        payload = json.loads((out / f"gpu_{name}.json").read_text())
        assert payload["benchmark"] == f"gpu_{name}" and payload["tiny"] is True and payload["wall_s"] >= 0
    assert json.loads((out / "gpu_suite.json").read_text())["parts"] == summary["parts"]


def test_forward_and_train_compare_both_sides_with_mfu(suite):
    out, _ = suite
    forward = json.loads((out / "gpu_forward.json").read_text())
    modes = {(c["variant"], c["mode"]) for c in forward["cases"]}
    assert modes == {(v, m) for v in ("alpha", "sigma") for m in ("eager", "compiled")}
    for case in forward["cases"]:
        assert case["diffusers"]["ms"] > 0 and case["ours"]["ms"] > 0 and 0 < case["ours"]["mfu"]
        assert case["text_tokens"]["ours"] < case["text_tokens"]["diffusers"]  # trimmed as our pipeline trims
        assert case["max_abs_diff"] <= 1e-4 * max(1.0, case["output_absmax"])
    train = json.loads((out / "gpu_train.json").read_text())
    for case in train["cases"]:
        assert {"diffusers", "ours", "ours_compiled"} <= set(case) and case["ema"] is True


def test_the_suite_refuses_to_measure_without_a_gpu_unless_tiny(monkeypatch):
    sys.path.insert(0, str(BENCH))
    import gpu_suite

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit):
        gpu_suite.parse_args([])
    with pytest.raises(SystemExit):
        gpu_suite.parse_args(["--tiny", "--parts", "forward,nonsense"])


def test_attention_and_lit_compare_every_variant(suite):
    out, _ = suite
    attention = json.loads((out / "gpu_attention.json").read_text())
    assert [row["tokens"] for row in attention["rows"]] == [16, 64]
    for row in attention["rows"]:
        assert set(row["layer"]) == {"softmax", "kv_compress_2", "linear"}  # CPU: no Triton variants to compare
        assert all(v["median_s"] > 0 for v in row["layer"].values())
    lit = json.loads((out / "gpu_lit.json").read_text())
    assert {"pixart_xl", "lit_xl_torch"} <= set(lit["forward"]) and {"pixart_xl", "lit_xl_torch"} <= set(lit["train"])
    assert {"forward_speedup", "train_speedup"} <= set(lit["figures"])

"""bench/low_memory.py: the summary compares every mode with bf16 seed by seed and says whether int8 is within the
target; weight bytes count a quantized weight's stored tensors; the XL preset run works end to end (tiny models)."""

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
import low_memory  # noqa: E402


def _result(one_object: dict[str, float], peak_mb: float = 500) -> dict:
    scores = {seed: {"one_object": {"prompt_accuracy": a / 100}, "two_object": {"prompt_accuracy": 0.5},
                     "held_out": {"prompt_accuracy": 0.25}} for seed, a in one_object.items()}  # fmt: skip
    return {"peak_bytes": peak_mb * 2**20, "peak_above_start_bytes": 100 * 2**20, "weight_bytes_total": 2**20,
            "scores": scores}  # fmt: skip


@pytest.mark.parametrize("int8,within", [({"0": 90, "1": 81}, True), ({"0": 90, "1": 77}, False)])
def test_summary_compares_each_seed_with_bf16(int8, within):
    results = {"bf16": _result({"0": 91, "1": 80}), "int8": _result(int8)}
    summary = low_memory.summarize(results, [0, 1])
    assert summary["modes"]["int8"]["change_vs_bf16_points"]["one_object"] == {
        "0": -1.0, "1": round(int8["1"] - 80.0, 2)
    }  # fmt: skip
    assert summary["bf16_seed_spread_points"]["one_object"] == -11.0
    assert summary["int8_within_target"] is within


def test_weight_bytes_count_quantized_storage():
    pytest.importorskip("torchao")
    from dit.quantization import quantize_

    model = torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False)).to(torch.bfloat16)
    assert low_memory.weight_bytes(model) == 64 * 64 * 2
    quantize_(model)
    assert 64 * 64 <= low_memory.weight_bytes(model) < 64 * 64 * 2  # int8 values and their scales


def test_xl_preset_runs_with_tiny_models():
    pytest.importorskip("torchao")
    result = low_memory.xl_preset_peak(height=64, tiny=True)
    assert result["text_encoder_parameters"] > 0 and result["height"] == 64
    assert result["met"] is (None if not torch.cuda.is_available() else result["met"])

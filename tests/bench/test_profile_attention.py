"""bench/profile_attention.py runs on the CPU (the kernels through triton's interpreter) so it cannot rot between GPU
sessions: its profiler tables, and its host timing that counts every Triton launch by kernel."""

import sys
from pathlib import Path

import pytest
import torch

from tests.tiny import needs_triton

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import profile_attention  # noqa: E402
from gpu_kernels import TINY_LAYER  # noqa: E402


def test_the_tables_name_every_variant(tmp_path):
    out = tmp_path / "profile.txt"
    profile_attention.main(
        ["--device", "cpu", "--tokens", "16", "--calls", "1", "--rows", "3", "--out", str(out), *TINY_LAYER]
    )
    titles = [line for line in out.read_text().splitlines() if line.startswith("==")]
    assert len(titles) == 5 and "linear (Triton kernels)" in titles[3] and "linear (torch ops)" in titles[4]


@needs_triton
@pytest.mark.parametrize("mode,launches", [("1", ["_state_kernel", "_rows_kernel", "_dwc_tokens"]), ("0", [])])
def test_host_times_count_the_launches(mode, launches):
    line = profile_attention.host_times("linear", profile_attention.VARIANTS["linear"], mode, 16, 1, "cpu", (64, 4))
    assert "ms/call to enqueue" in line
    for name in launches:
        assert f"{name} " in line and "x1" in line
    assert ("none" in line) == (not launches)


def test_a_narrow_layer_keeps_the_variant_and_names_a_bad_width():
    layer = profile_attention._layer(profile_attention.VARIANTS["linear"], "cpu", torch.float32, (64, 16))
    assert layer.heads == 4 and layer.to_q.in_features == 64  # LiT's 4 heads: fewer than the cap
    assert profile_attention._layer({}, "cpu", torch.float32, (64, 4)).heads == 4
    with pytest.raises(ValueError, match="--width 66 is not divisible by 4 heads"):
        profile_attention._layer({}, "cpu", torch.float32, (66, 4))

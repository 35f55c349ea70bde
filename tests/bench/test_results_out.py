"""Benchmarks write the committed bench/results/ only when --out names it: a plain run prints its figures and writes
runs/bench/ under the working directory."""

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
RESULTS = BENCH / "results"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if p.name != "common.py")


def _snapshot() -> dict[str, tuple[str, int]]:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in RESULTS.iterdir()}


def _run(cwd: Path, *options: str, restart: bool = True) -> subprocess.CompletedProcess:
    """The script as a user runs it (``restart``: it starts itself again for its CPU memory figures), or with the
    environment it would restart for already set (as the GPU suite runs it)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env = env if restart else {**env, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, str(BENCH / "attention_scaling.py"), "--tokens", "16", "--runs", "1", *options]
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_a_plain_run_leaves_bench_results_alone_and_out_writes_there(tmp_path):
    before = _snapshot()
    plain = _run(tmp_path)
    assert (tmp_path / "runs/bench/attention_scaling_cpu.json").is_file()
    assert "--out bench/results/attention_scaling_cpu.json records it" in plain.stdout
    out = tmp_path / "recorded" / "scaling.json"
    _run(tmp_path, "--out", str(out), restart=False)
    assert out.is_file()
    assert _snapshot() == before


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_every_bench_that_writes_results_takes_out(script):
    """A script that writes a result file takes --out (common.add_out_argument, or its own --out for the GPU suite
    and the profiler, or the GPU suite's parser for a part run on its own) and never names bench/results/ as a
    default."""
    source = script.read_text()
    if "__main__" not in source:
        pytest.skip("a part of the GPU suite: writes into the suite's --out")
    if not re.search(r"write_json\(|\.write_text\(|savefig\(", source):
        pytest.skip("writes no result file")
    takes_out = "add_out_argument(" in source or re.search(r"add_argument\(\s*\"--out\"", source)
    assert takes_out or "gpu_suite.parse_args(" in source, script.name  # or the GPU suite's own --out
    assert "RESULTS" not in source and not re.search(r"/ \"results\"|bench/results/\"", source), script.name

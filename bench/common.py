"""Shared benchmark helpers: machine description, alternating median timing, peak memory, matmul peak, and the
result JSON (``--out``: ``bench/results/`` is written only when asked)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

#: The committed results: written only where a benchmark's ``--out`` names them.
RESULTS = Path(__file__).parent / "results"
#: Where a benchmark run without ``--out`` writes (relative to the working directory; ``runs/`` is git-ignored).
SCRATCH = Path("runs") / "bench"


def machine(device: str) -> dict:
    """What ran the benchmark: CPU model and cores, GPU name, library versions."""
    import diffusers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    """Wall time of one call in seconds (CUDA events on a GPU)."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def alternate(fns: dict[str, Callable[[], object]], device: str, runs: int, warmup: int = 1) -> dict[str, dict]:
    """Time every function ``runs`` times, alternating and flipping the order each round; median and all runs."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(runs):
        for name in names if i % 2 == 0 else names[::-1]:
            times[name].append(timed(fns[name], device))
    return {name: {"median_s": statistics.median(t), "runs_s": [round(x, 5) for x in t]} for name, t in times.items()}


def matmul_peak(dtype: torch.dtype, device: str, m: int = 4096, k: int = 1152, n: int = 4608, runs: int = 5) -> float:
    """Measured GFLOP/s of a large linear-layer product (m x k) @ (n x k)^T in ``dtype`` on ``device``."""
    a = torch.randn(m, k, dtype=dtype, device=device)
    w = torch.randn(n, k, dtype=dtype, device=device)
    result = alternate({"mm": lambda: torch.nn.functional.linear(a, w)}, device, runs)
    return 2 * m * k * n / result["mm"]["median_s"] / 1e9


def rss_bytes(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` of this process, in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset this process's peak resident set size (``VmHWM``) to the current one (Linux clear_refs 5)."""
    with open(f"/proc/{os.getpid()}/clear_refs", "w") as f:
        f.write("5")


def peak_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak memory of one call of ``fn`` above what was allocated before it (CUDA allocator, or VmHWM on CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    reset_peak_rss()
    start = rss_bytes("VmRSS")
    fn()
    return rss_bytes("VmHWM") - start


def add_out_argument(parser: argparse.ArgumentParser, name: str) -> None:
    """``--out PATH``: the result file. The committed ``bench/results/`` is written only when ``--out`` names it; a
    plain run writes ``runs/bench/<name>`` (and prints the figures)."""
    parser.add_argument(
        "--out",
        type=Path,
        metavar="PATH",
        help=f"the result JSON, e.g. bench/results/{name} to record it (default: {SCRATCH}/{name})",
    )


def result_path(out: str | os.PathLike | None, name: str) -> Path:
    """``out``, or ``runs/bench/<name>`` when no ``--out`` was given (never ``bench/results/``)."""
    return Path(out) if out is not None else SCRATCH / name


def write_json(out: str | os.PathLike | None, payload: dict, name: str) -> Path:
    """Write ``payload`` to :func:`result_path` and say where (and how to record it when it is the scratch copy)."""
    path = result_path(out, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    hint = "" if out is not None else f" (--out bench/results/{name} records it)"
    print(f"wrote {path}{hint}", flush=True)
    return path

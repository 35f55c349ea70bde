"""Shared benchmark helpers: machine description, alternating median timing, peak memory, matmul peak, JSON."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


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


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path

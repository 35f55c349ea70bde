"""Where one attention layer's time goes: torch.profiler tables (self device time) per variant, at PixArt-XL width
unless ``--width`` says otherwise.

    python bench/profile_attention.py --tokens 4096 [--out profile.txt]     # CUDA, bf16

The variants of ``bench/attention_scaling.py`` (softmax, KV ratio 2, LiT linear with its 5x5 value convolution),
the kernel-served ones both through the Triton kernels and through the torch ops (``DIT_TRITON=0``), forward only,
``--calls`` calls each after a warm-up. On CUDA it then times the host: per layer call, the time to enqueue it and
the time to finish it, and each Triton launch's host time by kernel (``JITFunction.run``), at 1024 and ``--tokens``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_scaling import HEADS, VARIANTS, WIDTH  # noqa: E402

from dit.nn.attention import AttentionSpec, DiTAttention  # noqa: E402
from dit.nn.kernels import kernel_mode  # noqa: E402


def _layer(options: dict, device: str, dtype: torch.dtype, shape: tuple[int, int]) -> DiTAttention:
    """One layer of ``options``' variant, ``shape`` (width, at most this many heads): a variant's own head count
    (LiT's 4) is kept unless it exceeds it."""
    width, heads = shape
    spec = AttentionSpec(**options)
    heads = min(spec.heads, heads) if spec.heads else heads
    if width % heads:
        raise ValueError(f"--width {width} is not divisible by {heads} heads.")
    if spec.heads:
        spec = AttentionSpec(**{**options, "heads": heads})
    return DiTAttention(width, heads, width // heads, spec=spec).to(device, dtype).eval()


@torch.inference_mode()
def table(
    name: str, options: dict, mode: str | None, tokens: int, calls: int, device: str, rows: int, shape=(WIDTH, HEADS)
) -> str:
    side = math.isqrt(tokens)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    layer = _layer(options, device, dtype, shape)
    x = torch.randn(1, side * side, shape[0], device=device, dtype=dtype)  # (1, N, C)
    with kernel_mode(mode):
        for _ in range(3):
            layer(x, grid=(side, side))
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(calls):
                layer(x, grid=(side, side))
            if device == "cuda":
                torch.cuda.synchronize()
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    label = {"0": "torch ops", "1": "Triton kernels"}.get(mode, "auto")
    title = f"== {name} ({label}), {side * side} tokens, width {shape[0]}, {calls} calls"
    return title + "\n" + prof.key_averages().table(sort_by=sort, row_limit=rows)


@torch.inference_mode()
def host_times(
    name: str, options: dict, mode: str | None, tokens: int, calls: int, device: str, shape=(WIDTH, HEADS)
) -> str:
    """Host time per layer call (enqueue only, no sync) and per Triton launch by kernel, against the whole call."""
    import collections
    import time

    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    kernel_cls = InterpretedFunction if device == "cpu" else JITFunction  # the CPU: through the interpreter
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    side = math.isqrt(tokens)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    layer = _layer(options, device, dtype, shape)
    x = torch.randn(1, side * side, shape[0], device=device, dtype=dtype)  # (1, N, C)
    launches: dict[str, list[float]] = collections.defaultdict(list)
    run = kernel_cls.run

    def timed_run(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return run(self, *args, **kwargs)
        finally:
            launches[self.fn.__name__].append(time.perf_counter() - started)

    with kernel_mode(mode):
        for _ in range(3):
            layer(x, grid=(side, side))
        sync()
        kernel_cls.run = timed_run
        try:
            started = time.perf_counter()
            for _ in range(calls):
                layer(x, grid=(side, side))
            enqueued = time.perf_counter() - started
            sync()
            total = time.perf_counter() - started
        finally:
            kernel_cls.run = run
    per_kernel = ", ".join(f"{k} {1e6 * sum(v) / len(v):.0f} us x{len(v) // calls}" for k, v in launches.items())
    return (f"== {name} ({mode or 'auto'}), {side * side} tokens: host {1e3 * enqueued / calls:.3f} ms/call to "
            f"enqueue, {1e3 * total / calls:.3f} ms/call in all; Triton launches: {per_kernel or 'none'}")  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--rows", type=int, default=14)
    parser.add_argument("--width", type=int, default=WIDTH, help=f"channels (default {WIDTH}, PixArt-XL's)")
    parser.add_argument("--heads", type=int, default=HEADS, help=f"at most this many heads (default {HEADS})")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    cases = [("softmax", None)] + [(n, m) for n in ("kv_compress_2", "linear") for m in ("1", "0")]
    shape = (args.width, args.heads)
    text = "\n\n".join(
        table(n, VARIANTS[n], m, args.tokens, args.calls, args.device, args.rows, shape) for n, m in cases
    )
    if args.device == "cuda":  # where the host time goes: enqueueing a call, and each Triton launch
        text += "\n\n" + "\n".join(
            host_times(n, VARIANTS[n], m, t, args.calls, args.device, shape)
            for t in (1024, args.tokens)
            for n, m in cases
        )
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

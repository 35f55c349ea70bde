"""The targets of issue 28 in one file, from one run on one H100/H200: ``gpu_targets.json`` and the profiles.

``{"machine": {..., "gpu": NAME}, "commit": SHA, "targets": {name: {"value", "target", "met", "wall_s", ...}}}``
with exactly the names of :data:`TARGETS`, bf16, ours against diffusers' ``PixArtTransformer2DModel`` with the same
weights, medians of alternating rounds (``common.alternate``), MFU against the bf16 matmul rate measured first in the
same run. Each measurement reuses the suite's code (``gpu_models``, ``gpu_pipelines``, ``lit_speed``,
``attention_scaling``); "ours in its fastest mode" is the fastest of eager, regional compilation
(``compile_repeated_blocks``) and whole-model ``torch.compile(fullgraph=True, mode="reduce-overhead")`` (CUDA
graphs), and the JSON says which. Sized for 9 minutes on an H100: each group of targets runs under its own time
limit (and the whole under :data:`BUDGET_S`); a group that fails or runs out of time records its error and
``met: false``, and the JSON is rewritten after each group, so a cut-off run still leaves what it measured.
``targets_profile_forward_512_b1.txt`` beside it holds torch.profiler tables (top ops by device and by host time)
of the 512 px batch-1 forward, eager and in the fastest mode.

It is the suite's part ``targets`` (``bench/gpu_suite.py``, not among its defaults). The device command (the ``run``
tool, carry ``.whl``, made once as ``bench/gpu_session.sh`` says; put the commit's SHA in ``DIT_COMMIT`` where the
copy has no ``.git``); the files land in ``$OUT``, to commit as ``bench/results/gpu_targets.json``:

    DIT_COMMIT=<sha> bash bench/gpu_session.sh --parts targets --runs 3 --calls 5 --pytest-timeout 120

``DIT_TARGET_GROUPS=train,pipeline`` (names of :data:`GROUPS`, and ``pytest``) runs only those groups, the others
recorded as not run: a later session measures what an earlier one ran out of time for.

Here: ``python bench/gpu_targets.py --tiny --out /tmp/targets`` runs every target at toy size on the CPU (seconds;
values meaningless, structure identical; ``tests/bench/test_gpu_targets.py``).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attention_scaling  # noqa: E402
import gpu_models  # noqa: E402
import gpu_pipelines  # noqa: E402
import lit_speed  # noqa: E402
from backbone_forward import VARIANTS  # noqa: E402
from common import alternate, machine, synchronize  # noqa: E402

from dit.models.base import compile_repeated_blocks  # noqa: E402

#: target name -> (what the issue asks, whether a value meets it)
TARGETS: dict[str, tuple[str, Callable[[float], bool]]] = {
    "forward_512_b1_ms": ("<= 4 ms", lambda v: v <= 4),
    "forward_speedup_vs_diffusers_eager": (">= 4x", lambda v: v >= 4),
    "forward_1024_b4_mfu": (">= 0.60", lambda v: v >= 0.6),
    "train_step_mfu": (">= 0.40", lambda v: v >= 0.4),
    "train_step_speedup_vs_diffusers": (">= 1.5x", lambda v: v >= 1.5),
    "lcm_1024_4step_end_to_end_s": ("<= 0.20 s", lambda v: v <= 0.2),
    "lit_layer_4096_speedup": (">= 2x", lambda v: v >= 2),
    "lit_xl_forward_speedup": (">= 1.4x", lambda v: v >= 1.4),
    "lit_xl_train_speedup": (">= 1.1x", lambda v: v >= 1.1),
    "diffusers_pipeline_speedup": (">= 1.3x", lambda v: v >= 1.3),
    "gpu_tests_failed": ("0", lambda v: v == 0),
}
#: The whole part's budget in seconds (the device command's limit is 600, with installation, imports, matmul peak).
BUDGET_S = 520
#: Seconds one candidate mode may take to warm up (its compilation included).
CANDIDATE_LIMIT_S = 120
#: A group with less time left than this is skipped.
MIN_GROUP_S = 5
#: Seconds a group keeps for timing what warmed up.
TIMING_RESERVE_S = 15
PROFILE = "targets_profile_forward_512_b1.txt"


@contextmanager
def time_limit(seconds: float):
    """Raise ``TimeoutError`` in this (main) thread after ``seconds`` (SIGALRM; Linux). Nested in another one, it
    ends no later than the outer one, whose remaining time it gives back on exit."""

    def expire(signum, frame):
        raise TimeoutError(f"over its {seconds:.0f} s limit")

    outer = signal.getitimer(signal.ITIMER_REAL)[0]
    seconds = min(seconds, outer) if outer else seconds
    started = time.monotonic()
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - started), 0.001))


def fastest(fns: dict[str, Callable[[], object]], args, per_call: int = 1) -> dict:
    """Warm every candidate up alone, in order, within :data:`CANDIDATE_LIMIT_S` (one that fails or runs out of time
    is recorded and left out; once the group's time is short the rest are skipped), then time the rest alternating:
    ``{"ms": {name: ms per call}, "errors": {...}}``."""
    errors, ready = {}, {}
    for name, fn in fns.items():
        left = signal.getitimer(signal.ITIMER_REAL)[0]
        if left and left < TIMING_RESERVE_S and ready:
            errors[name] = f"skipped: {left:.0f} s left in the group"
            continue
        try:
            with time_limit(min(CANDIDATE_LIMIT_S, max(left - TIMING_RESERVE_S, 1)) if left else CANDIDATE_LIMIT_S):
                for _ in range(2):
                    fn()
            ready[name] = fn
        except Exception as error:  # a mode that cannot run here (compile failure, ...) is recorded, not fatal
            traceback.print_exc()
            errors[name] = f"{type(error).__name__}: {error}"[:500]
    timing = alternate(ready, args.device, args.runs, warmup=0) if ready else {}
    ms = {name: round(t["median_s"] / per_call * 1e3, 4) for name, t in timing.items()}
    return {"ms": ms, "errors": errors}


def _best(ms: dict[str, float], prefix: str) -> tuple[str, float]:
    name = min((n for n in ms if n.startswith(prefix)), key=ms.get)
    return name, ms[name]


def whole_compiled(model: torch.nn.Module, args, fullgraph: bool = True):
    """Whole-model ``torch.compile`` with static shapes: CUDA graphs (``mode="reduce-overhead"``) under inductor on
    a GPU, else the chosen backend as is (``--tiny``: ``aot_eager`` on the CPU)."""
    if args.device == "cuda" and args.compile_backend == "inductor":
        return torch.compile(model, fullgraph=fullgraph, dynamic=False, mode="reduce-overhead")
    return torch.compile(model, fullgraph=fullgraph, dynamic=False, backend=args.compile_backend)


def profile_table(fn: Callable[[], object], device: str, title: str, rows: int = 15) -> str:
    """torch.profiler tables of one call of ``fn`` (after two warm-up calls): top ops by device and by host time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    for _ in range(2):
        fn()
    with profile(activities=activities) as prof:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
    averages = prof.key_averages()
    by_device = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    return "\n".join([f"== {title}: top ops by device time", averages.table(sort_by=by_device, row_limit=rows),
                      f"== {title}: top ops by host time", averages.table(sort_by="cpu_time_total", row_limit=rows)])  # fmt: skip


def _forward_pair(args, size: int, batch: int):
    """diffusers' and our PixArt-XL α (same weights) and their inputs (ours with the text trimmed as our pipeline
    trims it), at ``size`` px and ``batch``."""
    config = {**(gpu_models.TINY if args.tiny else gpu_models.XL), **VARIANTS["alpha"]["config"]}
    reference, ours = gpu_models._pair(config, args.device, args.dtype)
    theirs, mine = gpu_models._inputs("alpha", size, batch, args.dtype, args.device, config["caption_channels"])
    return reference, ours, theirs, mine


def _max_diff(model, kwargs: dict, expected: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(**kwargs)[0].float() - expected).abs().max().item()


def forward_512(args, peak_tflops: float) -> dict:
    """XL α at 512 px batch 1 (120-token text): ours eager / regional / whole-model CUDA graphs against diffusers
    eager and whole-model compiled (CUDA graphs, graph breaks allowed); the fastest of ours counts. Profiles."""
    size = 64 if args.tiny else 512
    reference, ours, theirs, mine = _forward_pair(args, size, 1)
    regional = copy.deepcopy(ours)
    compile_repeated_blocks(regional, fullgraph=True, dynamic=False, backend=args.compile_backend)
    models = {"diffusers_eager": (reference, theirs), "ours_eager": (ours, mine), "ours_regional": (regional, mine),
              "ours_graphs": (whole_compiled(ours, args), mine),
              "diffusers_compiled": (whole_compiled(reference, args, False), theirs)}  # fmt: skip
    fns = {name: gpu_models._calls(model, kwargs, args.calls) for name, (model, kwargs) in models.items()}
    result = fastest(fns, args, per_call=args.calls)
    ms = result["ms"]
    mode, best = _best(ms, "ours_")
    with torch.no_grad():
        expected = reference(**theirs)[0].float()
    diffs = {name: _max_diff(model, kwargs, expected) for name, (model, kwargs) in models.items() if name in ms}
    tables = [profile_table(fns[name], args.device, f"{name}, {size} px batch 1, {args.calls} calls")
              for name in dict.fromkeys(["ours_eager", mode])]  # fmt: skip
    (args.out_dir / PROFILE).write_text("\n\n".join(tables) + "\n")
    details = {"ms": ms, "errors": result["errors"], "max_abs_diff": diffs, "fastest_mode": mode, "profile": PROFILE}
    return {"forward_512_b1_ms": {"value": best, **details},
            "forward_speedup_vs_diffusers_eager": {"value": round(ms["diffusers_eager"] / best, 3), "fastest_mode": mode,
                                                   "diffusers_compiled_ms": ms.get("diffusers_compiled"),
                                                   "speedup_vs_diffusers_compiled": round(ms["diffusers_compiled"] / best, 3) if "diffusers_compiled" in ms else None}}  # fmt: skip


def forward_1024_b4(args, peak_tflops: float) -> dict:
    """XL α at 1024 px batch 4: ours eager and regionally compiled (GPU-bound: CUDA graphs save host time only);
    the FLOPs one eager call executes over the faster one's time, against the measured matmul rate."""
    size, batch = (128, 2) if args.tiny else (1024, 4)
    _, ours, _, mine = _forward_pair(args, size, batch)
    flops = gpu_models.counted_flops(gpu_models._calls(ours, mine, 1))
    regional = copy.deepcopy(ours)
    compile_repeated_blocks(regional, fullgraph=True, dynamic=False, backend=args.compile_backend)
    fns = {"ours_eager": gpu_models._calls(ours, mine, args.calls), "ours_regional": gpu_models._calls(regional, mine, args.calls)}  # fmt: skip
    result = fastest(fns, args, per_call=args.calls)
    mode, best = _best(result["ms"], "ours_")
    mfu = flops / (best / 1e3) / 1e12 / peak_tflops
    return {"forward_1024_b4_mfu": {"value": float(f"{mfu:.3g}"), "ms": result["ms"], "errors": result["errors"],
                                    "fastest_mode": mode, "gflop": round(flops / 1e9, 1)}}  # fmt: skip


def train(args, peak_tflops: float) -> dict:
    """XL 512 px batch 8, EMA on: ``gpu_models._train_case`` against diffusers' plain autocast + AdamW step. Ours
    with bf16 compute weights (``mixed_precision_weights=bf16``, fp32 masters; bf16 runs), eager and with compiled
    blocks, then with fp32 weights under autocast, eager, where time is left; the best of ours' MFU and its
    throughput over diffusers'."""
    size, batch = (64, 2) if args.tiny else (512, 8)
    options = argparse.Namespace(**{**vars(args), "no_compile": args.no_compile or args.tiny})  # --tiny: eager
    weights = ("mixed_precision_weights=bf16",) if args.dtype == torch.bfloat16 else ()
    with tempfile.TemporaryDirectory() as tmp:
        case = gpu_models._train_case(options, peak_tflops, size, batch, Path(tmp), weights)
    runs = {f"{k}{'_bf16_weights' if weights and k != 'diffusers' else ''}": case[k]
            for k in ("diffusers", "ours", "ours_compiled") if k in case}  # fmt: skip
    if weights:
        try:
            with tempfile.TemporaryDirectory() as tmp, time_limit(60):
                plain = gpu_models._train_case(argparse.Namespace(**{**vars(args), "no_compile": True}),
                                               peak_tflops, size, batch, Path(tmp))  # fmt: skip
            runs["ours_fp32_weights"] = plain["ours"]
        except Exception as error:  # the comparison is optional: the group keeps what it measured
            runs["ours_fp32_weights"] = {"error": f"{type(error).__name__}: {error}"[:300]}
    ours = {k: v for k, v in runs.items() if k.startswith("ours") and "ms" in v}
    best = min(ours, key=lambda k: ours[k]["ms"])
    return {"train_step_mfu": {"value": max(v["mfu"] for v in ours.values()), "fastest_mode": best, **runs},
            "train_step_speedup_vs_diffusers": {"value": round(runs["diffusers"]["ms"] / ours[best]["ms"], 3),
                                                "fastest_mode": best}}  # fmt: skip


def _t5_encode_s(args, tokens: int) -> tuple[torch.Tensor, float]:
    """A T5-XXL-shaped encoder (random weights): its embeddings of ``tokens`` random ids and the median encode time
    (after a warm-up); the encoder is freed before returning."""
    encoder = gpu_pipelines._t5_xxl(args.device, args.dtype, args.tiny)
    ids = torch.randint(0, encoder.config.vocab_size, (1, tokens), device=args.device)
    times = []
    with torch.no_grad():
        for _ in range(1 + max(args.runs, 1)):
            synchronize(args.device)
            started = time.perf_counter()
            embeds = encoder(ids)[0]  # (1, L, C)
            synchronize(args.device)
            times.append(time.perf_counter() - started)
    del encoder
    gc.collect()
    return embeds, sorted(times[1:])[len(times[1:]) // 2]


def lcm(args, peak_tflops: float) -> dict:
    """PixArt-δ's case end to end, batch 1: a T5-XXL-shaped encoder's encoding of 300 tokens (random weights) plus
    4 LCM steps of the XL student at 1024 px (no CFG) with the SD-shaped VAE decode. The student call in its fastest
    of eager, CUDA graphs (``pipe.enable_cuda_graphs()``), and CUDA graphs with the VAE decoder compiled
    (channels-last; a VAE of its own, so the other modes keep an eager one)."""
    from diffusers import LCMScheduler

    from dit import PixArtTransformer
    from dit.pipelines import TextToImagePipeline

    embeds, t5_s = _t5_encode_s(args, 16 if args.tiny else 300)
    config = {**(gpu_models.TINY if args.tiny else gpu_models.XL), "use_additional_conditions": not args.tiny}
    with torch.device(args.device):
        torch.manual_seed(0)
        transformer = PixArtTransformer(**config).to(args.dtype).eval()
    mask = torch.zeros(embeds.shape[:2], dtype=torch.long, device=args.device)
    mask[:, :20] = 1
    size = 64 if args.tiny else 1024
    kwargs = dict(prompt_embeds=embeds, prompt_attention_mask=mask, num_inference_steps=4, guidance_scale=1.0,
                  height=size, width=size, output_type="pt", use_resolution_binning=False)  # fmt: skip

    def student(graphs: bool, compiled_vae: bool):
        vae = gpu_pipelines._sd_vae(args.device, args.dtype, args.tiny)
        if compiled_vae:
            vae.to(memory_format=torch.channels_last)
            vae.decoder = torch.compile(vae.decoder, dynamic=False, backend=args.compile_backend)
        pipe = TextToImagePipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                   scheduler=LCMScheduler(num_train_timesteps=1000))  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        if graphs:
            pipe.enable_cuda_graphs()
        return lambda: pipe(**kwargs)

    fns = {"eager": student(False, False), "graphs": student(True, False), "graphs_vae_compiled": student(True, True)}
    result = fastest(fns, args)
    seconds = {name: round(ms / 1e3, 4) for name, ms in result["ms"].items()}
    mode = min(seconds, key=seconds.get)
    return {"lcm_1024_4step_end_to_end_s": {"value": round(t5_s + seconds[mode], 4), "t5_encode_s": round(t5_s, 4),
                                            "student_s": seconds, "fastest_mode": mode, "errors": result["errors"]}}  # fmt: skip


def lit_layer(args, peak_tflops: float) -> dict:
    """One self-attention layer at XL width, projections included, 4096 tokens (``attention_scaling``): softmax
    (eager, CUDA graphs) against LiT's (Triton kernels, torch ops, CUDA graphs); the fastest of each."""
    from dit.nn.kernels import kernel_mode, triton_installed

    side = 4 if args.tiny else 64
    x = torch.randn(1, side * side, attention_scaling.WIDTH, device=args.device, dtype=args.dtype)  # (1, N, C)
    fns = {}
    for name in ("softmax", "linear"):
        layer, _ = attention_scaling._modules(attention_scaling.VARIANTS[name], args.device, args.dtype)
        compiled = whole_compiled(layer, args)
        fns[f"{name}_graphs"] = lambda compiled=compiled: compiled(x, grid=(side, side))
        modes = (("1", "triton"), ("0", "torch")) if name == "linear" and args.device == "cuda" and triton_installed() else ((None, "eager"),)  # fmt: skip
        for mode, label in modes:
            fns[f"{name}_{label}"] = attention_scaling._with_kernels(mode, layer, (side, side), x)
    with torch.no_grad(), kernel_mode(None):
        result = fastest(fns, args)
    soft, lin = _best(result["ms"], "softmax_"), _best(result["ms"], "linear_")
    return {"lit_layer_4096_speedup": {"value": round(soft[1] / lin[1], 3), "tokens": side * side, **result,
                                       "fastest_mode": {"softmax": soft[0], "linear": lin[0]}}}  # fmt: skip


def lit_xl(args, peak_tflops: float) -> dict:
    """``lit_speed.measure``: LiT-XL (the fastest of its Triton / torch / auto runs) against PixArt-XL, forward at
    1024 px batch 4 (bf16, eager) and the training step at 1024 px batch 2 (bf16 autocast, AdamW)."""
    from dit.nn.kernels import triton_installed

    config = lit_speed.TINY if args.tiny else lit_speed.XL
    options = argparse.Namespace(dtype=args.dtype, runs=args.runs, calls=args.calls,
                                 triton=args.device == "cuda" and triton_installed())  # fmt: skip
    size = 64 if args.tiny else 1024
    out = {}
    for kind, batch, name in (("forward", 4, "lit_xl_forward_speedup"), ("train", 2, "lit_xl_train_speedup")):
        measured = lit_speed.measure(kind, config, size, 1 if args.tiny else batch, args.device, options)
        ms = {k: v["ms"] for k, v in measured.items() if isinstance(v, dict)}
        mode, best = _best(ms, "lit_xl")
        out[name] = {"value": round(ms["pixart_xl"] / best, 3), "ms": ms, "fastest_mode": mode}
    return out


def diffusers_pipeline(args, peak_tflops: float) -> dict:
    """diffusers' ``PixArtSigmaPipeline``, 20 steps at 1024 px (DPM-Solver, guidance 4.5, an SD-shaped VAE decode,
    the 300-token text as prompt embeddings, its mask on the device as diffusers passes it): diffusers' transformer
    eager against ours with the same weights in its fastest mode: eager SDPA over the 300 keys, ``sdpa_flex``
    (padded key blocks skipped on the device), and whole-model CUDA graphs with ``sdpa_flex``."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    config = {**(gpu_models.TINY if args.tiny else gpu_models.XL), **VARIANTS["sigma"]["config"]}
    reference, ours = gpu_models._pair(config, args.device, args.dtype)
    flex = copy.deepcopy(ours)
    flex.set_attention_backend("sdpa_flex")
    vae = gpu_pipelines._sd_vae(args.device, args.dtype, args.tiny)
    size, steps = (64, 2) if args.tiny else (1024, 20)
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 300, config["caption_channels"], generator=gen).to(args.device, args.dtype)  # (1, L, C)
    mask = torch.zeros(1, 300, dtype=torch.long, device=args.device)
    mask[:, :20] = 1
    kwargs = dict(prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt=None, negative_prompt_embeds=torch.zeros_like(embeds),
                  negative_prompt_attention_mask=mask, num_inference_steps=steps, height=size, width=size,
                  output_type="pt", use_resolution_binning=False)  # fmt: skip
    transformers = {"diffusers": reference, "ours_eager": ours, "ours_flex": flex,
                    "ours_flex_graphs": whole_compiled(flex, args)}  # fmt: skip
    fns = {}
    for name, transformer in transformers.items():
        pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                   scheduler=DPMSolverMultistepScheduler())  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        fns[name] = lambda pipe=pipe: pipe(**kwargs, generator=torch.Generator(args.device).manual_seed(0))
    result = fastest(fns, args)
    s = {name: round(ms / 1e3, 4) for name, ms in result["ms"].items()}
    mode, best = _best(s, "ours_")
    return {"diffusers_pipeline_speedup": {"value": round(s["diffusers"] / best, 3), "s": s, "fastest_mode": mode,
                                           "errors": result["errors"], "steps": steps}}  # fmt: skip


def gpu_tests(args, peak_tflops: float, timeout: float) -> dict:
    """``gpu_pipelines.pytest_part`` (``pytest -m gpu``, within ``timeout`` and ``--pytest-timeout``): failures and
    errors."""
    options = argparse.Namespace(**vars(args))
    options.pytest_timeout = max(int(min(timeout, args.pytest_timeout)), 1)
    part = gpu_pipelines.pytest_part(options)
    failed = part["counts"].get("failed", 0) + part["counts"].get("errors", 0) + part["counts"].get("error", 0)
    if part["returncode"] not in (0, 1) or (not args.tiny and not part["counts"].get("passed")):
        raise RuntimeError(f"pytest -m gpu did not run its tests ({part['returncode']}): {part['summary']}")
    return {"gpu_tests_failed": {"value": failed, "summary": part["summary"], "failures": part["failures"]}}


#: (group, function, its targets, time limit on an H100 in seconds), in the order they run
GROUPS = [
    ("forward_512", forward_512, ["forward_512_b1_ms", "forward_speedup_vs_diffusers_eager"], 130),
    ("forward_1024", forward_1024_b4, ["forward_1024_b4_mfu"], 45),
    ("train", train, ["train_step_mfu", "train_step_speedup_vs_diffusers"], 90),
    ("lcm", lcm, ["lcm_1024_4step_end_to_end_s"], 75),
    ("lit_layer", lit_layer, ["lit_layer_4096_speedup"], 30),
    ("lit_xl", lit_xl, ["lit_xl_forward_speedup", "lit_xl_train_speedup"], 45),
    ("pipeline", diffusers_pipeline, ["diffusers_pipeline_speedup"], 45),
]
#: Environment variable naming the groups to run (comma-separated, e.g. ``train,pipeline``; default all): a later
#: session measures what an earlier one ran out of time for (the others are recorded as not run).
GROUPS_ENV = "DIT_TARGET_GROUPS"
#: Seconds kept for ``pytest -m gpu`` at the end of the budget.
PYTEST_RESERVE_S = 60


def commit() -> str:
    """The checked-out commit (``+dirty`` with local changes), or ``DIT_COMMIT`` where the copy has no ``.git``."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        return sha.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("DIT_COMMIT", "unknown")


def _run_group(function, names: list[str], limit: float, args, peak_tflops: float, *extra) -> dict:
    started = time.perf_counter()
    try:
        if limit < MIN_GROUP_S:
            raise TimeoutError(f"no time left in the {BUDGET_S} s budget")
        with time_limit(limit if not args.tiny else 600):
            values = function(args, peak_tflops, *extra)
    except Exception as error:  # a broken group is recorded; the others still run
        traceback.print_exc()
        values = {name: {"value": None, "error": f"{type(error).__name__}: {error}"[:1000]} for name in names}
    wall = round(time.perf_counter() - started, 1)
    gc.collect()
    torch._dynamo.reset()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    out = {}
    for name in names:
        target, meets = TARGETS[name]
        entry = values[name]
        met = entry.get("value") is not None and bool(meets(entry["value"]))
        out[name] = {"value": entry.get("value"), "target": target, "met": met, "wall_s": wall,
                     **{k: v for k, v in entry.items() if k != "value"}}  # fmt: skip
        print(f"{name}: {out[name]['value']} (target {target}, met {met}, {wall} s)", flush=True)
    return out


def _chosen_groups() -> set[str]:
    """The groups :data:`GROUPS_ENV` names (all, and ``pytest``, when unset); an unknown name is an error."""
    known = [group for group, *_ in GROUPS] + ["pytest"]
    value = os.environ.get(GROUPS_ENV, "").strip()
    chosen = {name.strip() for name in value.split(",") if name.strip()} if value else set(known)
    unknown = chosen - set(known)
    if unknown:
        raise ValueError(f"{GROUPS_ENV} names unknown groups {sorted(unknown)}; choose from {known}.")
    return chosen


def _not_run(name: str, group: str) -> dict:
    target, _ = TARGETS[name]
    return {"value": None, "target": target, "met": False, "not_run": f"group {group!r} not in ${GROUPS_ENV}"}


def targets_part(args, peak_tflops: float) -> dict:
    """Every target in :data:`TARGETS` (the suite's part ``targets``); rewrites ``gpu_targets.json`` in
    ``args.out_dir`` after each group."""
    started = time.perf_counter()
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "none (CPU, --tiny)"
    payload = {"machine": {**machine(args.device), "gpu": gpu}, "commit": commit(), "matmul_peak_tflops": peak_tflops,
               "runs": args.runs, "calls_per_round": args.calls, "budget_s": BUDGET_S, "targets": {}}  # fmt: skip
    path = args.out_dir / "gpu_targets.json"
    chosen = _chosen_groups()
    for group, function, names, limit in GROUPS:
        if group not in chosen:
            payload["targets"].update({name: _not_run(name, group) for name in names})
            continue
        left = BUDGET_S - PYTEST_RESERVE_S - (time.perf_counter() - started)
        payload["targets"].update(_run_group(function, names, min(limit, left), args, peak_tflops))
        path.write_text(json.dumps(payload, indent=2) + "\n")
    left = BUDGET_S - (time.perf_counter() - started)
    limit = max(left, 30 if args.tiny else 0)
    if "pytest" in chosen:
        payload["targets"].update(_run_group(gpu_tests, ["gpu_tests_failed"], limit, args, peak_tflops, limit - 5))
    else:
        payload["targets"]["gpu_tests_failed"] = _not_run("gpu_tests_failed", "pytest")
    payload["targets"] = {name: payload["targets"][name] for name in TARGETS}
    payload["met"] = all(t["met"] for t in payload["targets"].values())
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return payload


def main(argv: list[str] | None = None) -> dict:
    """``bench/gpu_suite.py --parts targets`` with ``argv``; the part's payload."""
    import gpu_suite

    argv = ["--parts", "targets", *(sys.argv[1:] if argv is None else argv)]
    args = gpu_suite.parse_args(argv)  # the output folder once (--tiny without --out: a new temporary one)
    gpu_suite.main([*argv, "--out-dir", str(args.out_dir)])
    return json.loads((args.out_dir / "gpu_targets.json").read_text())


if __name__ == "__main__":
    main()

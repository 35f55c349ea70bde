"""The GPU benchmark suite: one command on one H100 or H200 (sized for about 8 minutes), JSON into --out.

On the lent machines, which have no diffusers and no network: ``bash bench/gpu_session.sh [options]`` (see its
header), in calls that each fit the 10-minute limit (each part's wall time: ``bench/results/gpu_suite.json``):
``--parts forward,train``, then
``--parts pytest,attention,lit,profile``, then ``--parts microshapes,lcm,recipe``.

Parts (all by default, in this order; ``--parts`` picks some):

- ``forward``: PixArt-XL-2 (28 layers, bf16), α and Σ, 512 and 1024 px, batch 1 and 4, eager and regionally
  compiled, ours against diffusers' ``PixArtTransformer2DModel`` with the same weights, MFU against the bf16 matmul
  rate measured first (``gpu_forward.json``);
- ``train``: one training step at 28 layers, 512 px batch 8 and 1024 px batch 2, EMA on, ours (eager, and with
  compiled blocks) against diffusers' plain step, with MFU (``gpu_train.json``);
- ``pytest``: ``pytest -m gpu`` (``gpu_pytest.json``, its output in ``gpu_pytest.log``);
- ``attention``: one attention layer and block at PixArt-XL width, 1k-64k tokens, softmax / KV ratio 2 / LiT linear,
  the Triton kernels against their torch fallback (``gpu_attention.json``, ``attention_scaling_cuda.json`` + PNG);
- ``lit``: LiT-XL against PixArt-XL, forward at 1024 px batch 4 and a training step (``gpu_lit.json``,
  ``lit_speed_cuda.json``);
- ``profile``: where one attention layer's time goes at 4096 tokens, device and host (``profile_attention.txt``);
- ``microshapes``: the shipped model's generation time and ``dit eval microshapes`` on CUDA
  (``gpu_microshapes.json``);
- ``lcm``: a 1024 px image from a PixArt-XL-shaped LCM student in 4 steps against the teacher's 20
  (``gpu_lcm.json``);
- ``recipe``: the MicroShapes recipe's wall time on the GPU and the quality of its model (``gpu_recipe.json``);
- ``targets`` (only when named): issue 28's targets in one file, ``gpu_targets.json``, and the forward's profiles
  (``bench/gpu_targets.py``, whose docstring has the device command).

``gpu_suite.json`` gathers every part's targets and wall time. ``--tiny`` runs every part at toy size (on the CPU
when there is no GPU, in seconds: CI runs it so the suite cannot rot).

    python bench/gpu_suite.py --out bench/results   # on the GPU machine; commit bench/results/gpu_*.json
    python bench/gpu_suite.py --parts forward,train # into runs/bench/gpu_suite/
    python bench/gpu_suite.py --tiny --out /tmp/suite
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SCRATCH, machine, matmul_peak  # noqa: E402
from gpu_kernels import attention_part, lit_part, profile_part  # noqa: E402
from gpu_models import forward_part, train_part  # noqa: E402
from gpu_pipelines import lcm_part, microshapes_part, pytest_part, recipe_part  # noqa: E402
from gpu_targets import targets_part  # noqa: E402

PARTS = {"forward": forward_part, "train": train_part, "pytest": pytest_part, "attention": attention_part,
         "lit": lit_part, "profile": profile_part, "microshapes": microshapes_part, "lcm": lcm_part,
         "recipe": recipe_part, "targets": targets_part}  # fmt: skip
NEEDS_PEAK = {"forward", "train", "targets"}
#: ``targets`` (issue 28's one file, bench/gpu_targets.py) re-measures the others in its own 9-minute run: asked for only
DEFAULT_PARTS = [name for name in PARTS if name != "targets"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(DEFAULT_PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (CPU without a GPU): checks the suite runs")
    parser.add_argument(
        "--out",
        "--out-dir",
        dest="out_dir",
        type=Path,
        help="the folder for the JSON, e.g. bench/results to record it (default: runs/bench/gpu_suite; --tiny: a temp "
        "dir)",
    )
    parser.add_argument("--runs", type=int, default=5, help="timed rounds per case (alternating, median)")
    parser.add_argument("--calls", type=int, default=10, help="forward calls per timed round")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--compile-backend", help="torch.compile backend (default: inductor; --tiny: aot_eager)")
    parser.add_argument("--pytest-timeout", type=int, default=300)
    args = parser.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s) {sorted(unknown)}; choose from {', '.join(PARTS)}")
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu" and not args.tiny:
        parser.error("no CUDA GPU here: the suite's figures need one (use --tiny to check that it runs)")
    args.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    args.compile_backend = args.compile_backend or ("aot_eager" if args.tiny else "inductor")
    if args.tiny:
        args.runs, args.calls = min(args.runs, 2), min(args.calls, 2)
    if args.out_dir is None:
        import tempfile

        args.out_dir = Path(tempfile.mkdtemp(prefix="gpu_suite_tiny_")) if args.tiny else SCRATCH / "gpu_suite"
    return args


def run_part(name: str, args, peak_tflops: float | None) -> dict:
    started = time.perf_counter()
    try:
        result = PARTS[name](args, peak_tflops) if name in NEEDS_PEAK else PARTS[name](args)
    except Exception as error:  # a broken part is recorded; the others still run
        traceback.print_exc()
        result = {"error": f"{type(error).__name__}: {error}", "met": False}
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch._dynamo.config.cache_size_limit = 64
    args.out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    names = args.parts.split(",")
    peak = None
    if NEEDS_PEAK & set(names):
        size = 1024 if args.tiny else 8192
        peak = matmul_peak(args.dtype, args.device, size, size, size) / 1e3  # TFLOP/s
        print(f"matmul peak: {peak:.1f} TFLOP/s ({args.dtype}, {size}^3)", flush=True)
    info = {"device": args.device, "machine": machine(args.device), "tiny": args.tiny,
            "dtype": str(args.dtype), "compile_backend": args.compile_backend,
            "matmul_peak_tflops": None if peak is None else round(peak, 1)}  # fmt: skip
    summary = {"benchmark": "gpu_suite", **info, "parts": {}}
    for name in names:
        print(f"--- {name}", flush=True)
        result = {"benchmark": f"gpu_{name}", **info, **run_part(name, args, peak)}
        (args.out_dir / f"gpu_{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        summary["parts"][name] = {"met": result.get("met", result.get("all_met")), "wall_s": result["wall_s"],
                                  **({"error": result["error"]} if "error" in result else {})}  # fmt: skip
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    summary["target_wall_s"] = 480
    (args.out_dir / "gpu_suite.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary["parts"]), f"total {summary['wall_s']} s; wrote {args.out_dir}", flush=True)
    return summary


if __name__ == "__main__":
    main()

"""FSDP2 check of the trainer: configs/accelerate/fsdp2.yaml against one plain process, on the GPUs of this machine.

The tiny config trains 4 steps (gradient accumulation 2) in one plain process and in N FSDP2 processes with the same
global batch; the logged losses must agree (fp32: rtol 1e-4, atol 1e-5), the checkpoint's model/ and model_ema/
folders must be full diffusers folders close to the plain run's, and a resume from the sharded step-2 checkpoint must
repeat steps 3-4 (exactly on CPU; to rtol 1e-5 here, as GPU kernels need not be bit-deterministic). A bf16 pair (mixed_precision=bf16, FSDP2's MixedPrecisionPolicy) is run and reported. N is
the GPU count (one GPU: a one-process FSDP2 run, which still shards nothing but goes through fully_shard, DTensors
and the sharded checkpoint). On a machine without CUDA it runs 2 gloo processes through tests/train/test_fsdp.py's
CPU entry (accelerate itself turns FSDP off on CPU), fp32 only.

    python bench/fsdp_check.py [--processes N] [--out fsdp_check_cuda.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import add_out_argument, machine, write_json  # noqa: E402

from tests.train.test_fsdp import launch_fsdp  # noqa: E402
from tests.train.test_trainer import TINY, _losses, make_features  # noqa: E402

PORT = 29570


def plain_run(overrides: list[str], out: Path, mixed_precision: str) -> list[float]:
    """One plain process (``python -m dit.train``: cuda:0, or the CPU)."""
    cmd = [sys.executable, "-m", "dit.train", "--config", str(TINY), *overrides, f"mixed_precision={mixed_precision}",
           f"output_dir={out}"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return _losses(out)


def timed(fn, *args, **kwargs) -> tuple[list[float], float]:
    start = time.perf_counter()
    return fn(*args, **kwargs), time.perf_counter() - start


def folder_gap(ours: Path, reference: Path) -> float:
    """Largest absolute weight difference between two model folders (an error if their keys or shapes differ)."""
    from dit import PixArtTransformer

    a, b = (
        PixArtTransformer.from_pretrained(ours).state_dict(),
        PixArtTransformer.from_pretrained(reference).state_dict(),
    )
    if {k: v.shape for k, v in a.items()} != {k: v.shape for k, v in b.items()}:
        raise AssertionError(f"{ours} and {reference} hold different weights.")
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def check(processes: int, work: Path, mixed_precision: str, port: int, cuda: bool) -> dict:
    features = make_features(work / "features", n=8 * processes)
    common = [f"data.path={features}", "max_steps=4", "gradient_accumulation_steps=2", "report_to=none"]
    plain, plain_s = timed(plain_run, [*common, f"data.batch_size={processes}"], work / "plain", mixed_precision)
    sharded = [*common, "data.batch_size=1", "checkpoint_every=2"]  # 1 per process: the same micro-batch
    fsdp, fsdp_s = timed(launch_fsdp, sharded, work / "fsdp", port, processes, mixed_precision, cuda)
    step2 = work / "fsdp" / "checkpoints" / "checkpoint-2"
    resumed, resumed_s = timed(
        launch_fsdp, [*sharded, f"resume={step2}"], work / "resumed", port + 1, processes, mixed_precision, cuda
    )
    gap = (torch.tensor(fsdp) - torch.tensor(plain)).abs()
    result = {
        "processes": processes,
        "mixed_precision": mixed_precision,
        "plain_losses": plain,
        "fsdp_losses": fsdp,
        "resumed_losses_3_4": resumed,
        "loss_max_abs_gap": gap.max().item(),
        "loss_max_rel_gap": (gap / torch.tensor(plain).abs()).max().item(),
        "resume_exact": resumed == fsdp[2:],
        "resume_close": torch.allclose(torch.tensor(resumed), torch.tensor(fsdp[2:]), rtol=1e-5, atol=0),
        "seconds": {"plain": plain_s, "fsdp": fsdp_s, "fsdp_resumed": resumed_s},
        "shards": sorted(p.name for p in (step2 / "state" / "pytorch_model_fsdp_0").iterdir()),
    }
    for folder in ("model", "model_ema"):
        final = f"checkpoints/checkpoint-4/{folder}"
        result[f"{folder}_max_abs_gap_to_plain"] = folder_gap(work / "fsdp" / final, work / "plain" / final)
        result[f"{folder}_max_abs_gap_to_resumed"] = folder_gap(work / "fsdp" / final, work / "resumed" / final)
    if mixed_precision == "no":
        result["losses_match"] = torch.allclose(torch.tensor(fsdp), torch.tensor(plain), rtol=1e-4, atol=1e-5)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--processes", type=int, default=torch.cuda.device_count() if cuda else 2)
    name = f"fsdp_check_{'cuda' if cuda else 'cpu'}.json"
    add_out_argument(parser, name)
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, precision in enumerate(("no", "bf16") if cuda else ("no",)):
            runs.append(check(args.processes, Path(tmp) / precision, precision, PORT + 2 * i, cuda))
            print(json.dumps(runs[-1]), flush=True)
    fp32 = runs[0]
    ok = fp32["losses_match"] and all(r["resume_close"] for r in runs)  # GPU kernels may not be bit-deterministic
    path = write_json(args.out, {"machine": machine("cuda" if cuda else "cpu"), "runs": runs, "ok": ok}, name)
    print(f"{'OK' if ok else 'FAILED'}: {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

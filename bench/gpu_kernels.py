"""The GPU suite's attention parts (issue 20): one attention layer and block against token count
(``bench/attention_scaling.py``), and LiT-XL against PixArt-XL (``bench/lit_speed.py``), each in its own process
(attention_scaling re-executes itself on the CPU for its memory figures). Used by ``bench/gpu_suite.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: glibc returns large frees to the OS, so CPU peaks show in VmHWM (attention_scaling.py restarts itself without it)
SMALL_FREES_RETURNED = {"MALLOC_MMAP_THRESHOLD_": "65536"}


#: ``--tiny``: a narrow layer (Triton's CPU interpreter runs one program per tile: at XL width 16 tokens take 10 s)
TINY_LAYER = ["--width", "64", "--heads", "4"]


def _run(script: str, options: list[str], out: Path, timeout: int) -> dict:
    """Run ``bench/<script>`` with ``options``; its JSON at ``out``, with the command and its output's tail."""
    cmd = [sys.executable, str(HERE / script), *options]
    env = {**os.environ, **SMALL_FREES_RETURNED}  # set here, attention_scaling.py need not start itself again
    result = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=timeout)
    print(result.stdout[-3000:], result.stderr[-3000:] if result.returncode else "", flush=True)
    if result.returncode != 0:
        raise RuntimeError(f"{script} failed ({result.returncode}): {result.stderr.strip().splitlines()[-1:]}")
    payload = json.loads(out.read_text())
    # the suite names the part and the machine; the script's own per-target verdicts become ``targets_met``
    own = {k: v for k, v in payload.items() if k not in ("benchmark", "device", "machine", "tiny", "met")}
    return {"command": " ".join(cmd[1:]), "script_json": out.name, **own, "targets_met": payload["met"]}


def attention_part(args) -> dict:
    """One self-attention layer and one PixArt-XL block at 1k-64k tokens: softmax, KV ratio 2 and LiT linear (the
    Triton kernels and their torch fallback on CUDA); ``attention_scaling_<device>.json`` and its plot beside."""
    out = args.out_dir / f"attention_scaling_{args.device}.json"
    options = ["--device", args.device, "--out", str(out), "--runs", str(args.runs)]
    if args.tiny:
        options += ["--tokens", "16", "64", "--runs", "1"]
    return _run("attention_scaling.py", options, out, 600)


def lit_part(args) -> dict:
    """LiT-XL's forward (1024 px, batch 4) and training step (batch 2) against PixArt-XL's (``lit_speed``)."""
    out = args.out_dir / f"lit_speed_{args.device}.json"
    options = ["--device", args.device, "--out", str(out), "--runs", str(args.runs)]
    return _run("lit_speed.py", options + (["--tiny"] if args.tiny else []), out, 600)


def profile_part(args) -> dict:
    """torch.profiler tables of one attention layer per variant at 4096 tokens, and on CUDA the host time per call and
    per Triton launch (``bench/profile_attention.py``): ``profile_attention.txt`` beside the JSON."""
    out = args.out_dir / "profile_attention.txt"
    tokens = "16" if args.tiny else "4096"
    cmd = [sys.executable, str(HERE / "profile_attention.py"), "--device", args.device, "--tokens", tokens,
           "--out", str(out)] + (["--calls", "1", "--rows", "3", *TINY_LAYER] if args.tiny else [])  # fmt: skip
    result = subprocess.run(cmd, cwd=HERE.parent, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"profile_attention.py failed ({result.returncode}): {result.stderr.strip()[-500:]}")
    host = [line for line in out.read_text().splitlines() if "ms/call to enqueue" in line]
    print("\n".join(host), flush=True)
    return {"command": " ".join(cmd[1:]), "tables": out.name, "host_times": host, "met": True}

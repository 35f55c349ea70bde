"""Every kernel launch the interpreter tests make also compiles for a Hopper GPU (sm_90), on a machine without one.

The interpreter runs kernels as Python and checks none of the real compiler's rules (tl.dot shapes and dtypes,
constexpr use, layouts). Here the launches of a few interpreted checks are recorded (argument dtypes and constexprs),
then a second process without ``TRITON_INTERPRET`` compiles each distinct one ahead of time with triton's own
compiler down to a cubin for ``GPUTarget("cuda", 90, 32)`` (ptxas ships with triton). A kernel that would not
compile on an H100/H200 fails here, with the compiler's message, and so does a bf16 / fp16 kernel whose cubin spills
registers to a stack frame (read with triton's cuobjdump).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.nn.kernels import test_depthwise_conv as dwc
from tests.nn.kernels import test_kv_pool as kv
from tests.nn.kernels import test_linear_attention as linear
from tests.tiny import ROOT, needs_triton

pytestmark = [
    needs_triton,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="records launches through the interpreter"),
]

_POINTERS = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.uint8: "*u8",
             torch.int8: "*i8", torch.bool: "*i1", torch.int32: "*i32", torch.int64: "*i64"}  # fmt: skip
#: Constexprs whose interpreted value is not the GPU's (the interpreter-only bf16 upcast).
_GPU_VALUES = {"UPCAST": False}

_COMPILE = r"""
import importlib, json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
failures, usage = [], []
for record in json.load(sys.stdin):
    fn = getattr(importlib.import_module(record["module"]), record["kernel"])
    constexprs = {name: value for name, value in record["constexprs"].items()}
    signature = {**record["signature"], **{name: "constexpr" for name in constexprs}}
    try:
        kernel = triton.compile(triton.compiler.ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32))
    except Exception as error:  # the compiler's message names the line
        failures.append(f"{record['kernel']} {record['constexprs']}: {type(error).__name__}: {error}"[:2000])
        continue
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    dump = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", dump)
    usage.append({**record, "registers": int(found.group(1)), "stack": int(found.group(2))} if found else record)
print(json.dumps({"failures": failures, "usage": usage}))
"""


def _describe(fn, args: tuple, kwargs: dict) -> dict:
    """A launch as the compiler needs it: pointer / scalar types, and the constexprs' values."""
    params = inspect.signature(fn).parameters
    bound = dict(zip(params, args), **kwargs)
    signature, constexprs = {}, {}
    for name, value in bound.items():
        annotation = str(params[name].annotation)
        if "constexpr" in annotation or value is None:
            constexprs[name] = _GPU_VALUES.get(name, value)
        elif isinstance(value, torch.Tensor):
            signature[name] = _POINTERS[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i64" if abs(value) >= 2**31 else "i32"
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(value).__name__}")
    return {"module": fn.__module__, "kernel": fn.__name__, "signature": signature, "constexprs": constexprs}


def _record(monkeypatch) -> list[dict]:
    from triton.runtime.interpreter import InterpretedFunction

    records, run = {}, InterpretedFunction.run

    def recording(self, *args, grid, warmup, **kwargs):
        record = _describe(self.fn, args, kwargs)
        records[json.dumps(record, sort_keys=True)] = record
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording)
    for dtype in (torch.bfloat16, torch.float16):
        linear.check_low_precision("cpu", linear.CASES[1], dtype)
    linear.check_grads("cpu", linear.CASES[1])
    for case in kv.CASES[:: len(kv.CASES) // 8]:
        kv.check_pool("cpu", case)
    kv.check_bf16("cpu")
    dwc.check_dwc("cpu", dwc.CASES[-1])
    dwc.check_bf16("cpu")
    return list(records.values())


def test_every_recorded_launch_compiles_for_hopper(monkeypatch):
    records = _record(monkeypatch)
    kernels = {r["kernel"] for r in records}
    assert {"_state_kernel", "_rows_kernel", "_kv_pool_fwd", "_kv_pool_bwd_tokens", "_kv_pool_bwd_weight",
            "_dwc_tokens", "_dwc_bwd_weight"} <= kernels, kernels  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE], input=json.dumps(records), capture_output=True,
                            text=True, cwd=ROOT, env=env, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert not report["failures"], "\n".join(report["failures"])
    # no register spills (a stack frame) where speed matters: the bf16 / fp16 kernels (an unrolled 5x5 stencil once
    # spilled 5 KB per thread); fp32 runs at ieee dot speed anyway, and its backward state kernel spills ~0.5 KB
    low = [u for u in report["usage"] if any(t in ("*bf16", "*fp16") for t in u["signature"].values())]
    assert low and all("stack" in u for u in low)
    spilling = [(u["kernel"], u["constexprs"], u["stack"]) for u in low if u["stack"] > 0]
    assert not spilling, spilling

"""The Triton kernels' tests on CUDA (compiled for the GPU, not interpreted): the same bodies as tests/nn/kernels, on a
representative share of their cases, and a LiT / KV-compressed model with the kernels against the torch ops."""

from __future__ import annotations

import pytest
import torch

from tests.nn.kernels import test_depthwise_conv as dwc
from tests.nn.kernels import test_dispatch as dispatch
from tests.nn.kernels import test_kv_pool as kv
from tests.nn.kernels import test_linear_attention as linear
from tests.tiny import needs_triton

pytestmark = needs_triton
LOW = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("case", linear.CASES, ids=linear.IDS)
def test_linear_attention(case):
    linear.check_forward("cuda", case)
    linear.check_grads("cuda", case)


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_linear_attention_low_precision(dtype):
    linear.check_low_precision("cuda", linear.CASES[3], dtype)
    linear.check_split_precision("cuda", dtype)
    linear.check_overflow("cuda", dtype)


@pytest.mark.parametrize("case", kv.CASES[::5] + kv.TILE_CASES, ids=str)
def test_kv_pool(case):
    (kv.check_pool if case in kv.CASES else kv.check_tiles)("cuda", case)


def test_kv_pool_strided_bf16_and_errors():
    kv.check_strided("cuda")
    kv.check_bf16("cuda")
    kv.check_errors("cuda")


@pytest.mark.parametrize("case", kv.PAIR_CASES, ids=str)
def test_kv_pool_pair(case, monkeypatch):
    kv.check_pair("cuda", case, monkeypatch)


def test_kv_pool_pair_launches(monkeypatch):
    kv.check_fused_attention_launches("cuda", monkeypatch)
    kv.check_pair_not_side_by_side("cuda", monkeypatch)


@pytest.mark.parametrize("case", dwc.CASES[::3] + dwc.TILE_CASES, ids=str)
def test_depthwise_conv(case):
    (dwc.check_dwc if case in dwc.CASES else dwc.check_tiles)("cuda", case)


def test_depthwise_conv_strided_module_bf16_and_errors():
    dwc.check_strided("cuda")
    dwc.check_module("cuda")
    dwc.check_bf16("cuda")
    dwc.check_errors("cuda")


@pytest.mark.parametrize("name", list(dispatch.MODELS))
def test_models_match_the_torch_ops(name):
    try:
        dispatch.check_model_matches_the_torch_ops("cuda", name, "wide", masked=name == "lit")
    finally:
        dispatch.set_kernels(None)

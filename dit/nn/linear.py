"""``Linear``: ``nn.Linear`` that does not fall off a cliff for bf16/fp16 on CPUs without half-precision units.

On CPUs without AVX512-BF16 or AMX (AVX2-only x86, for one), PyTorch's bf16 matmul is emulated and runs
several times slower than fp32 (bench/results/backbone_forward_cpu.json compares the dtypes). There the product of half-
precision inputs is computed in fp32 and rounded back, which is also what a native bf16 GEMM does with its fp32
accumulators; rows are processed in chunks so the fp32 temporaries stay small. Everywhere else, and for fp32,
it is exactly ``nn.Linear``. State-dict keys and PEFT/LoRA wrapping are unchanged (it is an ``nn.Linear``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# fp32 temporaries stay a few MB: ROW_CHUNK input rows and at most PIECE_ELEMENTS weight elements at a time
ROW_CHUNK, PIECE_ELEMENTS = 256, 1 << 20


def _probe_emulated(dtype: torch.dtype) -> bool:
    if dtype == torch.bfloat16:
        return not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return not torch.cpu._is_amx_fp16_supported()


#: Half dtype -> whether this CPU emulates its matmuls: probed once at import, so a compiled graph reads a constant
#: (torch's CPU probes cannot be traced).
EMULATED_HALF = {dtype: _probe_emulated(dtype) for dtype in (torch.bfloat16, torch.float16)}


def cpu_half_is_emulated(dtype: torch.dtype) -> bool:
    """Whether this CPU lacks native matrix units for ``dtype`` (bf16: AVX512-BF16/AMX; fp16: AMX-FP16)."""
    return EMULATED_HALF.get(dtype, False)


def upcast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` computed in fp32 and returned in ``x.dtype``.

    Without gradients the product is tiled (rows x output features), so the fp32 copies of input and weight stay
    a few MB instead of doubling the layer's memory; with gradients it is one fp32 product.
    """
    if torch.is_grad_enabled():
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    rows = x.reshape(-1, x.shape[-1])  # (R, C_in)
    out = torch.empty(rows.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)  # (R, C_out)
    piece = max(64, PIECE_ELEMENTS // weight.shape[1])
    for r in range(0, rows.shape[0], ROW_CHUNK):
        rows32 = rows[r : r + ROW_CHUNK].float()  # (ROW_CHUNK, C_in)
        for o in range(0, weight.shape[0], piece):
            w32 = weight[o : o + piece].float()  # (piece, C_in)
            b32 = None if bias is None else bias[o : o + piece].float()
            out[r : r + ROW_CHUNK, o : o + piece] = F.linear(rows32, w32, b32)
    return out.reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` with the fp32 route for half precision on CPUs that emulate it (see module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype != torch.float32 and cpu_half_is_emulated(x.dtype):
            return upcast_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

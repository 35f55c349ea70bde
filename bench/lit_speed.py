"""LiT-XL against PixArt-XL: the whole backbone's forward and training step, with and without the Triton kernels.

    python bench/lit_speed.py --device cuda --out bench/results/lit_speed_cuda.json   # H100/H200, bf16
    python bench/lit_speed.py --tiny                      # toy sizes on the CPU (CI: the script cannot rot)

Three models with the same width and depth (PixArt-XL: 1152 wide, 28 layers): PixArt-XL (softmax self-attention),
LiT-XL (4-head ReLU linear self-attention and a 5x5 depthwise value convolution) through the Triton kernels of
``dit.nn.kernels`` (forced), through the torch ops (``DIT_TRITON=0``, the fallback), and as the default policy
picks (``auto``). Forward: 1024 px,
batch 4, bf16 weights, inference mode. Training step: forward under bf16 autocast with fp32 weights, MSE, backward,
AdamW, at 1024 px batch 2. Runs alternate; medians compared. Targets (issue 20, CUDA): the LiT-XL forward >= 1.5x
PixArt-XL's, and LiT-XL's training step faster than PixArt-XL's.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the kernels run through triton's interpreter, which triton reads when first
    os.environ.setdefault("TRITON_INTERPRET", "1")  # imported (diffusers imports torch._dynamo, which imports it)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_out_argument, alternate, machine, peak_bytes, write_json  # noqa: E402

from dit import LiTTransformer, PixArtTransformer  # noqa: E402
from dit.models.presets import preset_config  # noqa: E402
from dit.nn.kernels import kernel_mode, triton_installed  # noqa: E402

#: PixArt-Σ XL/2 at 1024 px, all 28 layers; the LiT models are the same config as LiTTransformer (LiT-XL-2-1024).
XL = preset_config("PixArt-Sigma-XL-2-1024")
TINY = dict(
    XL, num_attention_heads=4, attention_head_dim=16, cross_attention_dim=64, caption_channels=32, num_layers=2
)
TEXT_TOKENS = 120
#: model name -> (class, Triton kernels forced "1" / "0", or None: the default policy, ``auto``)
MODELS = {"pixart_xl": (PixArtTransformer, None), "lit_xl_triton": (LiTTransformer, "1"),
          "lit_xl_torch": (LiTTransformer, "0"), "lit_xl_auto": (LiTTransformer, None)}  # fmt: skip
TARGETS = {"forward_speedup": 1.5, "train_speedup": 1.0}


def _inputs(config: dict, size: int, batch: int, dtype: torch.dtype, device: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    latent = size // 8
    return {
        "hidden_states": torch.randn(batch, 4, latent, latent, generator=gen).to(device, dtype),
        "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, config["caption_channels"], generator=gen).to(
            device, dtype
        ),
        "timestep": torch.full((batch,), 500, device=device),
    }


def _with_kernels(mode: str | None, fn):
    """``fn`` with the Triton kernels forced on ("1") or off ("0"); softmax models (None) have none to choose."""

    def run():
        with kernel_mode(mode):
            return fn()

    return run


def _forward(model, kwargs: dict, calls: int):
    @torch.inference_mode()
    def run():
        for _ in range(calls):
            model(**kwargs, return_dict=False)

    return run


def _train_step(model, kwargs: dict, device: str):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    target = torch.randn_like(kwargs["hidden_states"].float())

    def run():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            out = model(**kwargs, return_dict=False)[0]
        loss = ((out[:, :4].float() - target) ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def _build(cls, config: dict, device: str, dtype: torch.dtype):
    torch.manual_seed(0)
    with torch.device(device):
        return cls(**config).to(dtype)


def measure(kind: str, config: dict, size: int, batch: int, device: str, args) -> dict:
    """``kind`` forward (bf16 weights) or train (fp32 weights, bf16 autocast) of every model, alternating."""
    dtype = args.dtype if kind == "forward" else torch.float32
    fns, models = {}, {}
    for name, (cls, mode) in MODELS.items():
        if name != "pixart_xl" and mode != "0" and not args.triton:
            continue  # without the kernels these are the torch ops again
        model = _build(cls, config, device, dtype).eval() if kind == "forward" else _build(cls, config, device, dtype)
        kwargs = _inputs(config, size, batch, args.dtype if kind == "forward" else torch.float32, device)
        step = _forward(model, kwargs, args.calls) if kind == "forward" else _train_step(model, kwargs, device)
        fns[name], models[name] = _with_kernels(mode, step), model
    times = alternate(fns, device, args.runs, warmup=2)
    result = {"size_px": size, "batch": batch, "calls_per_round": args.calls if kind == "forward" else 1}
    for name, fn in fns.items():
        per_call = times[name]["median_s"] / result["calls_per_round"]
        result[name] = {"ms": round(per_call * 1e3, 3), "runs_s": times[name]["runs_s"],
                        "peak_memory_bytes": peak_bytes(fn, device)}  # fmt: skip
    del models, fns
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="toy width and depth (CPU, seconds)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--calls", type=int, default=5, help="forward calls per timed round")
    add_out_argument(parser, "lit_speed_<device>.json")  # --tiny without --out writes nothing
    args = parser.parse_args(argv)
    if args.device == "cpu" and not args.tiny:
        parser.error("the targets are for CUDA; use --tiny on the CPU")
    args.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are first compiled
    # the kernels run on CUDA, or on the CPU through triton's interpreter (TRITON_INTERPRET=1)
    args.triton = triton_installed() and (args.device == "cuda" or args.tiny)
    config = TINY if args.tiny else XL
    if args.tiny:
        args.runs, args.calls = min(args.runs, 2), 1
    forward = measure("forward", config, 64 if args.tiny else 1024, 1 if args.tiny else 4, args.device, args)
    train = measure("train", config, 64 if args.tiny else 1024, 1 if args.tiny else 2, args.device, args)
    lit = "lit_xl_triton" if args.triton else "lit_xl_torch"
    figures = {
        "forward_speedup": forward["pixart_xl"]["ms"] / forward[lit]["ms"],
        "train_speedup": train["pixart_xl"]["ms"] / train[lit]["ms"],
    }
    if args.triton:  # what a user gets by default (dit.nn.kernels.use_kernels)
        figures["auto_forward_speedup"] = forward["pixart_xl"]["ms"] / forward["lit_xl_auto"]["ms"]
        figures["auto_train_speedup"] = train["pixart_xl"]["ms"] / train["lit_xl_auto"]["ms"]
    met = {"forward_speedup": figures["forward_speedup"] >= TARGETS["forward_speedup"],
           "train_speedup": figures["train_speedup"] > TARGETS["train_speedup"]}  # fmt: skip
    payload = {"benchmark": "lit_speed", "device": args.device, "machine": machine(args.device), "tiny": args.tiny,
               "config": {**config, "text_tokens": TEXT_TOKENS, "dtype": str(args.dtype), "lit_measured": lit,
                          "runs": args.runs},
               "forward": forward, "train": train, "figures": {k: round(v, 3) for k, v in figures.items()},
               "targets": {"forward_speedup": ">= 1.5", "train_speedup": "> 1.0"}, "met": met,
               "all_met": all(met.values())}  # fmt: skip
    print(payload["figures"], met, flush=True)
    if args.out is not None or not args.tiny:
        write_json(args.out, payload, f"lit_speed_{args.device}.json")
    return payload


if __name__ == "__main__":
    main()

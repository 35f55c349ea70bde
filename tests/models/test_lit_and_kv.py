"""LiTTransformer and KV-compressed PixArt: inheritance from PixArt, config round trips, pipelines, original keys."""

import pytest
import torch
from safetensors.torch import save_file

from dit import LiTTransformer, PixArtTransformer
from dit.convert import load_original_pixart
from tests.tiny import SIGMA, original_state_dict, randomize_

CONFIG = {**SIGMA, "num_layers": 4}
SHAPES = {"square": (8, 8), "wide": (6, 10), "odd": (6, 14)}


def _pixart(seed=0):
    torch.manual_seed(seed)
    return randomize_(PixArtTransformer(**CONFIG)).eval()


def _inputs(shape):
    torch.manual_seed(1)
    return torch.randn(2, 4, *shape), torch.randn(2, 5, 32), torch.tensor([10, 700])


def test_lit_inherits_everything_but_self_attention_qkv():
    pixart = _pixart()
    lit = LiTTransformer.from_pixart(pixart)
    assert lit.config.self_attention_type == "linear" and lit.config.attention_conv_kernel_size == 5
    report = lit.inheritance_report
    assert all(".attn1.to_q." in k or ".attn1.to_k." in k or ".attn1.to_v." in k or ".attn1.dwc." in k
               for k in report["new"])  # fmt: skip
    assert len(report["new"]) == 4 * 8  # q, k, v, dwc (weight, bias) in each of 4 blocks
    theirs = pixart.state_dict()
    for key, value in lit.state_dict().items():
        if key not in report["new"]:
            assert torch.equal(value, theirs[key]), key
    assert lit.transformer_blocks[0].attn1.kernel == "linear" and lit.transformer_blocks[0].attn2.kernel == "softmax"


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_lit_forward_and_round_trip(tmp_path, shape):
    lit = LiTTransformer.from_pixart(_pixart()).eval()
    x, text, t = _inputs(shape)
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    with torch.no_grad():
        out = lit(x, text, t, encoder_attention_mask=mask).sample
    assert out.shape == (2, 8, *shape) and torch.isfinite(out).all()
    lit.save_pretrained(tmp_path)
    again = LiTTransformer.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(x, text, t, encoder_attention_mask=mask).sample, out)
    assert LiTTransformer(**CONFIG).config.self_attention_type == "linear"


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_kv_compression_on_the_deep_half(shape):
    pixart = _pixart()
    kv = PixArtTransformer.from_pixart(pixart, kv_compress_ratio=2).eval()
    compressed = [b.attn1.kv_compress is not None for b in kv.transformer_blocks]
    assert compressed == [False, False, True, True]
    assert all(".kv_compress." in k for k in kv.inheritance_report["new"]) and not kv.inheritance_report["dropped"]
    x, text, t = _inputs(shape)
    with torch.no_grad():
        out = kv(x, text, t).sample
    assert out.shape == (2, 8, *shape) and torch.isfinite(out).all()
    only_first = PixArtTransformer(**CONFIG, kv_compress_ratio=2, kv_compress_layers=[0], kv_compress_mode="uniform")
    assert [b.attn1.kv_compress is not None for b in only_first.transformer_blocks] == [True, False, False, False]


def test_original_sigma_checkpoint_with_kv_compression_loads_exactly(tmp_path):
    model = PixArtTransformer(**CONFIG, kv_compress_ratio=2)
    torch.manual_seed(0)
    randomize_(model).eval()
    original = original_state_dict(model)
    sd = model.state_dict()
    for i in (2, 3):
        for kind in ("weight", "bias"):
            original[f"blocks.{i}.attn.sr.{kind}"] = sd[f"transformer_blocks.{i}.attn1.kv_compress.conv.{kind}"]
            original[f"blocks.{i}.attn.norm.{kind}"] = sd[f"transformer_blocks.{i}.attn1.kv_compress.norm.{kind}"]
    save_file(original, tmp_path / "sigma-kv.safetensors")
    loaded = load_original_pixart(tmp_path / "sigma-kv.safetensors", sample_size=8, attention_head_dim=12,
                                  interpolation_scale=1).eval()  # fmt: skip
    assert loaded.config.kv_compress_ratio == 2 and list(loaded.config.kv_compress_layers) == [2, 3]
    # the original's Conv2d(kernel=stride=2) drops the odd grid's last row/column; ours replicate-pads by default
    assert loaded.config.kv_compress_padding == "none" and model.config.kv_compress_padding == "replicate"
    dropping = PixArtTransformer(**CONFIG, kv_compress_ratio=2, kv_compress_padding="none").eval()
    dropping.load_state_dict(model.state_dict())
    x, text, t = _inputs((6, 10))  # a 3x5 token grid: 1x2 key cells (2x3 when padded)
    with torch.no_grad():
        assert (loaded(x, text, t).sample - dropping(x, text, t).sample).abs().max() <= 1e-5
        assert (loaded(x, text, t).sample - model(x, text, t).sample).abs().max() > 1e-3


@pytest.mark.parametrize("cls", [LiTTransformer, PixArtTransformer], ids=["lit", "kv"])
def test_variants_drop_into_diffusers_sigma_pipeline(tmp_path, cls):
    from diffusers import PixArtSigmaPipeline

    from dit.tiny import tiny_pipeline

    pipe = tiny_pipeline()
    extra = {} if cls is LiTTransformer else {"kv_compress_ratio": 2}
    transformer = cls.from_pixart(pipe.transformer, **extra)
    pipe.transformer = transformer
    pipe.register_modules(transformer=transformer)
    pipe.save_pretrained(tmp_path)
    theirs = PixArtSigmaPipeline.from_pretrained(tmp_path)
    assert type(theirs.transformer) is cls
    size = transformer.config.sample_size * 2
    kwargs = dict(num_inference_steps=2, height=size, width=size, output_type="np")
    a = theirs("a red circle", generator=torch.Generator().manual_seed(0), use_resolution_binning=False, **kwargs)
    b = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs)
    assert (a.images - b.images).__abs__().max() < 1e-4

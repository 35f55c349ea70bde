"""Parity with the original PixArt-δ ControlNet code and diffusers' research adapter, through the public loader.

The fixtures (``../shared/fixtures/pixart_controlnet_original``, made by running ``ControlPixArtHalf`` /
``ControlPixArtMSHalf`` and the research ``PixArtControlNetTransformerModel`` with random weights, see its README)
hold each case's state dicts, inputs and outputs. Every variant is loaded with
:func:`dit.convert.load_original_pixart_controlnet`, run as ``transformer(..., block_controls=block_controls(...))``
and compared in fp32. The error paths and the batch-1 broadcasts need no fixtures.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dit import PixArtTransformer
from dit.checkpoint import CheckpointKeyError
from dit.convert import load_original_pixart_controlnet
from dit.models.controlnet import ControlNetAdapter, block_controls
from dit.pipelines.controlnet import encode_control
from tests.tiny import ALPHA, assert_fp32_close, original_state_dict, randomize_, tiny_vae

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "pixart_controlnet_original"
HAVE_FIXTURES = (FIXTURES / "cases.json").is_file()
needs_fixtures = pytest.mark.skipif(
    not HAVE_FIXTURES, reason=f"PixArt-δ ControlNet original-code fixtures not found at {FIXTURES}"
)
CASES = json.loads((FIXTURES / "cases.json").read_text())["cases"] if HAVE_FIXTURES else {}
VARIANTS = [(case, variant["name"]) for case, spec in CASES.items() for variant in spec["variants"]]


def _original_pair(case: str) -> tuple[PixArtTransformer, ControlNetAdapter]:
    """An original case loaded as a released checkpoint is (``{"state_dict": ...}``)."""
    spec = CASES[case]
    kwargs = spec["base_constructor_kwargs"]
    checkpoint = {"state_dict": load_file(FIXTURES / spec["files"]["state"])}
    return load_original_pixart_controlnet(
        checkpoint, sample_size=kwargs["input_size"], attention_head_dim=kwargs["hidden_size"] // kwargs["num_heads"]
    )


def _research_base() -> PixArtTransformer:
    """The research case's diffusers ``PixArtTransformer2DModel`` weights in our class (same keys and config)."""
    spec = CASES["diffusers_adapter"]
    base = PixArtTransformer(**spec["transformer_config"])
    base.load_state_dict(load_file(FIXTURES / spec["files"]["transformer"]), strict=True)
    return base


def _pair(case: str) -> tuple[PixArtTransformer, ControlNetAdapter]:
    if CASES[case]["format"] == "original":
        return _original_pair(case)
    path = FIXTURES / CASES[case]["files"]["controlnet"]
    return load_original_pixart_controlnet(path, transformer=_research_base())


def _run(transformer, adapter, io: dict[str, torch.Tensor], variant: str) -> torch.Tensor:
    """Our forward on the reference's inputs: y (B, 1, L, C) -> (B, L, C), data_info -> added_cond_kwargs."""
    y = io[f"y__{variant}"]
    added = None
    if transformer.use_additional_conditions:
        size = io.get(f"img_hw__{variant}", io.get(f"resolution__{variant}"))
        added = {"resolution": size, "aspect_ratio": io[f"aspect_ratio__{variant}"]}
    control = io.get(f"c__{variant}", io.get(f"controlnet_cond__{variant}"))
    controls = None if control is None else block_controls(transformer, adapter, control, 1.0)
    with torch.no_grad():
        return transformer(
            io[f"x__{variant}"],
            encoder_hidden_states=y[:, 0] if y.ndim == 4 else y,
            timestep=io[f"t__{variant}"],
            added_cond_kwargs=added,
            encoder_attention_mask=io.get(f"mask__{variant}"),
            block_controls=controls,
        ).sample


@pytest.fixture(scope="module")
def pairs() -> dict:
    return {}


@needs_fixtures
@pytest.mark.parametrize(("case", "variant"), VARIANTS, ids=[f"{c}-{v}" for c, v in VARIANTS])
def test_fixture_matches_original(pairs, case, variant):
    if case not in pairs:
        pairs[case] = tuple(model.eval() for model in _pair(case))
    io = load_file(FIXTURES / CASES[case]["files"]["io"])
    assert_fp32_close(_run(*pairs[case], io, variant), io[f"out__{variant}"])


@needs_fixtures
def test_original_pth_loads_weights_only(tmp_path):
    """A released ``.pth`` (``{"state_dict": ...}``) holds weights only: it reads with ``weights_only=True``, no
    ``allow_pickle`` opt-in."""
    spec = CASES["alpha_512_control"]
    path = tmp_path / "PixArt-XL-2-512-ControlNet.pth"
    torch.save({"state_dict": load_file(FIXTURES / spec["files"]["state"])}, path)
    transformer, adapter = load_original_pixart_controlnet(path, sample_size=16, attention_head_dim=12)
    assert adapter.positions == [0] and transformer.config.num_layers == 3
    io = load_file(FIXTURES / spec["files"]["io"])
    assert_fp32_close(_run(transformer.eval(), adapter.eval(), io, "grid8x8"), io["out__grid8x8"])


@needs_fixtures
def test_research_adapter_folder(tmp_path):
    """A ``PixArtControlNetAdapterModel`` folder (config ``num_layers``) loads; a wrong ``num_layers`` is named."""
    spec = CASES["diffusers_adapter"]
    shutil.copy(FIXTURES / spec["files"]["controlnet"], tmp_path / "diffusion_pytorch_model.safetensors")
    config = {"_class_name": "PixArtControlNetAdapterModel", **spec["controlnet_config"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    transformer, adapter = load_original_pixart_controlnet(tmp_path, transformer=_research_base())
    assert adapter.positions == [0, 1]
    io = load_file(FIXTURES / spec["files"]["io"])
    assert_fp32_close(_run(transformer.eval(), adapter.eval(), io, "grid8x12"), io["out__grid8x12"])
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_layers": 13}))
    with pytest.raises(ValueError, match="num_layers=13"):
        load_original_pixart_controlnet(tmp_path, transformer=_research_base())


# ----- error paths and broadcasts (no fixtures) -----------------------------------------------------------------
def _tiny_original() -> dict[str, torch.Tensor]:
    """A tiny original-format state dict: a PixArt-α base (micro-conditions) of depth 2 and one control block whose
    copied block has its own random weights."""
    torch.manual_seed(0)
    base = original_state_dict(randomize_(PixArtTransformer(**ALPHA)), null_length=4)
    state = {f"base_model.{k}": v for k, v in base.items()}
    width = ALPHA["num_attention_heads"] * ALPHA["attention_head_dim"]
    for proj in ("before_proj", "after_proj"):
        state[f"controlnet.0.{proj}.weight"], state[f"controlnet.0.{proj}.bias"] = (
            torch.randn(width, width),
            torch.randn(width),
        )
    for key, value in base.items():
        if key.startswith("blocks.0."):
            state[f"controlnet.0.copied_block.{key[len('blocks.0.') :]}"] = torch.randn_like(value)
    return state


def test_tiny_original_round_trip():
    """The weights of an original-format checkpoint land where the key mapping says (q of the fused qkv included)."""
    state = _tiny_original()
    transformer, adapter = load_original_pixart_controlnet({"state_dict": state}, sample_size=8, attention_head_dim=12)
    assert adapter.positions == [0]
    assert torch.equal(adapter.before_proj.weight, state["controlnet.0.before_proj.weight"])
    q = state["controlnet.0.copied_block.attn.qkv.weight"].chunk(3)[0]
    assert torch.equal(adapter.controlnet_blocks[0].transformer_block.attn1.to_q.weight, q)


def test_not_a_controlnet_checkpoint():
    plain = {k[len("base_model.") :]: v for k, v in _tiny_original().items() if k.startswith("base_model.")}
    with pytest.raises(ValueError, match="Not a PixArt-δ ControlNet checkpoint.*load_original_pixart"):
        load_original_pixart_controlnet({"state_dict": plain}, sample_size=8, attention_head_dim=12)
    ours = PixArtTransformer(**ALPHA).state_dict()
    with pytest.raises(ValueError, match="Not a PixArt-δ ControlNet checkpoint.*transformer="):
        load_original_pixart_controlnet(ours)
    adapter_only = {k: v for k, v in _tiny_original().items() if k.startswith("controlnet.")}
    with pytest.raises(ValueError, match="no base_model"):
        load_original_pixart_controlnet(adapter_only)


def test_original_keys_are_strict():
    state = _tiny_original()
    extra = {**state, "controlnet.0.copied_block.attn.extra.weight": torch.zeros(1)}
    with pytest.raises(KeyError, match="attn.extra"):
        load_original_pixart_controlnet(extra, sample_size=8, attention_head_dim=12)
    second_before = {**state, "controlnet.1.before_proj.weight": torch.zeros(1)}
    with pytest.raises(KeyError, match="controlnet.1.before_proj"):
        load_original_pixart_controlnet(second_before, sample_size=8, attention_head_dim=12)
    missing = {k: v for k, v in state.items() if k != "controlnet.0.after_proj.bias"}
    with pytest.raises(CheckpointKeyError, match="missing key.*controlnet_blocks.0.after_proj.bias"):
        load_original_pixart_controlnet(missing, sample_size=8, attention_head_dim=12)
    with pytest.raises(ValueError, match="holds its own base"):
        load_original_pixart_controlnet(state, transformer=PixArtTransformer(**ALPHA))


def _research_state(base: PixArtTransformer) -> dict[str, torch.Tensor]:
    """A research-format adapter state dict for ``base``: block 0's ``before_proj`` inside ``controlnet_blocks.0``."""
    ours = randomize_(ControlNetAdapter.from_transformer(base, num_blocks=1)).state_dict()
    return {(f"controlnet_blocks.0.{k}" if k.startswith("before_proj.") else k): v for k, v in ours.items()}


def test_research_adapter_needs_transformer():
    base = PixArtTransformer(**ALPHA)
    state = _research_state(base)
    with pytest.raises(ValueError, match="pass the PixArt transformer"):
        load_original_pixart_controlnet(state)
    with pytest.raises(ValueError, match="sample_size describe the base"):
        load_original_pixart_controlnet(state, transformer=base, sample_size=64)
    transformer, adapter = load_original_pixart_controlnet(state, transformer=base)
    assert transformer is base and torch.equal(adapter.before_proj.bias, state["controlnet_blocks.0.before_proj.bias"])


def _inputs(batch: int = 2) -> dict:
    torch.manual_seed(0)
    return {
        "hidden_states": torch.randn(batch, 4, 8, 12),
        "encoder_hidden_states": torch.randn(batch, 5, ALPHA["caption_channels"]),
        "timestep": torch.tensor([700.0, 20.0][:batch]),
    }


def test_batch_one_micro_conditions_and_control_broadcast():
    """One row of micro-conditions and one control latent act as if repeated over the batch (the original's CFG
    batch); full-batch inputs are unchanged; other batch sizes are named."""
    base = randomize_(PixArtTransformer(**ALPHA)).eval()
    adapter = randomize_(ControlNetAdapter.from_transformer(base, num_blocks=1)).eval()
    one = {"resolution": torch.tensor([[64.0, 96.0]]), "aspect_ratio": torch.tensor([[2 / 3]])}
    full = {k: v.repeat(2, 1) for k, v in one.items()}
    control = torch.randn(1, 4, 8, 12)
    with torch.no_grad():
        repeated = base(**_inputs(), added_cond_kwargs=full).sample
        assert torch.equal(base(**_inputs(), added_cond_kwargs=one).sample, repeated)
        controls = block_controls(base, adapter, control.repeat(2, 1, 1, 1))
        expected = base(**_inputs(), added_cond_kwargs=full, block_controls=controls).sample
        actual = base(**_inputs(), added_cond_kwargs=one, block_controls=block_controls(base, adapter, control)).sample
    assert_fp32_close(actual, expected)  # before_proj runs on 1 row instead of 2: a different GEMM, rounding only
    assert (expected - repeated).abs().max() > 0.1  # the control acts
    three = {k: v.repeat(3, 1) for k, v in one.items()}
    with pytest.raises(ValueError, match="one row per sample"):
        base(**_inputs(), added_cond_kwargs=three)


def test_encode_control_posterior_sample():
    """``posterior="sample"`` is the VAE posterior sample times the scaling factor (PixArt-δ's inference); the
    default is still the mean."""
    vae = tiny_vae().eval()
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(images).latent_dist
        mean = encode_control(vae, images)
        sample = encode_control(vae, images, "sample", torch.Generator().manual_seed(3))
        expected = dist.sample(torch.Generator().manual_seed(3)) * vae.config.scaling_factor
    torch.testing.assert_close(mean, dist.mean * vae.config.scaling_factor)
    torch.testing.assert_close(sample, expected)
    assert not torch.allclose(sample, mean)
    with pytest.raises(ValueError, match="posterior"):
        encode_control(vae, images, "mode")


def test_pipeline_control_posterior():
    """``ControlNetPipeline(..., control_posterior="sample")`` encodes the control as a posterior sample drawn with
    the call's generator: reproducible per seed, and not the mean (the default)."""
    from diffusers import DPMSolverMultistepScheduler

    from dit.pipelines import ControlNetPipeline
    from tests.tiny import SIGMA, tiny_t5, tiny_tokenizer

    torch.manual_seed(0)
    transformer = randomize_(PixArtTransformer(**{**SIGMA, "num_layers": 3}), std=0.05).eval()
    adapter = randomize_(ControlNetAdapter.from_transformer(transformer, num_blocks=2), std=0.05).eval()
    parts = (tiny_tokenizer(), tiny_t5(), tiny_vae(), transformer, DPMSolverMultistepScheduler(), adapter)
    pipe = ControlNetPipeline(*parts)
    control = (torch.rand(16, 16) > 0.5).numpy().astype("uint8") * 255

    def run(posterior: str):
        return pipe("a red circle", control_image=control, control_posterior=posterior, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0), output_type="np",
                    use_resolution_binning=False).images  # fmt: skip

    sample = run("sample")
    assert (sample == run("sample")).all()
    assert abs(sample - run("mean")).max() > 1e-4
    with pytest.raises(ValueError, match="control_posterior"):
        run("mode")

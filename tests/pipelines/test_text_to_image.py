"""TextToImagePipeline, and our transformer as a drop-in for diffusers' PixArt pipelines."""

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline
from PIL import Image

from dit import PixArtTransformer
from dit.cli import main as cli_main
from dit.pipelines import ControlNetPipeline, TextToImagePipeline
from dit.pipelines.resolution import sampling_size
from tests.tiny import SIGMA, diffusers_and_ours, randomize_, tiny_t5, tiny_tokenizer, tiny_vae

PROMPT = "a large red circle on the left, on a white background"


def _parts():
    return dict(
        tokenizer=tiny_tokenizer(), text_encoder=tiny_t5(), vae=tiny_vae(), scheduler=DPMSolverMultistepScheduler()
    )


def _ours(transformer=None):
    transformer = transformer or randomize_(PixArtTransformer(**SIGMA), std=0.05).eval()
    return TextToImagePipeline(transformer=transformer, **_parts())


def _run(pipe, seed=0, **kwargs):
    kwargs = {"num_inference_steps": 3, "output_type": "np", "use_resolution_binning": False, **kwargs}
    return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), **kwargs).images


def test_generates_deterministically():
    pipe = _ours()
    first, again, other = _run(pipe), _run(pipe), _run(pipe, seed=1)
    assert first.shape == (1, 16, 16, 3)
    assert np.array_equal(first, again)
    assert not np.allclose(first, other)


def test_matches_diffusers_sigma_pipeline():
    """Same components, same seed: our pipeline gives diffusers' PixArtSigmaPipeline's image."""
    _, transformer = diffusers_and_ours(SIGMA)
    ours = TextToImagePipeline(transformer=transformer, **_parts())
    reference = PixArtSigmaPipeline(transformer=transformer, **_parts())
    expected = _run(reference, clean_caption=False)
    assert np.abs(_run(ours) - expected).max() <= 1e-5


@pytest.mark.parametrize("pipeline_cls", [PixArtAlphaPipeline, PixArtSigmaPipeline])
def test_drop_in_for_diffusers_transformer(pipeline_cls):
    reference_model, ours_model = diffusers_and_ours(SIGMA)
    reference = pipeline_cls(transformer=reference_model, **_parts())
    ours = pipeline_cls(transformer=ours_model, **_parts())
    kwargs = dict(clean_caption=False, max_sequence_length=12)
    assert np.abs(_run(ours, **kwargs) - _run(reference, **kwargs)).max() <= 1e-5


def test_diffusers_pipeline_round_trip(tmp_path):
    _, transformer = diffusers_and_ours(SIGMA)
    pipe = PixArtSigmaPipeline(transformer=transformer, **_parts())
    before = _run(pipe, clean_caption=False)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["transformer"] == ["dit.models.pixart_transformer", "PixArtTransformer"]
    assert not list(tmp_path.rglob("*.bin"))
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded) is PixArtSigmaPipeline and type(loaded.transformer) is PixArtTransformer
    assert np.abs(_run(loaded, clean_caption=False) - before).max() <= 1e-5


def test_own_pipeline_round_trip(tmp_path):
    pipe = _ours()
    before = _run(pipe)
    pipe.save_pretrained(tmp_path)
    loaded = TextToImagePipeline.from_pretrained(tmp_path)
    assert type(loaded.transformer) is PixArtTransformer
    assert np.abs(_run(loaded) - before).max() <= 1e-6


def test_learned_null_caption_is_the_unconditional_branch():
    transformer = randomize_(PixArtTransformer(**SIGMA, null_caption_length=20), std=0.05).eval()
    pipe = _ours(transformer)
    seen = []
    transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["encoder_hidden_states"]), with_kwargs=True)
    _run(pipe, num_inference_steps=1, max_sequence_length=16)
    uncond = seen[0][0]  # the first half of the CFG batch
    assert torch.equal(uncond, transformer.y_embedding[:16].detach())
    seen.clear()
    _run(pipe, num_inference_steps=1, max_sequence_length=16, negative_prompt="a photo")
    assert not torch.equal(seen[0][0], transformer.y_embedding[:16].detach())


def test_callback_on_step_end_sees_every_step():
    steps = []

    def callback(pipe, i, t, tensors):
        steps.append(i)
        return {"latents": torch.zeros_like(tensors["latents"])}

    image = _run(_ours(), num_inference_steps=3, callback_on_step_end=callback, output_type="latent")
    assert steps == [0, 1, 2]
    assert torch.count_nonzero(image) == 0


def test_any_size_snaps_to_nearest_valid_and_returns_requested():
    image = _run(_ours(), height=18, width=30, use_resolution_binning=True)
    assert image.shape == (1, 18, 30, 3)


def test_invalid_size_without_binning_is_named():
    with pytest.raises(ValueError, match=r"18x30 does not divide into patches.*multiples of 4"):
        _run(_ours(), height=18, width=30)


def test_pixart_bins_for_pixart_sizes():
    assert sampling_size(1000, 1000, 1024, 16, True) == (1024, 1024)
    assert sampling_size(300, 1200, 1024, 16, True) == (512, 2048)
    assert sampling_size(500, 500, 512, 16, True) == (512, 512)
    assert sampling_size(100, 70, 320, 16, True) == (96, 64)  # no bins for 320 px: nearest multiple
    assert sampling_size(64, 64, 64, 8, True) == (64, 64)  # a 2x-VAE model with sample_size 32 is not a 256-px one


def test_cli_generate_writes_png(tmp_path, capsys):
    _ours().save_pretrained(tmp_path / "model")
    out = tmp_path / "out.png"
    assert cli_main(["generate", PROMPT, "--model", str(tmp_path / "model"), "-o", str(out), "--steps", "2"]) == 0
    assert Image.open(out).size == (16, 16)
    assert "saved" in capsys.readouterr().out


def test_cli_generate_without_default_model_says_so(monkeypatch, tmp_path, capsys):
    import dit.cli_checks

    monkeypatch.setattr(dit.cli_checks, "default_model", lambda: tmp_path / "missing")
    assert cli_main(["generate", PROMPT]) == 2
    assert "no default model" in capsys.readouterr().err


@pytest.mark.parametrize("scheduler", ["FlowMatchEulerDiscreteScheduler", "LCMScheduler", "DDIMScheduler"])
def test_samples_with_other_diffusers_schedulers(scheduler):
    """Schedulers without ``init_noise_sigma`` / ``scale_model_input`` (flow matching) work too."""
    import diffusers

    pipe = _ours()
    pipe.scheduler = getattr(diffusers, scheduler)()
    first, again = _run(pipe, num_inference_steps=2), _run(pipe, num_inference_steps=2)
    assert first.shape == (1, 16, 16, 3) and np.isfinite(first).all() and np.array_equal(first, again)


def _compiled_runs(**compile_kwargs) -> tuple:
    """Images of a fresh pipeline before and after ``compile_transformer(**compile_kwargs)`` (twice after), the
    number it compiled and the graphs dynamo made (a recording backend)."""
    import torch._dynamo

    torch._dynamo.reset()
    pipe = _ours()
    expected = _run(pipe)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    count = pipe.compile_transformer(backend=backend, **compile_kwargs)
    actual, again = _run(pipe), _run(pipe)
    torch._dynamo.reset()
    return expected, actual, again, count, graphs


def test_compiled_transformer_gives_the_same_images_with_no_graph_break():
    """Regional compilation of the blocks (fullgraph): the same images as eager, and no recompilation per step."""
    expected, actual, again, count, graphs = _compiled_runs()
    assert count == SIGMA["num_layers"]
    assert np.abs(actual - expected).max() <= 1e-5 and np.array_equal(actual, again)
    assert 1 <= len(graphs) <= 2  # one graph for every block and step (a second if shapes go dynamic)


def test_whole_model_compile_matches_eager_with_one_graph():
    """compile_transformer(regional=False): the whole transformer in one fullgraph graph, reused at every step."""
    expected, actual, again, count, graphs = _compiled_runs(regional=False)
    assert count == 1
    assert np.abs(actual - expected).max() <= 1e-5 and np.array_equal(actual, again)
    assert len(graphs) == 1  # one static graph for every step and both calls


def test_whole_model_compile_refuses_what_does_not_combine():
    pipe = _ours().enable_cuda_graphs()
    with pytest.raises(ValueError, match="call disable_cuda_graphs\\(\\) first"):
        pipe.compile_transformer(regional=False, mode="reduce-overhead")
    pipe.disable_cuda_graphs()
    pipe.compile_transformer(regional=False, mode="reduce-overhead", backend="eager")
    with pytest.raises(ValueError, match="compiled whole with mode='reduce-overhead'"):
        pipe.enable_cuda_graphs()
    from tests.pipelines.test_controlnet_pipeline import _adapter, _parts, _transformer

    transformer = _transformer()
    control = ControlNetPipeline(transformer=transformer, controlnet=_adapter(transformer), **_parts())
    with pytest.raises(ValueError, match="has ControlNet adapters: compile regionally"):
        control.compile_transformer(regional=False)


def test_cli_generate_compile_flag(tmp_path, monkeypatch):
    calls = []
    original = TextToImagePipeline.compile_transformer

    def recording(self, **kwargs):
        calls.append(kwargs)
        return original(self, backend="aot_eager", **kwargs)

    monkeypatch.setattr(TextToImagePipeline, "compile_transformer", recording)
    out = tmp_path / "out.png"
    assert cli_main(["generate", PROMPT, "-o", str(out), "--steps", "2", "--compile", "--device", "cpu"]) == 0
    assert calls == [{}] and Image.open(out).size[0] > 0

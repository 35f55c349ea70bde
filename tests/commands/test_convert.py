"""`dit convert`: original checkpoints to model folders and complete pipeline folders; bad arguments refused before
any work, and nothing half-written or overwritten."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DDPMScheduler, DiffusionPipeline, EDMDPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from safetensors.torch import save_file

import dit  # noqa: F401 (registers our pipelines with diffusers)
from dit import ControlNetAdapter, MicroDiTOriginalTransformer, PixArtTransformer
from dit.cli import main as cli_main
from dit.convert import load_original_fit, load_original_pixart
from dit.pipelines import ClassToImagePipeline, ControlNetPipeline, TextToImagePipeline
from dit.tiny import tiny_pipeline
from tests.tiny import class_pipeline, randomize_


def original_pixart(folder, base: TextToImagePipeline):
    """An original-format checkpoint (the PixArt repository's keys) of ``base``'s transformer, and its options."""
    from tests.tiny import original_state_dict

    state = original_state_dict(base.transformer, null_length=300)  # the pipeline asks for 300 tokens
    path = folder / "PixArt-tiny.safetensors"
    save_file(state, path)
    options = folder / "options.yaml"
    config = base.transformer.config
    options.write_text(
        f"sample_size: {config.sample_size}\nattention_head_dim: {config.attention_head_dim}\nkv_compress: false\n"
    )
    return path, options


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny pipeline folder (the other components of a converted pipeline) and the pipeline."""
    pipe = tiny_pipeline()
    randomize_(pipe.transformer, std=0.05)
    folder = tmp_path_factory.mktemp("base")
    pipe.save_pretrained(folder)
    return folder, pipe


def _files(folder):
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


def test_pixart_to_a_model_folder(tmp_path, base):
    _, pipe = base
    checkpoint, options = original_pixart(tmp_path, pipe)
    assert cli_main(["convert", "pixart", str(checkpoint), str(tmp_path / "out"), "--config", str(options)]) == 0
    loaded = PixArtTransformer.from_pretrained(tmp_path / "out", subfolder="transformer")
    expected = load_original_pixart(checkpoint, sample_size=pipe.transformer.config.sample_size,
                                    attention_head_dim=pipe.transformer.config.attention_head_dim, kv_compress=False)  # fmt: skip
    for key, value in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert not [name for name in _files(tmp_path / "out") if name.endswith((".bin", ".pt", ".pth"))]


def test_pixart_to_a_pipeline_folder_diffusers_loads(tmp_path, base):
    folder, pipe = base
    checkpoint, options = original_pixart(tmp_path, pipe)
    out = tmp_path / "pipeline"
    argv = ["convert", "pixart", str(checkpoint), str(out), "--config", str(options), "--pipeline", str(folder)]
    assert cli_main(argv) == 0
    loaded = DiffusionPipeline.from_pretrained(out)
    assert isinstance(loaded, TextToImagePipeline)
    for key, value in pipe.transformer.state_dict().items():
        if key in loaded.transformer.state_dict():
            assert torch.equal(loaded.transformer.state_dict()[key], value), key
    image = loaded("a red circle", num_inference_steps=2, height=16, width=16, output_type="pt").images
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()


def _research_adapter(folder, transformer):
    """diffusers' research PixArtControlNetAdapterModel layout of a random adapter on ``transformer``."""
    adapter = randomize_(ControlNetAdapter.from_transformer(transformer, num_blocks=1), std=0.05)
    state = {
        ("controlnet_blocks.0." + key if key.startswith("before_proj.") else key): value.contiguous()
        for key, value in adapter.state_dict().items()
    }
    folder.mkdir()
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps({"num_layers": 1}))
    return adapter


def test_research_controlnet_on_the_base_pipeline(tmp_path, base):
    folder, pipe = base
    adapter = _research_adapter(tmp_path / "adapter", pipe.transformer)
    out = tmp_path / "control"
    assert (
        cli_main(["convert", "pixart-controlnet", str(tmp_path / "adapter"), str(out), "--pipeline", str(folder)]) == 0
    )
    loaded = DiffusionPipeline.from_pretrained(out)
    assert isinstance(loaded, ControlNetPipeline)
    for key, value in adapter.state_dict().items():
        assert torch.equal(loaded.controlnet.state_dict()[key], value), key


@pytest.mark.parametrize(
    "argv, message",
    [
        (["fit", "CKPT", "OUT"], "needs --config"),
        (["pixart", "CKPT", "OUT", "--config", "missing.yaml"], "no such file"),
        (["pixart", "CKPT", "FULL"], "not an empty folder"),
        (["pixart", "CKPT", "nowhere/OUT"], "does not exist"),
        (["pixart", "CKPT", "OUT", "--set", "sample_size=8"], "--set is for fit and microdit"),
        (["pixart", "CKPT", "OUT", "--transformer", "base"], "--transformer is for pixart-controlnet"),
        (["fit", "CKPT", "OUT", "--ema"], "--ema is for pixart and pixart-controlnet"),
        (["pixart-controlnet", "CKPT", "OUT"], "Not a PixArt-δ ControlNet checkpoint"),
    ],
)
def test_bad_arguments_are_one_line_and_write_nothing(tmp_path, base, capsys, argv, message):
    _, pipe = base
    checkpoint, _ = original_pixart(tmp_path, pipe)
    (tmp_path / "FULL").mkdir()
    (tmp_path / "FULL" / "keep.txt").write_text("mine")
    before = _files(tmp_path)
    argv = [str(tmp_path / a) if a in ("CKPT", "OUT", "FULL", "missing.yaml", "nowhere/OUT") else a for a in argv]
    argv = [str(checkpoint) if a == str(tmp_path / "CKPT") else a for a in argv]
    assert cli_main(["convert", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert _files(tmp_path) == before


def test_an_error_while_writing_leaves_no_folder(tmp_path, base, monkeypatch):
    _, pipe = base
    checkpoint, options = original_pixart(tmp_path, pipe)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(PixArtTransformer, "save_pretrained", fail)
    assert cli_main(["convert", "pixart", str(checkpoint), str(tmp_path / "out"), "--config", str(options)]) == 1
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


# ----- FiT and MicroDiT: the original code's fixture checkpoints (../shared/fixtures) ----------------------------
FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures"
needs_fixtures = pytest.mark.skipif(
    not (FIXTURES / "fit_original" / "cases.json").is_file()
    or not (FIXTURES / "microdit_original" / "cases.json").is_file(),
    reason="../shared/fixtures/{fit,microdit}_original (the original code's checkpoints) are not in this checkout",
)


def _fixture(family: str, case: str, state: str, tmp_path) -> tuple[Path, Path]:
    """The fixture's checkpoint and its constructor arguments as a YAML file."""
    cases = json.loads((FIXTURES / family / "cases.json").read_text())["cases"]
    options = tmp_path / f"{case}.yaml"
    options.write_text(yaml.safe_dump(cases[case]["constructor_kwargs"]))
    return FIXTURES / family / state, options


@needs_fixtures
def test_fit_to_a_class_pipeline_folder(tmp_path):
    """FiTv2 into a ClassToImagePipeline folder that diffusers loads: the VAE from the base, its own flow scheduler
    (the base's is DDPM), FiT's guidance of channels 0-2 recorded."""
    base = tmp_path / "base"
    class_pipeline(scheduler=DDPMScheduler(), num_classes=10).save_pretrained(base)
    checkpoint, options = _fixture("fit_original", "fitv2_base", "fitv2.state.safetensors", tmp_path)
    out = tmp_path / "fitv2"
    argv = ["convert", "fit", str(checkpoint), str(out), "--config", str(options), "--pipeline", str(base),
            "--set", "rope_extrapolation=vision_ntk"]  # fmt: skip
    assert cli_main(argv) == 0
    pipe = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe, ClassToImagePipeline) and isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.transformer.config.rope_extrapolation == "vision_ntk"
    assert pipe.sampling_defaults["guidance_channels"] == 3
    assert pipe.get_label_ids(["tabby cat", "goldfish"]) == [5, 1]  # the base folder's id2label
    expected = load_original_fit(checkpoint, options, rope_extrapolation="vision_ntk")
    assert all(torch.equal(pipe.transformer.state_dict()[k], v) for k, v in expected.state_dict().items())
    images = pipe([1, 2], height=20, width=12, num_inference_steps=2, output_type="pt").images
    assert images.shape == (2, 3, 20, 12) and torch.isfinite(images).all()


@needs_fixtures
def test_microdit_to_an_edm_text_pipeline_folder(tmp_path, base):
    """MicroDiT into a TextToImagePipeline folder: the base's text encoder and VAE, an EDM scheduler for its EDM
    prediction, the original's 30 steps at guidance 5 recorded."""
    folder, _ = base
    checkpoint, options = _fixture("microdit_original", "microdit_xl_like", "microdit_xl_like.state.safetensors",
                                   tmp_path)  # fmt: skip
    out = tmp_path / "microdit"
    assert cli_main(["convert", "microdit", str(checkpoint), str(out), "--config", str(options), "--pipeline",
                     str(folder)]) == 0  # fmt: skip
    pipe = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe, TextToImagePipeline) and isinstance(pipe.transformer, MicroDiTOriginalTransformer)
    assert isinstance(pipe.scheduler, EDMDPMSolverMultistepScheduler)
    assert pipe.sampling_defaults == {"num_inference_steps": 30, "guidance_scale": 5.0}
    image = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="pt").images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


@pytest.mark.skipif(
    not (FIXTURES / "pixart_controlnet_original" / "cases.json").is_file(),
    reason="../shared/fixtures/pixart_controlnet_original (the original code's checkpoints) is not in this checkout",
)
def test_original_controlnet_to_a_controlnet_pipeline_folder(tmp_path, base):
    """The original ControlPixArtMSHalf release (base + control blocks in one file) into a ControlNetPipeline folder
    completed by the base pipeline's text encoder and VAE; equal to load_original_pixart_controlnet's pair."""
    from dit.convert import load_original_pixart_controlnet

    folder, _ = base
    checkpoint = FIXTURES / "pixart_controlnet_original" / "alpha_ms_control.state.safetensors"
    options = tmp_path / "options.yaml"
    options.write_text("sample_size: 16\nattention_head_dim: 12\n")
    out = tmp_path / "control"
    argv = [
        "convert",
        "pixart-controlnet",
        str(checkpoint),
        str(out),
        "--config",
        str(options),
        "--pipeline",
        str(folder),
    ]
    assert cli_main(argv) == 0
    pipe = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe, ControlNetPipeline)
    transformer, adapter = load_original_pixart_controlnet(checkpoint, sample_size=16, attention_head_dim=12)
    for loaded, expected in ((pipe.transformer, transformer), (pipe.controlnet, adapter)):
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.state_dict().items())

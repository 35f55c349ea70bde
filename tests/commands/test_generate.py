"""`dit generate --class`: class-conditional folders draw class labels (names or ids, repeated or comma lists); a
class given to a text model, a prompt given to a class model and an unknown label are one error line before loading."""

import pytest
import torch
from PIL import Image

from dit.cli import main as cli_main
from tests.tiny import class_pipeline

PROMPT = "a large red circle on the left, on a white background"


@pytest.fixture(scope="module")
def class_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("class-model")
    class_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture
def text_model(tiny_pipeline_folder):
    return tiny_pipeline_folder


def _generate(model, out, *argv):
    return cli_main(["generate", "--model", str(model), "-o", str(out), "--steps", "1", *argv])


def test_classes_by_name_and_id_write_one_png_each(class_model, tmp_path, capsys):
    out = tmp_path / "out.png"
    argv = ["--class", "goldfish", "--class", "7, great white shark", "--height", "16", "--width", "24"]
    assert _generate(class_model, out, *argv) == 0
    written = sorted(p.name for p in tmp_path.glob("*.png"))
    assert written == ["out-0.png", "out-1.png", "out-2.png"]
    assert all(Image.open(tmp_path / name).size == (24, 16) for name in written)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].endswith("class 1 (goldfish, Carassius auratus)") and printed[1].endswith("class 7 (sports car)")
    assert _generate(class_model, tmp_path / "by_id.png", "--class", "1", "--height", "16", "--width", "24") == 0
    assert Image.open(tmp_path / "by_id.png").tobytes() == Image.open(tmp_path / "out-0.png").tobytes()


def test_images_per_class_and_guidance_channels(class_model, tmp_path):
    argv = ["--class", "1,2", "--num-images", "2", "--guidance-channels", "3", "--guidance", "4"]
    assert _generate(class_model, tmp_path / "o.png", *argv) == 0
    assert len(list(tmp_path.glob("o-*.png"))) == 4
    assert _generate(class_model, tmp_path / "all.png", "--class", "1", "--guidance", "4") == 0
    assert Image.open(tmp_path / "all.png").tobytes() != Image.open(tmp_path / "o-0.png").tobytes()


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    (line,) = err.strip().splitlines()
    assert line.startswith("error: "), line
    return line.removeprefix("error: ")


BAD_CLASS = {
    "unknown": (
        ["--class", "goldfsh"],
        "class label 'goldfsh' is not a label of this model (close matches: 'goldfish')",
    ),
    "shared": (["--class", "crane"], "'crane' names several classes: 3 (crane), 4 (crane, bird); pass the class id"),
    "id-high": (["--class", "10"], "class id 10 is outside 0..9"),
    "empty": (["--class", "goldfish,"], "--class 'goldfish,': an empty class"),
    "no-class": ([], "is a class-conditional model: give --class NAME"),
    "prompt": ([PROMPT, "--class", "1"], "takes --class only, no prompt or --prompt-file"),
    "negative": (["--class", "1", "--negative-prompt", "blurry"], "--negative-prompt: "),
    "lcm": (["--class", "1", "--lcm"], "--lcm: "),
    "channels": (["--class", "1", "--guidance-channels", "0"], "--guidance-channels: guidance_channels must be None"),
}


@pytest.mark.parametrize("argv, message", BAD_CLASS.values(), ids=BAD_CLASS.keys())
def test_bad_class_requests_are_one_line_before_loading(class_model, no_loading, tmp_path, capsys, argv, message):
    assert _generate(class_model, tmp_path / "o.png", *argv) == 2
    assert message in _error(capsys)
    assert not list(tmp_path.iterdir())


def test_a_class_for_a_text_model_is_refused_before_loading(text_model, no_loading, tmp_path, capsys):
    assert _generate(text_model, tmp_path / "o.png", "--class", "goldfish") == 2
    assert "--class goldfish: " in (line := _error(capsys)) and "text-to-image model" in line


def test_guidance_channels_reach_a_text_model(text_model, tmp_path):
    assert _generate(text_model, tmp_path / "o.png", PROMPT, "--guidance-channels", "3") == 0
    assert _generate(text_model, tmp_path / "all.png", PROMPT) == 0
    assert Image.open(tmp_path / "o.png").tobytes() != Image.open(tmp_path / "all.png").tobytes()


@pytest.mark.parametrize("model", ["text", "class"])
def test_low_memory_draws_with_the_preset(text_model, class_model, tmp_path, monkeypatch, model):
    pytest.importorskip("torchao", reason="the preset's 8-bit text encoder needs the [quantization] extra")
    from dit.pipelines.sampling import LatentSamplingMixin

    presets = []
    enable = LatentSamplingMixin.enable_low_memory
    monkeypatch.setattr(
        LatentSamplingMixin, "enable_low_memory", lambda self, c=True, **o: presets.append(c) or enable(self, c, **o)
    )
    folder, condition = (text_model, [PROMPT]) if model == "text" else (class_model, ["--class", "1"])
    assert _generate(folder, tmp_path / "o.png", *condition, "--low-memory") == 0
    assert presets and presets[-1].dtype is torch.bfloat16 and presets[-1].offload  # offload: on the CPU, a no-op
    assert _generate(folder, tmp_path / "h.png", *condition, "--low-memory", "--dtype", "fp16") == 0
    assert presets[-1].dtype is torch.float16


def test_low_memory_in_fp32_is_refused_before_loading(text_model, no_loading, tmp_path, capsys):
    assert _generate(text_model, tmp_path / "o.png", PROMPT, "--low-memory", "--dtype", "fp32") == 2
    assert "--low-memory runs the transformer in half precision" in _error(capsys)


@pytest.mark.parametrize("model", ["text", "class"])
def test_cuda_graphs_on_the_cpu_warn_once_and_still_draw(text_model, class_model, tmp_path, model):
    from diffusers.utils.testing_utils import CaptureLogger

    from dit.pipelines import cuda_graphs

    folder, condition = (text_model, [PROMPT]) if model == "text" else (class_model, ["--class", "1"])
    with CaptureLogger(cuda_graphs.logger) as captured:
        assert _generate(folder, tmp_path / "o.png", *condition, "--cuda-graphs", "--device", "cpu") == 0
    assert captured.out.count("CUDA graphs are enabled") == 1 and "need a CUDA device" in captured.out
    assert _generate(folder, tmp_path / "eager.png", *condition, "--device", "cpu") == 0
    assert Image.open(tmp_path / "o.png").tobytes() == Image.open(tmp_path / "eager.png").tobytes()


def test_attention_backend_is_set_before_drawing(text_model, tmp_path, monkeypatch):
    from dit.models.mixins import AttentionBackendMixin

    chosen = []
    set_backend = AttentionBackendMixin.set_attention_backend
    monkeypatch.setattr(
        AttentionBackendMixin, "set_attention_backend", lambda m, n: chosen.append(n) or set_backend(m, n)
    )
    assert _generate(text_model, tmp_path / "math.png", PROMPT, "--attention-backend", "math", "--device", "cpu") == 0
    assert chosen == ["math"]
    assert _generate(text_model, tmp_path / "sdpa.png", PROMPT, "--device", "cpu") == 0
    math, sdpa = (torch.tensor(list(Image.open(tmp_path / f"{n}.png").tobytes())) for n in ("math", "sdpa"))
    assert (math - sdpa).abs().max() <= 1  # fp32 either way: at most one level of rounding


def test_unknown_attention_backend_is_refused_before_loading(text_model, no_loading, tmp_path, capsys):
    assert _generate(text_model, tmp_path / "o.png", PROMPT, "--attention-backend", "flashy") == 2
    assert "--attention-backend: Unknown attention backend 'flashy'" in _error(capsys)

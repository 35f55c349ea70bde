"""`dit generate` and `dit eval`: bad values are one line on stderr and exit code 2 before the model loads; run folders;
several prompts and images; `--lcm` with a guidance that has no effect; eval's progress bar."""

import subprocess
import sys

import pytest
from diffusers import LCMScheduler
from PIL import Image

from dit import PixArtTransformer
from dit.cli import main as cli_main
from dit.pipelines import TextToImagePipeline, save_lcm
from dit.tiny import TINY_PIXART, tiny_pipeline

PROMPT = "a large red circle on the left, on a white background"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    tiny_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad value was refused")

    monkeypatch.setattr(TextToImagePipeline, "from_pretrained", refuse)


BAD_GENERATE = {
    "guidance-inf": (["--guidance", "inf"], "guidance_scale must be a finite number >= 0, got inf"),
    "guidance-nan": (["--guidance", "nan"], "guidance_scale must be a finite number >= 0, got nan"),
    "guidance-negative": (["--guidance", "-1"], "guidance_scale must be a finite number >= 0, got -1"),
    "steps-zero": (["--steps", "0"], "num_inference_steps must be an int >= 1, got 0"),
    "steps-negative": (["--steps", "-1"], "num_inference_steps must be an int >= 1, got -1"),
    "height-zero": (["--height", "0"], "height must be an int between 1 and 16384 pixels, got 0"),
    "height-huge": (["--height", "100000", "--width", "64"], "height must be an int between 1 and 16384 pixels"),
    "images-zero": (["--num-images", "0"], "num_images_per_prompt must be an int >= 1, got 0"),
}


@pytest.mark.parametrize("argv, message", BAD_GENERATE.values(), ids=BAD_GENERATE.keys())
def test_generate_refuses_bad_values_before_loading(model, no_loading, capsys, argv, message, tmp_path):
    assert cli_main(["generate", PROMPT, "--model", str(model), "-o", str(tmp_path / "out.png"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert not (tmp_path / "out.png").exists()


def test_generate_refuses_too_many_tokens_after_loading(model, capsys, tmp_path):
    argv = ["generate", PROMPT, "--model", str(model), "-o", str(tmp_path / "out.png")]
    assert cli_main([*argv, "--height", "16384", "--width", "16384"]) == 2
    err = capsys.readouterr().err  # after loading's progress bars: one error line
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "image tokens" in last and "smaller size" in last
    assert "Traceback" not in err and not (tmp_path / "out.png").exists()


def test_generate_exit_code_and_stderr_in_a_process(model, tmp_path):
    argv = [sys.executable, "-m", "dit.cli", "generate", PROMPT, "--model", str(model), "--steps", "0"]
    result = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: --steps: num_inference_steps must be an int >= 1, got 0")


def test_generate_on_a_training_run_folder(tmp_path, capsys):
    tiny_pipeline().save_pretrained(tmp_path / "run" / "pipeline")
    (tmp_path / "run" / "checkpoints").mkdir()
    out = tmp_path / "out.png"
    assert cli_main(["generate", PROMPT, "--model", str(tmp_path / "run"), "-o", str(out), "--steps", "1"]) == 0
    assert Image.open(out).size == (16, 16)
    captured = capsys.readouterr()
    assert "run/pipeline" in captured.err and f"saved {out}" in captured.out


def test_generate_on_a_folder_without_a_pipeline_says_what_it_expected(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert cli_main(["generate", PROMPT, "--model", str(tmp_path / "run"), "-o", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert "model_index.json" in err and "pipeline/" in err and str(tmp_path / "run") in err


def test_several_prompts_and_images_write_one_png_each(model, tmp_path, capsys):
    out = tmp_path / "out.png"
    argv = ["generate", PROMPT, "a small blue square", "--model", str(model), "-o", str(out), "--steps", "1"]
    assert cli_main([*argv, "--num-images", "2"]) == 0
    written = sorted(p.name for p in tmp_path.glob("*.png"))
    assert written == ["out-0.png", "out-1.png", "out-2.png", "out-3.png"]
    printed = capsys.readouterr().out
    assert all(str(tmp_path / name) in printed for name in written)
    first, second = Image.open(tmp_path / "out-0.png"), Image.open(tmp_path / "out-1.png")
    assert first.size == (16, 16) and first.tobytes() != second.tobytes()


def test_one_image_keeps_the_output_name(model, tmp_path):
    out = tmp_path / "out.png"
    assert cli_main(["generate", PROMPT, "--model", str(model), "-o", str(out), "--steps", "1"]) == 0
    assert [p.name for p in tmp_path.glob("*.png")] == ["out.png"]


def test_lcm_guidance_on_a_baked_in_student_is_refused(model, tmp_path, capsys):
    student = PixArtTransformer(**TINY_PIXART).eval()
    lcm = save_lcm(tmp_path / "lcm", student, LCMScheduler(), num_inference_steps=2, guidance_scale=1.0)
    argv = ["generate", PROMPT, "--model", str(model), "--lcm-folder", str(lcm), "-o", str(tmp_path / "o.png")]
    assert cli_main([*argv, "--guidance", "4"]) == 2
    err = capsys.readouterr().err
    assert "--guidance 4" in err and "baked in" in err and "no CFG" in err
    assert cli_main([*argv, "--guidance", "1"]) == 0  # its own value is fine


def _eval(model, *extra):
    return ["eval", "microshapes", "--model", str(model), "--n", "2", "--steps", "1", "--size", "16x16", *extra]


def test_eval_shows_a_progress_bar_over_prompts(model, capsys):
    assert cli_main(_eval(model)) == 0
    err = capsys.readouterr().err
    assert "prompts" in err and "4/4" in err


def test_eval_progress_bar_can_be_turned_off(model, capsys):
    assert cli_main(_eval(model, "--no-progress")) == 0
    assert "prompts" not in capsys.readouterr().err


def test_eval_refuses_zero_steps(model, no_loading, capsys):
    assert cli_main(["eval", "microshapes", "--model", str(model), "--steps", "0"]) == 2
    assert "num_inference_steps must be an int >= 1, got 0" in capsys.readouterr().err

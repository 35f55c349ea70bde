"""`dit generate` and `dit eval`: bad values are one line on stderr and exit code 2 before the model loads; run folders;
several prompts and images; `--lcm` with a guidance that has no effect; eval's progress bar."""

import io
import os
import subprocess
import sys
import warnings

import pytest
import torch
from diffusers import LCMScheduler
from PIL import Image

from dit import PixArtTransformer
from dit.cli import main as cli_main
from dit.cli_checks import read_prompts
from dit.errors import UsageError, removed_if_left_empty
from dit.pipelines import TextToImagePipeline, save_lcm
from dit.tiny import TINY_PIXART, tiny_pipeline
from tests.tiny import TINY, make_features, tiny_encoders

PROMPT = "a large red circle on the left, on a white background"


@pytest.fixture
def model(tiny_pipeline_folder):
    return tiny_pipeline_folder


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


# ----- one-line errors, --debug, --version, --prompt-file, a light parser (dit/errors.py, dit/cli_checks.py)

OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _dit(*argv: str, cwd, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "dit.cli", *argv]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, input=stdin, env=env or OFFLINE)


def _one_error_line(err: str) -> str:
    """The single stderr line of a failed command (no traceback), without its ``error: `` prefix."""
    assert "Traceback" not in err, err
    (line,) = err.strip().splitlines()
    assert line.startswith("error: "), line
    return line.removeprefix("error: ")


def test_building_the_parser_imports_neither_torch_nor_diffusers():
    code = "import dit.cli, sys; dit.cli.build_parser(); print(sorted(m for m in ('torch', 'diffusers', "
    code += "'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=OFFLINE)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr


HELP_IMPORTS = """
import sys
from dit.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exit_:
    assert exit_.code == 0, exit_.code
print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))
"""


COMMAND_NAMES = ["generate", "eval", "train", "extract", "convert", "controlnet-relevance"]


@pytest.mark.parametrize("command", [["--help"], *([name, "--help"] for name in COMMAND_NAMES)], ids=" ".join)
def test_help_imports_neither_torch_nor_diffusers(command):
    """Every command's help answers without the heavy imports (before: ``dit train --help`` and ``dit extract
    --help`` imported torch and diffusers)."""
    result = subprocess.run([sys.executable, "-c", HELP_IMPORTS, *command], capture_output=True, text=True,
                            env=OFFLINE)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "usage: dit" in result.stdout and result.stdout.strip().endswith("[]"), result.stdout[-500:]


def test_every_command_follows_the_one_convention():
    """Each command is a module of dit.cli.COMMANDS whose add_parser registers it with func=run and user_errors."""
    import argparse

    from dit.cli import COMMANDS

    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command")
    for module in COMMANDS:
        module.add_parser(commands)
    assert sorted(commands.choices) == sorted(COMMAND_NAMES)
    for module, (name, sub) in zip(COMMANDS, commands.choices.items()):
        assert sub.get_default("func") is module.run, name
        errors = sub.get_default("user_errors")()
        assert errors and all(issubclass(kind, BaseException) and code in (1, 2) for kind, code in errors.items())


@pytest.mark.parametrize("module", ["dit.train", "dit.train.extract"])
def test_the_training_commands_run_on_their_own_too(module, tmp_path):
    """``python -m dit.train`` and ``python -m dit.train.extract``: the same arguments, one-line errors."""
    result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, env=OFFLINE)
    assert result.returncode == 0 and result.stdout.startswith(f"usage: dit {module.rsplit('.', 1)[-1]}")
    bad = ["--config", "missing.yaml"] if module == "dit.train" else ["photos", "--pipeline", "p", "--out", "o"]
    result = subprocess.run([sys.executable, "-m", module, *bad], cwd=tmp_path, capture_output=True, text=True,
                            env=OFFLINE)  # fmt: skip
    assert result.returncode == 2 and _one_error_line(result.stderr)


def test_train_overrides_keep_their_place_among_the_options(tmp_path, capsys):
    """``dit train``'s key=value overrides are positional arguments of its subcommand: before or after --config."""
    for argv in (["train", "--config", "missing.yaml", "max_steps=1"], ["train", "max_steps=1", "--config", "m.yaml"]):
        assert cli_main(argv) == 2
        assert "no such file" in _one_error_line(capsys.readouterr().err)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == "dit-toolkit 0.1.0"


BAD_SETUP = {
    "output-folder-missing": (["-o", "missing_folder/out.png"], "-o missing_folder/out.png: the folder"),
    "output-is-a-folder": (["-o", "."], "-o .: is a folder"),
    "output-not-an-image": (["-o", "out.txt"], ".txt is not an image format"),
    "device-unknown": (["--device", "gpu"], "--device gpu: not a device"),
    "prompt-file-missing": (["--prompt-file", "nothing.txt"], "--prompt-file nothing.txt: cannot read"),
    "at-file-missing": (["@nothing.txt"], "prompt '@nothing.txt': cannot read the prompt file"),
}


@pytest.mark.parametrize("argv, message", BAD_SETUP.values(), ids=BAD_SETUP.keys())
def test_generate_refuses_bad_setup_before_loading(no_loading, capsys, monkeypatch, tmp_path, argv, message):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["generate", PROMPT, *argv]) == 2
    assert message in _one_error_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_generate_refuses_cuda_without_cuda(no_loading, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli_main(["generate", PROMPT, "--device", "cuda", "-o", str(tmp_path / "o.png")]) == 2
    assert "--device cuda: cuda is not available" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("content", ["", "\n  \n"], ids=["empty", "blank-lines"])
def test_generate_refuses_a_prompt_file_without_prompts(no_loading, capsys, tmp_path, content):
    (tmp_path / "prompts.txt").write_text(content)
    assert cli_main(["generate", "--prompt-file", str(tmp_path / "prompts.txt")]) == 2
    assert "has no prompts" in _one_error_line(capsys.readouterr().err)


def test_generate_needs_a_prompt(no_loading, capsys):
    assert cli_main(["generate"]) == 2
    assert "--prompt-file" in _one_error_line(capsys.readouterr().err)


def test_read_prompts_from_arguments_files_and_stdin(tmp_path, monkeypatch):
    (tmp_path / "p.txt").write_text("a red circle\n\n  a blue square \n")
    monkeypatch.setattr(sys, "stdin", io.StringIO("a green triangle\n"))
    assert read_prompts(["first", f"@{tmp_path / 'p.txt'}"], "-") == [
        "first", "a red circle", "a blue square", "a green triangle"
    ]  # fmt: skip


@pytest.mark.parametrize("where", ["KeyboardInterrupt", "bug"])
def test_interrupt_and_bug_after_setup(model, tmp_path, monkeypatch, capsys, where):
    def stop(*args, **kwargs):
        raise KeyboardInterrupt if where == "KeyboardInterrupt" else RuntimeError("a bug")

    monkeypatch.setattr(TextToImagePipeline, "from_pretrained", stop)
    code = cli_main(["generate", PROMPT, "--model", str(model), "-o", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    if where == "KeyboardInterrupt":  # one line, the shell's code for SIGINT
        assert code == 130 and err == "interrupted\n"
    else:  # a bug keeps its traceback
        assert code == 1 and "Traceback" in err and "RuntimeError: a bug" in err


def test_debug_shows_the_traceback(no_loading, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("DIT_DEBUG", "0")  # recorded as unset: teardown removes what --debug sets below
    with pytest.raises(UsageError, match="does not exist"):
        cli_main(["generate", PROMPT, "--debug", "-o", str(tmp_path / "missing" / "o.png")])
    assert os.environ["DIT_DEBUG"] == "1"  # --debug sets it for the processes it starts
    monkeypatch.setenv("DIT_DEBUG", "0")
    with pytest.raises(UsageError):
        cli_main(["--debug", "generate", PROMPT, "-o", str(tmp_path / "missing" / "o.png")])


@pytest.fixture(scope="module")
def shipped_generate(tmp_path_factory):
    """One real ``dit generate`` of the shipped model in a process: two prompts from ``--prompt-file -``."""
    folder = tmp_path_factory.mktemp("generate")
    return folder, _dit("generate", "--prompt-file", "-", "--steps", "2", "-o", "o.png", cwd=folder,
                        stdin="a red circle\n\na blue square\n")  # fmt: skip


def test_shipped_generate_draws_the_prompt_file(shipped_generate):
    folder, result = shipped_generate
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in folder.iterdir()) == ["o-0.png", "o-1.png"]
    assert "a red circle" in result.stdout and "a blue square" in result.stdout


@pytest.mark.parametrize("noise", ["requires torchvision", "torch_dtype", "FutureWarning", "Beautiful"])
def test_shipped_generate_stderr_has_no_warnings(shipped_generate, noise):
    assert noise not in shipped_generate[1].stderr


def test_eval_does_not_warn_about_caption_cleaning(model, tmp_path):
    result = _dit(*_eval(model, "--no-progress"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Beautiful" not in result.stderr and "beautifulsoup" not in result.stderr


def test_train_broken_yaml_is_one_line_with_its_position(tmp_path):
    (tmp_path / "bad.yaml").write_text("max_steps: 3\noptim:\n  lr: [1e-4\n  betas: 2\n")
    result = _dit("train", "--config", "bad.yaml", "output_dir=run", cwd=tmp_path)
    assert result.returncode == 2
    assert _one_error_line(result.stderr).startswith("bad.yaml:4:8: not valid YAML")
    assert not (tmp_path / "run").exists()
    debug = _dit("train", "--config", "bad.yaml", "--debug", cwd=tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


@pytest.mark.parametrize("pretrained", ["/no/such/folder", "nobody/no-such-model"], ids=["path", "hub-id"])
def test_train_missing_pretrained_is_one_line_and_leaves_no_folder(tmp_path, capsys, monkeypatch, pretrained):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    features, out = make_features(tmp_path / "features"), tmp_path / "run"
    argv = ["train", "--config", str(TINY), f"data.path={features}", f"output_dir={out}"]
    assert cli_main([*argv, f"model.pretrained={pretrained}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: model.pretrained={pretrained}: no such folder, and not a hub id that is cached")
    assert not out.exists()
    out.mkdir()  # a folder that was there stays
    assert cli_main([*argv, f"model.pretrained={pretrained}"]) == 2 and out.is_dir()


def test_train_on_missing_features_is_one_line_before_any_validation_notice(tmp_path, capsys):
    """The shipped config validates on the data's own captions: with no data, the missing data is the one thing said
    (before: a notice that validation_prompts.json is missing came first)."""
    config = TINY.parent / "microshapes.yaml"
    argv = ["train", "--config", str(config), f"data.path={tmp_path / 'nothing'}", f"output_dir={tmp_path / 'run'}"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli_main(argv) == 1
    assert [str(w.message) for w in caught] == []
    assert _one_error_line(capsys.readouterr().err).startswith("No feature shards (*.safetensors) in")
    assert not (tmp_path / "run").exists()


def test_extract_checks_its_data_before_writing(tmp_path, capsys):
    (tmp_path / "photos").mkdir()  # no metadata.jsonl
    argv = ["extract", str(tmp_path / "photos"), "--pipeline", str(tiny_encoders()), "--out", str(tmp_path / "f")]
    assert cli_main(argv) == 2
    assert "metadata.jsonl" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "f").exists()


def test_removed_if_left_empty_keeps_what_was_there_or_written(tmp_path):
    for name, existed, write in [("new", False, False), ("old", True, False), ("written", False, True)]:
        folder = tmp_path / name
        if existed:
            folder.mkdir()
        with pytest.raises(RuntimeError), removed_if_left_empty(folder):
            (folder / "sub").mkdir(parents=True)
            if write:
                (folder / "sub" / "file").write_text("x")
            raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "written"]
    with pytest.raises(RuntimeError), removed_if_left_empty(tmp_path / "runs" / "mine"):  # parents made for it too
        (tmp_path / "runs" / "mine").mkdir(parents=True)
        raise RuntimeError
    assert not (tmp_path / "runs").exists()

"""The README's first command installs the toolkit and generates with the shipped model; its second runs the tests.

The install part is what `.ci/run` does in a fresh environment; here the `dit generate` part runs as written."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"


def _commands() -> list[list[str]]:
    """The README's bash blocks, as their non-comment lines."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    return [
        [line.strip() for line in b.splitlines() if line.strip() and not line.strip().startswith("#")] for b in blocks
    ]


def test_first_command_installs_and_generates_the_default_image(tmp_path):
    *install, generate = _commands()[0]
    assert any("pip install -e" in line for line in install)
    assert generate == 'dit generate "a large red circle on the left, on a white background" -o out.png'
    args = shlex.split(generate)[1:]
    subprocess.run([sys.executable, "-m", "dit.cli", *args], cwd=tmp_path, check=True, capture_output=True)
    assert Image.open(tmp_path / "out.png").size == (64, 64)


def test_second_command_runs_the_tests():
    assert any("python -m pytest" in line for line in _commands()[1])


def _section_commands(heading: str) -> list[str]:
    """The non-comment lines of the first bash block under the README heading ``heading``."""
    text = README.read_text()
    section = text[text.index(f"\n{heading}\n") :]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_train_on_your_own_images_runs_as_written(tmp_path):
    """The "Train on your own images" commands, as written, on eight rendered images: extract with the shipped
    model's encoders, fine-tune its transformer (2 steps here instead of 500), generate with the run folder."""
    import json
    import random

    from dit.microshapes.world import caption, random_scene, render

    images = tmp_path / "my_images"
    images.mkdir()
    rng, rows = random.Random(0), []
    for i in range(8):
        scene = random_scene(rng)
        Image.fromarray(render(scene)).save(images / f"{i:04d}.png")
        rows.append({"file_name": f"{i:04d}.png", "text": caption(scene)})
    (images / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    commands = _section_commands("## Train on your own images")
    assert [c.split()[0] for c in commands] == ["BASE=$(python", "CONFIG=$(python", "dit", "dit", "dit"]
    short = {"max_steps=500": "max_steps=2 checkpoint_every=2 data.batch_size=4 report_to=none"}
    script = "\n".join(["set -euo pipefail", *(_shorten(c, short) for c in commands)])
    bin_dir = Path(sys.executable).parent  # python and dit of this environment
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "runs/mine/pipeline/model_index.json").is_file()
    assert Image.open(tmp_path / "mine.png").size == (64, 64)


def _shorten(command: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        command = command.replace(old, new)
    return command

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

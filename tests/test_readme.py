"""Every ```python and ```bash block of README.md runs, offline, against the shipped model.

A block runs as written, in a fresh temporary working directory (python: one subprocess per block; bash: one
``set -euo pipefail`` script), unless HTML comment lines right above it say otherwise, one directive a line:

    <!-- readme-test: replace OLD => NEW -->       text substitution before running ({shipped}: the shipped model's
                                                   folder, {lcm}: the shipped LCM folder, {repo}: the checkout)
    <!-- readme-test: fixture NAME -->             prepare the working directory with FIXTURES[NAME] first
    <!-- readme-test: skip-line PREFIX (REASON) --> leave out the bash commands starting with PREFIX
    <!-- readme-test: skip (REASON) -->            do not run the block at all (needs a GPU, the hub, hours)

A block without a directive must run as written; a skip without a reason, or an unknown directive, fails.
"""

import json
import random
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(r"((?:<!-- readme-test: .*? -->\n)*)```(python|bash)\n(.*?)```", re.S)
DIRECTIVE = re.compile(r"<!-- readme-test: (\S+)\s*(.*?) -->")


@dataclass
class Block:
    line: int
    lang: str
    code: str
    replace: list[tuple[str, str]] = field(default_factory=list)
    fixtures: list[str] = field(default_factory=list)
    skip_lines: list[str] = field(default_factory=list)
    skip: str | None = None


def _blocks() -> list[Block]:
    text, blocks = README.read_text(), []
    for match in BLOCK.finditer(text):
        line = text.count("\n", 0, match.start(2)) + 1
        block = Block(line, match.group(2), match.group(3))
        for name, arg in DIRECTIVE.findall(match.group(1)):
            if name == "replace":
                old, _, new = arg.partition(" => ")
                block.replace.append((old, new))
            elif name == "fixture":
                block.fixtures.append(arg)
            elif name == "skip-line":
                block.skip_lines.append(_with_reason(arg, line).split(" (")[0])
            elif name == "skip":
                block.skip = _with_reason(arg, line)
            else:
                raise AssertionError(f"README.md:{line}: unknown readme-test directive {name!r}")
        blocks.append(block)
    return blocks


def _with_reason(arg: str, line: int) -> str:
    assert re.search(r"\(.+\)$", arg), f"README.md:{line}: a readme-test skip needs a (reason): {arg!r}"
    return arg


def _substituted(block: Block) -> str:
    from dit.cli import default_lcm, default_model

    values = {"{shipped}": str(default_model()), "{lcm}": str(default_lcm()), "{repo}": str(ROOT)}
    code = block.code
    for old, new in block.replace:
        assert old in code, f"README.md:{block.line}: nothing to replace: {old!r}"
        for token, value in values.items():
            new = new.replace(token, value)
        code = code.replace(old, new)
    return code


def _bash_script(block: Block, code: str) -> str:
    commands = [c.strip() for c in re.sub(r"\\\n\s*", " ", code).splitlines()]
    kept = [c for c in commands if c and not c.startswith("#") and not any(c.startswith(p) for p in block.skip_lines)]
    return "\n".join(["set -euo pipefail", *kept])


# ----- fixtures: what a block's prose says the reader already has ------------------------------------------------
def _my_images(cwd: Path) -> None:
    """Eight captioned MicroShapes images in my_images/ (file_name, text in metadata.jsonl)."""
    from PIL import Image

    from dit.microshapes.world import caption, random_scene, render

    images = cwd / "my_images"
    images.mkdir()
    rng, rows = random.Random(0), []
    for i in range(8):
        scene = random_scene(rng)
        Image.fromarray(render(scene)).save(images / f"{i:04d}.png")
        rows.append({"file_name": f"{i:04d}.png", "text": caption(scene)})
    (images / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def _repo_files(cwd: Path) -> None:
    """The checkout's configs/ and bench/, as commands run from the repository root see them."""
    for name in ("configs", "bench"):
        (cwd / name).symlink_to(ROOT / name)


def _style_lora(cwd: Path) -> None:
    """style_lora/: a LoRA of the shipped transformer, as a run with ``model.lora_rank`` writes one."""
    import torch
    from peft import LoraConfig

    from dit import PixArtTransformer
    from dit.cli import default_model

    model = PixArtTransformer.from_pretrained(default_model(), subfolder="transformer")
    model.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.mul_(0.01)
    model.save_lora_adapter(cwd / "style_lora")


def _microshapes_features(cwd: Path) -> None:
    """runs/microshapes/features: the recipe's feature shards, here extracted from eight images."""
    from dit.cli import default_model

    _my_images(cwd)
    cmd = [sys.executable, "-m", "dit.cli", "extract", "my_images", "--source", "imagefolder", "--pipeline",
           str(default_model()), "--out", "runs/microshapes/features", "--resolution", "64"]  # fmt: skip
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, timeout=300)


def _original_checkpoints(cwd: Path) -> None:
    """Tiny stand-ins under the published names: FiTv2_XL/model_ema.safetensors with its whlzy/FiT YAML
    config_fitv2_xl.yaml, MicroDiT's dit_4_channel_37M_real_and_synthetic_data.pt (a pickled plain state dict) with
    microdit_tiny.yaml, and two base pipeline folders: DiT-XL-2-256 (VAE, scheduler, ImageNet-style id2label) and
    microdit-base (tokenizer, CLIP text encoder, VAE)."""
    import torch
    import yaml
    from diffusers import DDIMScheduler
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from dit.models.presets import build_preset
    from dit.pipelines import TextToImagePipeline
    from dit.tiny import WORDS, tiny_tokenizer, tiny_vae
    from tests.tiny import (
        FIT_V2,
        class_pipeline,
        fit_original_state,
        microdit_original_config,
        microdit_original_state,
        randomize_,
    )

    (cwd / "FiTv2_XL").mkdir()
    save_file(fit_original_state(FIT_V2), cwd / "FiTv2_XL" / "model_ema.safetensors")
    (cwd / "config_fitv2_xl.yaml").write_text(yaml.safe_dump({"diffusion": {"network_config": {"params": FIT_V2}}}))
    labels = {0: "tench", 1: "goldfish", 2: "golden retriever", 3: "tabby cat", 4: "pizza"}
    class_pipeline(scheduler=DDIMScheduler(), id2label=labels).save_pretrained(cwd / "DiT-XL-2-256")
    torch.manual_seed(0)
    microdit = randomize_(build_preset("tiny-microdit-original"), std=0.1)
    torch.save(microdit_original_state(microdit), cwd / "dit_4_channel_37M_real_and_synthetic_data.pt")
    (cwd / "microdit_tiny.yaml").write_text(yaml.safe_dump(microdit_original_config(microdit)))
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(WORDS) + 3, hidden_size=32, intermediate_size=37,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77))  # fmt: skip
    base = TextToImagePipeline(tokenizer=tiny_tokenizer(), text_encoder=clip, vae=tiny_vae(), transformer=microdit,
                               scheduler=DDIMScheduler())  # fmt: skip
    base.save_pretrained(cwd / "microdit-base")


FIXTURES = {
    "original_checkpoints": _original_checkpoints,
    "my_images": _my_images,
    "repo_files": _repo_files,
    "style_lora": _style_lora,
    "microshapes_features": _microshapes_features,
}


BLOCKS = _blocks()


def test_every_skip_is_rare_and_explained():
    skipped = [b for b in BLOCKS if b.skip]
    assert len(skipped) <= len(BLOCKS) // 3, [(b.line, b.skip) for b in skipped]


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"L{b.line}-{b.lang}")
def test_readme_block_runs(block, tmp_path):
    if block.skip:
        pytest.skip(block.skip)
    for name in block.fixtures:
        FIXTURES[name](tmp_path)
    code = _substituted(block)
    bin_dir = Path(sys.executable).parent  # python and dit of this environment
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", "HOME": str(tmp_path)}
    if block.lang == "python":
        (tmp_path / "block.py").write_text(code)
        cmd = [sys.executable, "block.py"]
    else:
        cmd = ["bash", "-c", _bash_script(block, code)]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"README.md:{block.line}\n{code}\n{result.stderr[-3000:]}"

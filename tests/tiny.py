"""Tiny configs and helpers for tests (the tiny T5, tokenizer and VAE live in :mod:`dit.tiny`)."""

from __future__ import annotations

import atexit
import functools
import importlib.util
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from diffusers import PixArtTransformer2DModel
from PIL import Image
from safetensors.torch import save_file

from dit import FiTTransformer, LiTTransformer, MicroDiTOriginalTransformer, MicroDiTTransformer, PixArtTransformer
from dit.convert.fit_original import ORIGINAL_DEFAULTS
from dit.models.presets import preset, preset_config
from dit.models.registry import backbone_class
from dit.pipelines import ClassToImagePipeline, TextToImagePipeline
from dit.tiny import tiny_t5, tiny_tokenizer, tiny_vae  # noqa: F401  (re-exported for the tests)
from dit.train.objectives.losses import Objective

#: Where the Triton kernels' tests run: CUDA when there is one, else the CPU through ``TRITON_INTERPRET=1``
#: (tests/conftest.py sets it before triton is imported).
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="triton is not installed (pip install triton; on CPU its interpreter runs the kernels)",
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"  # the tiny PixArt training config

# The tiny size presets (dit.models.presets) under the names the tests use.
# α-1024-MS style: micro-conditions on (sample_size 128 would switch them on by default; set explicitly there)
ALPHA = preset_config("tiny-pixart-alpha")
# Σ style: no micro-conditions, 300-token text in the real model
SIGMA = preset_config("tiny-pixart")
CONFIGS = {"alpha": ALPHA, "sigma": SIGMA}
# FiT: 4x4-patch training grid (sample_size 8, patch 2), up to 48 tokens per image (e.g. a 12x16 latent)
FIT = preset_config("tiny-fit")
# FiT class-conditional as on ImageNet (no text): 10 classes plus the null class (id 10)
FIT_CLASS = preset_config("tiny-fit", caption_channels=None, num_classes=10)
#: id2label of FIT_CLASS: synonyms, capitals, and one name two classes share ("crane": 3 and 4), as in ImageNet
CLASS_NAMES = {
    0: "tench, Tinca tinca", 1: "goldfish, Carassius auratus", 2: "great white shark", 3: "crane", 4: "crane, bird",
    5: "tabby cat", 6: "German shepherd", 7: "sports car", 8: "school bus", 9: "oak tree",
}  # fmt: skip


def class_pipeline(scheduler=None, seed: int = 0, id2label=CLASS_NAMES, **overrides) -> ClassToImagePipeline:
    """A tiny class-conditional FiT pipeline (VAE factor 2, patch 2: sizes in multiples of 4 px), random weights;
    ``scheduler=None``: the transformer's own (flow matching unless ``prediction_type`` says otherwise)."""
    torch.manual_seed(seed)
    transformer = randomize_(FiTTransformer(**{**FIT_CLASS, **overrides}), std=0.05).eval()
    pipe = ClassToImagePipeline(transformer=transformer, vae=tiny_vae(), scheduler=scheduler, id2label=id2label)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def randomize_(model: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Give every parameter non-trivial random values (default inits zero some paths)."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def diffusers_and_ours(config: dict, seed: int = 0) -> tuple[PixArtTransformer2DModel, PixArtTransformer]:
    """diffusers' PixArtTransformer2DModel with random weights and ours with the very same weights."""
    torch.manual_seed(seed)
    reference = randomize_(PixArtTransformer2DModel(**config)).eval()
    ours = PixArtTransformer(**config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def added_cond(batch: int, height: int = 64, width: int = 64) -> dict[str, torch.Tensor]:
    return {
        "resolution": torch.tensor([[float(height), float(width)]]).repeat(batch, 1),
        "aspect_ratio": torch.tensor([[height / width]]).repeat(batch, 1),
    }


def assert_fp32_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-5) -> None:
    """Parity in fp32: ``max |actual - expected| <= tolerance * max(1, max |expected|)``.

    The tolerance is scaled by the output's magnitude because rounding differences grow with the largest values
    through a network: our modulation and gated residuals are fused multiply-adds (``addcmul``, one rounding)
    where diffusers multiplies and adds (two), which on AVX-512 CPUs moves outputs of magnitude ~10 by ~1.3e-5
    (measured: 0.9-1.9e-6 with diffusers' order of operations, up to 1.26e-5 with ours). A wrong formula misses
    by orders of magnitude more.
    """
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(1.0, expected.abs().max().item())
    difference = (actual - expected).abs().max().item()
    assert difference <= tolerance * scale, f"max |diff| {difference:.3g} > {tolerance:g} x {scale:.3g}"


def tiny_backbone(name: str, **overrides) -> tuple[type, dict]:
    """Size preset ``name``'s class and config (a fresh copy, ``overrides`` applied)."""
    return backbone_class(preset(name).cls), preset_config(name, **overrides)


#: One tiny config of every backbone class, by name: (class, config).
BACKBONES = {name: tiny_backbone(f"tiny-{name}") for name in ("pixart", "lit", "microdit", "fit", "microdit-original")}


# ----- one forward of every backbone variant, for compile, sync and placement checks ------------------------------
FORWARD_VARIANTS = ["alpha-mask", "sigma-mask", "sigma-kv", "lit", "fit-mixed", "microdit-masked"]


def variant_model(name: str, head_dim: int | None = None) -> torch.nn.Module:
    """A tiny model of backbone variant ``name`` (see :data:`FORWARD_VARIANTS`), fp32, on the CPU; ``head_dim``
    overrides the attention head width (and the text width that follows it)."""
    torch.manual_seed(0)

    def config(base: dict) -> dict:
        if head_dim is None:
            return dict(base)
        width = (
            {"cross_attention_dim": base["num_attention_heads"] * head_dim} if "cross_attention_dim" in base else {}
        )
        return {**base, "attention_head_dim": head_dim, **width}

    if name == "alpha-mask":
        return PixArtTransformer(**config(ALPHA)).eval()
    if name == "sigma-mask":
        return PixArtTransformer(**config(SIGMA)).eval()
    if name == "sigma-kv":
        return PixArtTransformer(**config(SIGMA), kv_compress_ratio=2, kv_compress_layers=[0, 1]).eval()
    if name == "lit":
        return LiTTransformer(**config(SIGMA)).eval()
    if name == "fit-mixed":
        return FiTTransformer(**config(FIT), **({"adaln_lora_dim": 16} if head_dim else {})).eval()
    if name == "microdit-masked":
        return MicroDiTTransformer(**config(preset_config("tiny-microdit"))).train()
    raise KeyError(name)


def variant_inputs(name: str, device: torch.device | str = "cpu", text_length: int = 12, real: int = 7) -> dict:
    """Keyword inputs of one forward of ``name``: batch 2, a non-square 8x12 latent, text of ``text_length`` tokens
    of which ``real`` (and 3) are kept. Per-sample image sizes stay host data (a CPU tensor), as the trainer has them."""
    from dit.nn.masking import keep_indices_from_scores, kept_count

    gen = torch.Generator().manual_seed(1)
    mask = torch.zeros(2, text_length, dtype=torch.long)
    mask[0, :3], mask[1, :real] = 1, 1
    inputs = {
        "hidden_states": torch.randn(2, 4, 8, 12, generator=gen),
        "encoder_hidden_states": torch.randn(2, text_length, 32, generator=gen),
        "timestep": torch.tensor([10.0, 500.0]),
        "encoder_attention_mask": mask,
    }
    if name == "alpha-mask":
        inputs["added_cond_kwargs"] = added_cond(2, 64, 96)
    if name == "microdit-masked":
        inputs["keep_indices"] = keep_indices_from_scores(torch.rand(2, 24, generator=gen), kept_count(24, 0.5))
    inputs = _to_device(inputs, device)
    if name == "fit-mixed":
        inputs["image_sizes"] = torch.tensor([[8, 4], [4, 12]])
    return inputs


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


# ----- training, extraction and conversion helpers shared by several test modules -------------------------
def make_features(
    folder: Path, n: int = 12, sizes=((8, 8), (6, 10)), text_len: int = 6, width: int = 32, record: bool = True
) -> Path:
    """Random feature shards, one per latent size, plus the empty caption's features; with ``record``, an
    ``extract_config.json`` naming :func:`tiny_encoders` as the pipeline they were extracted with (as ``dit extract``
    writes it), so that a run on them ends with a complete pipeline folder."""
    folder.mkdir(parents=True, exist_ok=True)
    if record:
        (folder / "extract_config.json").write_text(json.dumps({"pipeline": str(tiny_encoders())}))
    gen = torch.Generator().manual_seed(123)
    for i, (h, w) in enumerate(sizes):
        mask = torch.zeros(n, text_len, dtype=torch.long)
        for j in range(n):
            mask[j, : 1 + j % text_len] = 1
        save_file(
            {
                "latent_mean": torch.randn(n, 4, h, w, generator=gen),
                "latent_std": torch.rand(n, 4, h, w, generator=gen) * 0.1,
                "text_embeds": torch.randn(n, text_len, width, generator=gen),
                "text_mask": mask,
            },
            folder / f"shard-{i:03d}.safetensors",
        )
    empty = torch.zeros(text_len, dtype=torch.long)
    empty[0] = 1
    save_file(
        {"text_embeds": torch.randn(text_len, width, generator=gen), "text_mask": empty},
        folder / "null_caption.safetensors",
    )
    return folder


@functools.cache
def tiny_encoders() -> Path:
    """A folder with ``dit.tiny``'s tokenizer, T5 (32 wide) and VAE (4 latent channels), written once per test
    process (removed at exit): the encoders :func:`make_features` records."""
    folder = Path(tempfile.mkdtemp(prefix="tiny-encoders-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    for name, part in (("tokenizer", tiny_tokenizer()), ("text_encoder", tiny_t5()), ("vae", tiny_vae())):
        part.save_pretrained(folder / name)
    return folder


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def free_port() -> int:
    """A TCP port free on this machine now, for ``accelerate launch --main_process_port``: fixed ports collide when
    two launches run at once (tests spread over ``pytest -n`` workers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two_processes(overrides: list[str], out: Path) -> list[float]:
    """``accelerate launch`` of ``dit.train`` with two CPU processes over gloo (accelerate's ``--cpu`` launcher needs
    MPI for several processes, so the torch.distributed launcher runs with accelerate's CPU mode), per-process batch
    2; returns the run's logged losses."""
    port = free_port()
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(port), "-m", "dit.train", "--config", str(TINY),
           *overrides, "data.batch_size=2", f"output_dir={out}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return _losses(out)


MICRODIT = [
    "model.cls=MicroDiTTransformer", "model.kwargs.out_channels=4", "model.kwargs.patch_mixer_layers=1",
    "model.kwargs.num_experts=2", "model.kwargs.num_layers=3", "masking.ratio=0.75", "masking.unmasked_steps=2", "max_steps=5",
    "checkpoint_every=3", "ema_decay=null",
]  # fmt: skip


# a tiny FiT (the tiny-fit preset) as a `model.kwargs=` override: 2x2 patches, 4x4-patch training grid, up to 48
# tokens; latents 4 channels, text width 32 (JSON is a YAML flow mapping)
FIT_KWARGS = json.dumps(FIT)
SIZES = ((8, 8), (4, 12), (12, 4), (6, 6))  # latent (h, w): square, wide, tall, small square


CAPTIONS = ["a red circle", "a blue square on the left", "a green triangle", "a cyan circle on the right"]


def _png(color, size) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def save_tiny_pipeline(folder):
    """A tiny pipeline folder (VAE factor 2, patch size 2: sizes are multiples of 4 px)."""
    transformer = randomize_(PixArtTransformer(**SIGMA), std=0.05)
    pipe = TextToImagePipeline(
        tokenizer=tiny_tokenizer(), text_encoder=tiny_t5(), vae=tiny_vae(), transformer=transformer, scheduler=None
    )
    pipe.save_pretrained(folder)
    return folder


def _image_folder(root, broken=True):
    root.mkdir()
    rows = []
    for i, caption in enumerate(CAPTIONS):
        (root / f"{i}.png").write_bytes(_png((40 * i, 100, 200), (20 + 4 * i, 16)))
        rows.append({"file_name": f"{i}.png", "text": caption})
    if broken:
        (root / "bad.png").write_bytes(b"not an image")
        rows += [{"file_name": "bad.png", "text": "broken"}, {"file_name": "0.png", "text": ""}]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


TOP = {
    "pos_embed.proj": "x_embedder.proj",
    "adaln_single.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "adaln_single.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "adaln_single.emb.resolution_embedder.linear_1": "csize_embedder.mlp.0",
    "adaln_single.emb.resolution_embedder.linear_2": "csize_embedder.mlp.2",
    "adaln_single.emb.aspect_ratio_embedder.linear_1": "ar_embedder.mlp.0",
    "adaln_single.emb.aspect_ratio_embedder.linear_2": "ar_embedder.mlp.2",
    "adaln_single.linear": "t_block.1",
    "caption_projection.linear_1": "y_embedder.y_proj.fc1",
    "caption_projection.linear_2": "y_embedder.y_proj.fc2",
    "proj_out": "final_layer.linear",
}


def original_state_dict(reference, null_length=12):
    """The PixArt repository's layout: fused qkv and kv, `blocks.N`, a fixed pos_embed table, y_embedding."""
    sd = reference.state_dict()
    out = {"final_layer.scale_shift_table": sd["scale_shift_table"], "pos_embed": torch.zeros(1, 16, 24)}
    out["y_embedder.y_embedding"] = torch.randn(null_length, reference.config.caption_channels)
    for new, old in TOP.items():
        for kind in ("weight", "bias"):
            if f"{new}.{kind}" in sd:
                out[f"{old}.{kind}"] = sd[f"{new}.{kind}"]
    for i in range(reference.config.num_layers):
        b = f"transformer_blocks.{i}."
        out[f"blocks.{i}.scale_shift_table"] = sd[b + "scale_shift_table"]
        for kind in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([sd[f"{b}attn1.to_{x}.{kind}"] for x in "qkv"])
            out[f"blocks.{i}.attn.proj.{kind}"] = sd[f"{b}attn1.to_out.0.{kind}"]
            out[f"blocks.{i}.cross_attn.q_linear.{kind}"] = sd[f"{b}attn2.to_q.{kind}"]
            out[f"blocks.{i}.cross_attn.kv_linear.{kind}"] = torch.cat([sd[f"{b}attn2.to_{x}.{kind}"] for x in "kv"])
            out[f"blocks.{i}.cross_attn.proj.{kind}"] = sd[f"{b}attn2.to_out.0.{kind}"]
            out[f"blocks.{i}.mlp.fc1.{kind}"] = sd[f"{b}ff.net.0.proj.{kind}"]
            out[f"blocks.{i}.mlp.fc2.{kind}"] = sd[f"{b}ff.net.2.{kind}"]
    return out


def _objective_tensors(objective: Objective, prefix: str = "objective") -> dict[str, torch.Tensor]:
    return {f"{prefix}.{name}": tensor for name, tensor in objective.named_tensors()}


def state_beside_the_model(trainer) -> dict[str, torch.Tensor]:
    """Every tensor the trainer keeps for its steps, by a readable name."""
    state = dict(trainer.accelerator.unwrap_model(trainer.model).state_dict())
    if trainer.ema is not None:
        state.update({f"ema.{name}": t for name, t in trainer.ema.shadow.items()})
    if trainer.target is not None:
        state.update({f"target.{name}": t for name, t in trainer.target.module.state_dict().items()})
    if trainer.teacher is not None:
        state.update({f"teacher.{name}": t for name, t in trainer.teacher.state_dict().items()})
    for label, caption in (("null_caption", trainer.null_caption), ("uncond_caption", trainer.uncond_caption)):
        for i, tensor in enumerate(caption or ()):
            if tensor is not None:
                state[f"{label}.{i}"] = tensor
    state.update(_objective_tensors(trainer.objective))
    return state


# ----- real-looking photos: mixed sizes and formats, captions outside the MicroShapes vocabulary ----------------
PHOTO_CAPTIONS = [
    "an astronaut in a white suit, standing on the moon", "a tabby cat asleep on a sofa", "coffee beans in a cup",
    "a rocket launch at dawn", "a portrait of an old man with a hat", "a city street in the rain, at night",
    "a bowl of fruit: apples, pears and grapes", "a horse grazing in a meadow", "a sailboat on a calm lake",
    "a brick wall with green ivy", "a lighthouse above the rocky coast", "",
]  # fmt: skip
PHOTO_SIZES = [(80, 60), (64, 64), (50, 90), (120, 64), (64, 64), (90, 50), (64, 48), (100, 100), (48, 64),
               (64, 64), (70, 70), (60, 80)]  # (width, height)  # fmt: skip


def photo(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like RGB image: a smooth random colour field (a bicubic-upsampled 4x4 grid) plus a gradient and
    pixel noise texture."""
    gen = torch.Generator().manual_seed(seed)
    field = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=gen) * 255, size=(height, width),
                                            mode="bicubic", align_corners=False)[0]  # fmt: skip
    gradient = torch.linspace(-40, 40, width)[None, None, :] * (torch.rand(3, 1, 1, generator=gen) - 0.5)
    texture = torch.randn(3, height, width, generator=gen) * 20
    pixels = (field + gradient + texture).clamp(0, 255).round().byte().permute(1, 2, 0)  # (H, W, 3)
    return Image.fromarray(pixels.numpy())


def photo_folder(root: Path) -> tuple[Path, int]:
    """An image folder of :data:`PHOTO_SIZES` photo-like images (PNG and JPEG in turn) with :data:`PHOTO_CAPTIONS`
    (one empty), plus one corrupt file and one malformed ``metadata.jsonl`` line; returns the folder and the
    number of usable samples."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, ((width, height), caption) in enumerate(zip(PHOTO_SIZES, PHOTO_CAPTIONS)):
        name = f"photo{i}.{'png' if i % 2 else 'jpg'}"
        photo(width, height, seed=i).save(root / name, quality=90)
        rows.append(json.dumps({"file_name": name, "text": caption}))
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    rows[3:3] = [json.dumps({"file_name": "corrupt.jpg", "text": "a corrupt file"}), '{"file_name": "photo1.png",']
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root, len(PHOTO_SIZES)


# ----- checkpoints in the original repositories' layouts (FiT / FiTv2, MicroDiT) ----------------------------------
FIT_V2 = dict(
    context_size=16, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=5,
    learn_sigma=False, use_sit=True, use_swiglu=True, q_norm="layernorm", k_norm="layernorm", adaln_type="lora",
    adaln_lora_dim=8, class_dropout_prob=0.1,
)  # fmt: skip
FIT_V1 = dict(
    context_size=16, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=5,
    learn_sigma=True, use_swiglu=True, use_swiglu_large=True,
)  # fmt: skip
FIT_ORIGINALS = {"v1": FIT_V1, "v2": FIT_V2}


def fit_original_state(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """FiT / FiTv2: random weights in the original's keys and shapes (cases.json ``state_keys``) for FiT's arguments ``config``."""
    args = {**ORIGINAL_DEFAULTS, **config}
    width, p, channels = args["hidden_size"], args["patch_size"], args["in_channels"]
    out = p * p * channels * (2 if args["learn_sigma"] else 1)
    hidden = int(width * args["mlp_ratio"]) if args["use_swiglu_large"] else int(width * args["mlp_ratio"]) * 2 // 3
    rank = args["adaln_lora_dim"]
    shapes = {
        "x_embedder.proj": (width, p * p * channels), "t_embedder.mlp.0": (width, 256), "t_embedder.mlp.2": (width, width),
        "final_layer.linear": (out, width), "final_layer.adaLN_modulation.1": (2 * width, width),
    }  # fmt: skip
    if args["adaln_type"] == "lora":
        shapes["global_adaLN_modulation.1"] = (6 * width, width)
    for i in range(args["depth"]):
        block = {"attn.qkv": (3 * width, width), "attn.proj": (width, width), "mlp.fc1_g": (hidden, width),
                 "mlp.fc1_x": (hidden, width), "mlp.fc2": (width, hidden)}  # fmt: skip
        if args["adaln_type"] == "lora":
            block.update({"adaLN_modulation.1": (rank, width), "adaLN_modulation.2": (6 * width, rank)})
        else:
            block["adaLN_modulation.1"] = (6 * width, width)
        shapes.update({f"blocks.{i}.{name}": shape for name, shape in block.items()})
    gen = torch.Generator().manual_seed(seed)
    state = {"y_embedder.embedding_table.weight": torch.randn(args["num_classes"] + 1, width, generator=gen)}
    for name, (rows, cols) in shapes.items():
        state[f"{name}.weight"] = torch.randn(rows, cols, generator=gen) * cols**-0.5
        state[f"{name}.bias"] = torch.randn(rows, generator=gen) * 0.1
    return state


#: our module -> the original's (cases.json conventions.keys), top level and inside a block
_MICRODIT_TOP = {"pos_embed.proj": "x_embedder.proj", "timestep_embedder.linear_1": "t_embedder.mlp.0",
        "timestep_embedder.linear_2": "t_embedder.mlp.2", "caption_projection.linear_1": "y_embedder.y_proj.fc1",
        "caption_projection.norm": "y_embedder.y_proj.norm", "caption_projection.linear_2": "y_embedder.y_proj.fc2",
        "pooled_caption_projection.linear_1": "pooled_y_emb_process.fc1",
        "pooled_caption_projection.norm": "pooled_y_emb_process.norm",
        "pooled_caption_projection.linear_2": "pooled_y_emb_process.fc2", "proj_out": "final_layer.linear",
        "norm_out.linear": "final_layer.adaLN_modulation.1", "norm_out.norm": "final_layer.norm_final",
        "patch_mixer_proj_in.norm": "patch_mixer_map_xin.0", "patch_mixer_proj_in.linear": "patch_mixer_map_xin.1",
        "patch_mixer_proj_out.norm": "patch_mixer_map_xout.0", "patch_mixer_proj_out.linear": "patch_mixer_map_xout.1",
        "patch_mixer_proj_text.norm": "patch_mixer_map_y.0", "patch_mixer_proj_text.linear": "patch_mixer_map_y.1"}  # fmt: skip
_MICRODIT_IN_BLOCK = {"attn1.to_out.0": "attn.proj", "attn2.to_q": "cross_attn.q_linear", "attn2.to_out.0": "cross_attn.proj",
             "adaln_modulation": "adaLN_modulation.1", "ff.net.2": "mlp.w3", "ff.gate": "mlp.gate", "norm1": "norm1",
             "norm2": "norm2", "norm3": "norm3"}  # fmt: skip
_MICRODIT_FUSED = {"attn1.to_q": ("attn.qkv", 0), "attn1.to_k": ("attn.qkv", 1), "attn1.to_v": ("attn.qkv", 2),
          "attn2.to_k": ("cross_attn.kv_linear", 0), "attn2.to_v": ("cross_attn.kv_linear", 1)}  # fmt: skip
_MICRODIT_BLOCKS = re.compile(r"(transformer_blocks\.\d+|patch_mixer\.\d+|caption_refiner)\.(.+)$")


def microdit_original_state(model: MicroDiTOriginalTransformer) -> dict[str, torch.Tensor]:
    """A MicroDiTOriginalTransformer's state dict written out in the original MicroDiT layout (fused projections, SwiGLU w1 / w2 / w3, ...)."""
    grid = model.config.sample_size // model.config.patch_size
    out = {
        "pos_embed": model.pos_embed.position_table(grid, grid, torch.device("cpu")),
        "mask_token": model.mask_token,
    }
    fused: dict[str, dict[int, torch.Tensor]] = {}
    for key, tensor in model.state_dict().items():
        stem, _, kind = key.rpartition(".")
        if stem in _MICRODIT_TOP:
            out[f"{_MICRODIT_TOP[stem]}.{kind}"] = tensor
        elif (match := _MICRODIT_BLOCKS.match(key)) is not None:
            block, rest = match.groups()
            prefix = block.replace("transformer_blocks", "blocks").replace("caption_refiner", "y_emb_preprocess")
            name, _, kind = rest.rpartition(".")
            if rest in ("ff.w1", "ff.w2"):
                out[f"{prefix}.mlp.{rest[3:]}"] = tensor
            elif name == "ff.net.0.proj":
                value, gate = tensor.chunk(2)
                out[f"{prefix}.mlp.w1.{kind}"], out[f"{prefix}.mlp.w2.{kind}"] = gate, value
            elif name in _MICRODIT_FUSED:
                target, index = _MICRODIT_FUSED[name]
                fused.setdefault(f"{prefix}.{target}.{kind}", {})[index] = tensor
            else:
                out[f"{prefix}.{_MICRODIT_IN_BLOCK[name]}.{kind}"] = tensor
        elif key != "mask_token":
            raise KeyError(key)
    out.update({key: torch.cat([parts[i] for i in sorted(parts)]) for key, parts in fused.items()})
    return out


def microdit_original_config(model: MicroDiTOriginalTransformer) -> dict:
    """The original ``DiT`` constructor's arguments of ``model`` (the inverse of ``config_from_original``)."""
    from dit.convert.microdit_original import _RENAMED

    config = model.config
    original = {name: config[ours] for name, ours in _RENAMED.items() if ours in config}
    original["dim"] = config.num_attention_heads * config.attention_head_dim
    original["patch_mixer_depth"] = config.patch_mixer_layers
    if config.patch_mixer_dim is None:
        original["patch_mixer_dim"] = original["dim"]
    return {k: list(v) if isinstance(v, tuple) else v for k, v in original.items()}

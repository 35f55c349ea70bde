"""The per-forward BlockContext, the guidance input, default micro-conditions and the capabilities each backbone
declares (what pipelines and the trainer read instead of probing signatures)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from dit import ControlNetAdapter, FiTTransformer, LiTTransformer, MicroDiTTransformer, PixArtTransformer
from dit.models.presets import preset_config
from dit.nn.context import BlockContext
from dit.nn.embeddings import guidance_scale_embedding
from tests.tiny import ALPHA, FIT, SIGMA, added_cond, randomize_

ROOT = Path(__file__).resolve().parents[2]
BACKBONES = {
    "pixart": lambda: PixArtTransformer(**SIGMA),
    "alpha": lambda: PixArtTransformer(**ALPHA),
    "lit": lambda: LiTTransformer(**SIGMA),
    "microdit": lambda: MicroDiTTransformer(**preset_config("tiny-microdit")),
    "fit": lambda: FiTTransformer(**FIT),
}


def _inputs(height: int, width: int, masked: bool, batch: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    latents, text = torch.randn(batch, 4, height, width, generator=gen), torch.randn(batch, 6, 32, generator=gen)
    mask = torch.ones(batch, 6, dtype=torch.long)
    mask[0, 3:] = 0
    return latents, text, torch.tensor([10.0, 700.0][:batch]), {"encoder_attention_mask": mask} if masked else {}


# ----- BlockContext --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("size", [(8, 8), (8, 12)], ids=["square", "non-square"])
@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_one_context_per_forward_reaches_every_block_and_the_hook(name, size, masked):
    torch.manual_seed(0)
    model = BACKBONES[name]().eval()
    blocks = [*getattr(model, "patch_mixer", []), *model.transformer_blocks]
    seen = []
    for block in blocks:
        block.register_forward_pre_hook(lambda module, args: seen.append(args[1]))

    def controls(index, hidden_states, context):
        seen.append(context)
        return hidden_states

    latents, text, t, kwargs = _inputs(*size, masked)
    if name == "alpha":
        kwargs["added_cond_kwargs"] = added_cond(2, size[0] * 8, size[1] * 8)
    with torch.no_grad():
        model(latents, text, t, block_controls=controls, **kwargs)
    assert len(seen) == len(blocks) + len(model.transformer_blocks)
    assert isinstance(seen[0], BlockContext) and all(context is seen[0] for context in seen)
    p = model.config.patch_size
    assert seen[0].grid == (size[0] // p, size[1] // p)
    assert (seen[0].encoder_attention_mask is not None) == masked
    assert (seen[0].rotary is not None) == (name == "fit")


def test_gradient_checkpointing_hands_the_context_to_every_block():
    torch.manual_seed(0)
    model = PixArtTransformer(**SIGMA).train()
    model.enable_gradient_checkpointing()
    seen = []
    for block in model.transformer_blocks:
        block.register_forward_pre_hook(lambda module, args: seen.append(args[1]))
    latents, text, t, kwargs = _inputs(8, 12, masked=True)
    model(latents, text, t, **kwargs).sample.square().mean().backward()
    assert all(context is seen[0] for context in seen) and isinstance(seen[0], BlockContext)
    assert model.caption_projection.linear_1.weight.grad is not None  # gradients reach the text through it


def test_token_masking_gives_the_blocks_a_context_without_grid():
    torch.manual_seed(0)
    model = MicroDiTTransformer(**SIGMA, num_experts=None, patch_mixer_layers=1).train()
    mixer, blocks = [], []
    model.patch_mixer[0].register_forward_pre_hook(lambda module, args: mixer.append(args[1]))
    for block in model.transformer_blocks:
        block.register_forward_pre_hook(lambda module, args: blocks.append(args[1]))
    latents, text, t, kwargs = _inputs(8, 8, masked=True)
    keep = torch.tensor([[0, 3, 5, 9], [1, 2, 8, 15]])
    model(latents, text, t, keep_indices=keep, **kwargs)
    assert mixer[0].grid == (4, 4) and blocks[0].grid is None and blocks[0] is blocks[1]


# ----- guidance ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1.1, 4.5, torch.tensor([1.3, 7.7])], ids=["1.1", "4.5", "per-sample"])
def test_guidance_equals_the_embedding_as_timestep_cond(scale):
    torch.manual_seed(0)
    model = randomize_(PixArtTransformer(**SIGMA, time_cond_proj_dim=16)).eval()
    latents, text, t, kwargs = _inputs(8, 12, masked=True)
    if isinstance(scale, torch.Tensor):
        w = scale - 1  # the trainer's: a tensor, in its dtype
    else:
        w = torch.full((2,), scale - 1.0)  # the pipeline's: a Python number, in double precision
    cond = guidance_scale_embedding(w, 16).to(latents.dtype)
    with torch.no_grad():
        embedded = model(latents, text, t, guidance=scale, **kwargs).sample
        explicit = model(latents, text, t, timestep_cond=cond, **kwargs).sample
        other = model(latents, text, t, guidance=9.0, **kwargs).sample
    assert torch.equal(embedded, explicit)
    assert not torch.allclose(embedded, other)


def test_guidance_errors_name_the_problem():
    latents, text, t, _ = _inputs(8, 8, masked=False)
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        PixArtTransformer(**SIGMA)(latents, text, t, guidance=4.5)
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        FiTTransformer(**FIT)(latents, text, t, guidance=4.5)
    student = PixArtTransformer(**SIGMA, time_cond_proj_dim=16)
    with pytest.raises(ValueError, match="either guidance .* or timestep_cond"):
        student(latents, text, t, guidance=4.5, timestep_cond=torch.zeros(2, 16))


# ----- micro-conditions ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(8, 8), (8, 12)], ids=["square", "non-square"])
def test_default_micro_conditions_follow_vae_scale_factor(size):
    torch.manual_seed(0)
    model = randomize_(PixArtTransformer(**ALPHA, vae_scale_factor=16)).eval()
    latents, text, t, kwargs = _inputs(*size, masked=False)
    height, width = size[0] * 16, size[1] * 16
    with torch.no_grad():
        implicit = model(latents, text, t, **kwargs).sample
        explicit = model(latents, text, t, added_cond_kwargs=added_cond(2, height, width), **kwargs).sample
        at_8 = model(latents, text, t, added_cond_kwargs=added_cond(2, size[0] * 8, size[1] * 8), **kwargs).sample
        half = model(latents, text, t, added_cond_kwargs={"resolution": None, "aspect_ratio": None}, **kwargs).sample
    assert torch.equal(implicit, explicit) and torch.equal(implicit, half)
    assert not torch.allclose(implicit, at_8)


@pytest.mark.parametrize("value", [0, -8, 8.0, "8", True, None])
def test_vae_scale_factor_must_be_a_positive_int(value):
    with pytest.raises(ValueError, match="vae_scale_factor must be a positive int"):
        PixArtTransformer(**SIGMA, vae_scale_factor=value)


def test_vae_scale_factor_round_trips(tmp_path):
    PixArtTransformer(**ALPHA, vae_scale_factor=16).save_pretrained(tmp_path)
    assert PixArtTransformer.from_pretrained(tmp_path).config.vae_scale_factor == 16


# ----- capabilities --------------------------------------------------------------------------------------------
CAPABILITIES = {
    # class: token masking, image sizes, block controls, prediction type, native resolution
    PixArtTransformer: (True, False, True, None, False),
    LiTTransformer: (True, False, True, None, False),
    MicroDiTTransformer: (True, False, True, None, False),
    FiTTransformer: (False, True, True, "flow", True),
}


@pytest.mark.parametrize("cls", list(CAPABILITIES), ids=lambda cls: cls.__name__)
def test_capabilities_per_class(cls):
    declared = (
        cls.supports_token_masking,
        cls.supports_image_sizes,
        cls.supports_block_controls,
        cls.prediction_type,
        cls.native_resolution,
    )
    assert declared == CAPABILITIES[cls]
    assert cls.use_additional_conditions is False  # the class default; PixArt sets it per instance


@pytest.mark.parametrize(
    "build, full_grid, null_caption, additional, guidance",
    [
        (lambda: PixArtTransformer(**SIGMA), False, False, False, False),
        (lambda: PixArtTransformer(**ALPHA, null_caption_length=4), False, True, True, False),
        (lambda: PixArtTransformer(**SIGMA, kv_compress_ratio=2), True, False, False, False),
        (lambda: PixArtTransformer(**SIGMA, time_cond_proj_dim=16), False, False, False, True),
        (lambda: LiTTransformer(**SIGMA), True, False, False, False),
        (lambda: LiTTransformer(**SIGMA, attention_conv_kernel_size=None), False, False, False, False),
        (lambda: FiTTransformer(**FIT), False, False, False, False),
    ],
    ids=["pixart", "alpha-null", "kv", "lcm", "lit", "lit-no-conv", "fit"],
)
def test_instance_capabilities(build, full_grid, null_caption, additional, guidance):
    model = build()
    assert model.needs_full_grid is full_grid
    assert model.has_null_caption is null_caption
    assert model.use_additional_conditions is additional
    assert model.embeds_guidance is guidance


def test_controlnet_adapter_has_no_from_pixart():
    assert not hasattr(ControlNetAdapter, "from_pixart")
    assert hasattr(LiTTransformer, "from_pixart") and not hasattr(FiTTransformer, "from_pixart")


# ----- structure -----------------------------------------------------------------------------------------------
def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_fit_does_not_import_pixart():
    imported = _imported_modules(ROOT / "dit" / "models" / "fit_transformer.py")
    assert not any(name.endswith("pixart_transformer") for name in imported), imported


def test_microdit_sets_nothing_before_super_init():
    tree = ast.parse((ROOT / "dit" / "models" / "microdit_transformer.py").read_text())
    init = next(
        node
        for cls in tree.body
        if isinstance(cls, ast.ClassDef) and cls.name == "MicroDiTTransformer"
        for node in cls.body
        if isinstance(node, ast.FunctionDef) and node.name == "__init__"
    )
    for statement in init.body:
        if "super().__init__" in ast.unparse(statement):
            break
        assert "self." not in ast.unparse(statement), ast.unparse(statement)


def test_no_signature_probing():
    """``inspect.signature`` only where a class's ``__init__.__signature__`` is set for diffusers' config, or where
    ControlNetPipeline forwards (binds and documents) the base call's arguments, marked ``# forwarded signature``;
    never to discover what a model can do."""
    found = []
    for folder in ("dit", "pipelines", "train"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for line in path.read_text().splitlines():
                allowed = "PixArtTransformer.__init__" in line or "# forwarded signature" in line
                if "inspect.signature(" in line and not allowed:
                    found.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    assert not found, found

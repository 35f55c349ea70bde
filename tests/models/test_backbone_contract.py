"""The backbone contract of :class:`dit.models.backbone.DiTBackbone`, checked on every registered family: what the
toolkit derives from ``block_class``, the config fields pipelines and the trainer read, the one block loop, and the
typed attention options."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch
from diffusers.hooks._helpers import TransformerBlockRegistry

from dit.models.backbone import REQUIRED_CONFIG, DiTBackbone
from dit.models.registry import BACKBONES, backbone_class
from dit.nn.attention import AttentionSpec, DiTAttention

MODELS = Path(__file__).resolve().parents[2] / "dit" / "models"
BUILTIN = [
    "PixArtTransformer",
    "LiTTransformer",
    "MicroDiTTransformer",
    "MicroDiTOriginalTransformer",
    "FiTTransformer",
]


@pytest.mark.parametrize("name", BUILTIN)
def test_every_family_derives_its_lists_from_block_class(name):
    cls = backbone_class(name)
    assert issubclass(cls, DiTBackbone) and BACKBONES[name] is cls
    block = cls.block_class.__name__
    assert cls._repeated_blocks == [block] and block in cls._no_split_modules
    assert cls.block_class in TransformerBlockRegistry._registry


@pytest.mark.parametrize("name", BUILTIN)
def test_every_family_has_the_required_config_fields_and_hooks(name):
    cls = backbone_class(name)
    fields = inspect.signature(cls.__init__).parameters
    missing = [field for field in REQUIRED_CONFIG if field not in fields]
    assert not missing, f"{name} lacks config fields {missing}"
    for hook in ("prepare", "unpatchify"):
        assert getattr(cls, hook) is not getattr(DiTBackbone, hook), f"{name} does not implement {hook}"
    if cls.supports_block_controls:
        assert cls.control_tokens is not DiTBackbone.control_tokens


def test_diffusers_folder_names_resolve_to_our_pixart():
    assert backbone_class("PixArtTransformer2DModel") is backbone_class("Transformer2DModel") is BACKBONES[BUILTIN[0]]
    with pytest.raises(ValueError, match="is not a backbone class of dit.models; choose one of"):
        backbone_class("UNet2DConditionModel")


def _block_loops(path: Path) -> list[int]:
    """Lines of the ``for`` loops in ``path`` that run a block: their body calls ``_run_block`` or the loop target."""
    loops = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.For):
            continue
        targets = {n.id for n in ast.walk(node.target) if isinstance(n, ast.Name)}
        for call in (n for stmt in node.body for n in ast.walk(stmt) if isinstance(n, ast.Call)):
            func = call.func
            if (isinstance(func, ast.Attribute) and func.attr == "_run_block") or (
                isinstance(func, ast.Name) and func.id in targets
            ):
                loops.append(node.lineno)
                break
    return loops


def test_exactly_one_block_loop_under_dit_models():
    """ControlNet aside (its adapter runs its own copies), every forward runs its blocks through
    ``DiTBackbone.run_blocks``."""
    found = {
        path.name: lines
        for path in sorted(MODELS.glob("*.py"))
        if path.name != "controlnet.py" and (lines := _block_loops(path))
    }
    assert list(found) == ["backbone.py"] and len(found["backbone.py"]) == 1, found


# ----- typed attention options ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options, message",
    [
        (dict(kernel="cosine"), r"Unknown attention kernel 'cosine'; choose one of \['linear', 'softmax'\]"),
        (dict(kv_compress_ratio=1), r"kv_compress_ratio must be None or an int >= 2, got 1"),
        (dict(kv_compress_mode="max"), r"Unknown kv_compress_mode 'max'"),
        (dict(kv_compress_padding="zeros"), r"Unknown kv_compress_padding 'zeros'"),
        (dict(conv_kernel_size=0), r"conv_kernel_size must be None or an int >= 1, got 0"),
        (dict(qk_norm="rms"), r"Unknown qk_norm 'rms'"),
        (dict(heads=True), r"heads must be None or an int >= 1, got True"),
    ],
)
def test_attention_spec_checks_every_option_where_it_is_built(options, message):
    with pytest.raises(ValueError, match=message):
        AttentionSpec(**options)


def test_attention_spec_normalises_qk_norm_and_reports_grid_needs():
    assert AttentionSpec(qk_norm=True).qk_norm == "layer_norm" and AttentionSpec(qk_norm=False).qk_norm is None
    assert not AttentionSpec().needs_grid
    assert AttentionSpec(conv_kernel_size=5).needs_grid and AttentionSpec(kv_compress_ratio=2).needs_grid
    with pytest.raises(ValueError, match="self-attention options"):
        DiTAttention(16, 2, 8, cross_attention_dim=8, spec=AttentionSpec(kv_compress_ratio=2))


@pytest.mark.parametrize("name", ["PixArtTransformer", "LiTTransformer"])
def test_the_config_reaches_each_block_as_a_typed_spec(name):
    config = dict(num_attention_heads=4, attention_head_dim=8, num_layers=4, sample_size=8, caption_channels=16,
                  cross_attention_dim=32, kv_compress_ratio=2, qk_norm="layer_norm_across_heads")  # fmt: skip
    with torch.device("meta"):
        model = backbone_class(name)(**config)
    attentions = [block.attn1 for block in model.transformer_blocks]
    assert [a.kv_compress is not None for a in attentions] == [False, False, True, True]  # the deep half
    assert all(a.qk_norm == "layer_norm_across_heads" for a in attentions)
    linear = name == "LiTTransformer"
    assert all(a.kernel == ("linear" if linear else "softmax") for a in attentions)
    assert all(a.heads == (1 if linear else 4) for a in attentions)  # LiT: a quarter of the heads
    assert all((a.dwc is not None) == linear for a in attentions)

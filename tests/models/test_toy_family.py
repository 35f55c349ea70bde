"""The backbone contract (:class:`dit.models.backbone.DiTBackbone`): a family defined in this file alone, with its
own block class and no library file edited, runs through the pipeline, the trainer (the ControlNet feature, EMA,
exact resume), ControlNet adapters, regional compilation and diffusers' step caches."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.hooks import FirstBlockCacheConfig
from diffusers.hooks._helpers import TransformerBlockRegistry
from torch import nn

from dit import ControlNetAdapter
from dit.models.backbone import DiTBackbone, ForwardInputs, ForwardState
from dit.models.base import compile_repeated_blocks
from dit.models.controlnet import block_controls
from dit.models.inputs import check_control_size, text_tokens
from dit.models.registry import backbone_class, load_backbone
from dit.nn.attention import AttentionMask, DiTAttention
from dit.nn.blocks import FeedForward
from dit.nn.context import BlockContext
from dit.nn.embeddings import CaptionProjection, TimestepEmbedding, timestep_sinusoid
from dit.nn.normalization import add_output_head
from dit.nn.packing import patchify, unpatchify
from dit.pipelines import TextToImagePipeline
from dit.tiny import tiny_t5, tiny_tokenizer, tiny_vae
from tests.tiny import TINY, make_features, randomize_

CONFIG = dict(num_attention_heads=2, attention_head_dim=8, num_layers=3, caption_channels=32)


class ToyBlock(nn.Module):
    """Pre-norm self-attention (modulated by the context's shared scale/shift), cross-attention and an MLP."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn1 = DiTAttention(dim, heads, head_dim)
        self.attn2 = DiTAttention(dim, heads, head_dim, cross_attention_dim=dim)
        self.ff = FeedForward(dim, mult=2)

    def forward(self, hidden_states: torch.Tensor, context: BlockContext) -> torch.Tensor:
        shift, scale = context.shared_modulation[:, None].chunk(2, dim=-1)  # (B, 1, D) each
        x = self.norm1(hidden_states) * (1 + scale) + shift  # (B, N, D)
        hidden_states = hidden_states + self.attn1(x, mask=context.attention_mask)
        text, text_mask = context.encoder_hidden_states, context.encoder_attention_mask
        hidden_states = hidden_states + self.attn2(hidden_states, text, text_mask)
        return hidden_states + self.ff(hidden_states)  # (B, N, D)


@dataclass
class ToyState(ForwardState):
    grid: tuple[int, int] = (0, 0)


class ToyTransformer(DiTBackbone):
    """A toy family: linear patch embedding, no positions, timestep modulation, ControlNet through its embedding."""

    block_class = ToyBlock
    supports_block_controls = True

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 2,
        attention_head_dim: int = 8,
        in_channels: int = 4,
        out_channels: int | None = None,
        num_layers: int = 2,
        patch_size: int = 2,
        sample_size: int = 8,
        caption_channels: int | None = 32,
        prediction_type: str | None = None,
        noise_shift: float | None = None,
    ):
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        self.out_channels = out_channels or in_channels
        self.gradient_checkpointing = False
        self.proj_in = nn.Linear(patch_size * patch_size * in_channels, dim)
        self.time_embedding = TimestepEmbedding(256, dim)
        self.modulation = nn.Linear(dim, 2 * dim)
        self.caption_projection = CaptionProjection(caption_channels, dim)
        blocks = [ToyBlock(dim, num_attention_heads, attention_head_dim) for _ in range(num_layers)]
        self.transformer_blocks = nn.ModuleList(blocks)
        add_output_head(self, dim, patch_size * patch_size * self.out_channels)

    def prepare(self, inputs: ForwardInputs, backend) -> ToyState:
        latents, p = inputs.hidden_states, self.config.patch_size
        grid = (latents.shape[-2] // p, latents.shape[-1] // p)
        x = self.proj_in(patchify(latents, p))  # (B, N, D)
        t = torch.as_tensor(inputs.timestep, device=x.device).reshape(-1).expand(x.shape[0])  # (B,)
        emb = self.time_embedding(timestep_sinusoid(t).to(x.dtype))  # (B, D)
        text, bias = text_tokens(self.caption_projection, inputs.encoder_hidden_states, inputs.encoder_attention_mask, x.dtype)  # fmt: skip
        heads = self.config.num_attention_heads
        mask = None if bias is None else AttentionMask.from_bias(bias, backend, heads, x.shape[1])
        context = BlockContext(
            encoder_hidden_states=text, encoder_attention_mask=mask, shared_modulation=self.modulation(emb), grid=grid
        )
        return ToyState(x, context, emb, grid=grid)

    def unpatchify(self, hidden_states: torch.Tensor, state: ToyState) -> torch.Tensor:
        return unpatchify(hidden_states, state.grid, self.config.patch_size)  # (B, C, H, W)

    def control_tokens(self, controlnet_cond: torch.Tensor, context: BlockContext) -> torch.Tensor:
        check_control_size(controlnet_cond, context.grid, self.config.patch_size)
        return self.proj_in(patchify(controlnet_cond, self.config.patch_size))  # (B, N, D)


def _toy(seed: int = 0) -> ToyTransformer:
    torch.manual_seed(seed)
    return randomize_(ToyTransformer(**CONFIG), std=0.05).eval()


def _inputs(batch: int = 2, size=(8, 12)):
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(batch, 6, dtype=torch.long)
    mask[0, 4:] = 0
    return {
        "hidden_states": torch.randn(batch, 4, *size, generator=gen),
        "encoder_hidden_states": torch.randn(batch, 6, 32, generator=gen),
        "timestep": torch.tensor([10.0, 700.0][:batch]),
        "encoder_attention_mask": mask,
    }


def test_the_class_attributes_give_everything_the_toolkit_derives():
    assert backbone_class("ToyTransformer") is ToyTransformer
    assert ToyTransformer._repeated_blocks == ["ToyBlock"] and ToyTransformer._no_split_modules == ["ToyBlock"]
    assert ToyBlock in TransformerBlockRegistry._registry
    with pytest.raises(TypeError, match="must set block_class"):
        type("NoBlock", (DiTBackbone,), {})


def test_save_load_and_the_forward_skeleton(tmp_path):
    model = _toy()
    with torch.no_grad():
        out = model(**_inputs()).sample
    assert out.shape == (2, 4, 8, 12) and torch.isfinite(out).all()
    model.save_pretrained(tmp_path)
    loaded = load_backbone(tmp_path)
    assert type(loaded) is ToyTransformer
    with torch.no_grad():
        assert torch.equal(loaded(**_inputs()).sample, out)


def test_pipeline_generates_with_the_toy_backbone(tmp_path):
    pipe = TextToImagePipeline(
        tokenizer=tiny_tokenizer(), text_encoder=tiny_t5(), vae=tiny_vae(), transformer=_toy(), scheduler=None
    )
    images = pipe("a red circle", height=64, width=96, num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 3, 64, 96) and torch.isfinite(images).all()
    pipe.save_pretrained(tmp_path)
    again = TextToImagePipeline.from_pretrained(tmp_path)
    assert type(again.transformer) is ToyTransformer


def test_controlnet_adapter_runs_in_the_toy_block_loop():
    model = _toy()
    adapter = ControlNetAdapter.from_transformer(model, num_blocks=2)
    assert adapter._repeated_blocks == ["ToyBlock"]
    inputs, cond = _inputs(), torch.randn(2, 4, 8, 12)
    with torch.no_grad():
        plain = model(**inputs).sample
        zero = model(**inputs, block_controls=block_controls(model, adapter, cond)).sample
        torch.testing.assert_close(zero, plain)  # zero-initialised projections: the base output, exactly
        randomize_(adapter, std=0.05)
        steered = model(**inputs, block_controls=block_controls(model, adapter, cond)).sample
    assert not torch.allclose(steered, plain)


def test_first_block_cache_and_regional_compilation():
    model = _toy()
    inputs = _inputs()
    runs = [0] * CONFIG["num_layers"]
    for i, block in enumerate(model.transformer_blocks):
        block.norm1.register_forward_pre_hook(lambda *_, i=i: runs.__setitem__(i, runs[i] + 1))
    with torch.no_grad():
        plain = model(**inputs).sample
        model.enable_cache(FirstBlockCacheConfig(threshold=1e9))  # reuse whenever there is a cache
        first = model(**inputs).sample
        inputs["timestep"] = inputs["timestep"] - 1  # the next step of the same run
        cached = model(**inputs).sample
        model.disable_cache()
    torch.testing.assert_close(first, plain)
    assert runs == [3, 2, 2]  # uncached, then the step that fills the cache, then only the first block
    assert torch.isfinite(cached).all()
    assert compile_repeated_blocks(model, backend="eager") == CONFIG["num_layers"]


def _train_config(features, base, out, *overrides: str):
    from dit.train import load_config

    return load_config(
        TINY,
        [f"data.path={features}", f"output_dir={out}", f"model.pretrained={base}", "model.cls=ToyTransformer",
         "controlnet.num_blocks=2", "max_steps=4", "checkpoint_every=2", "report_to=none", "ema_decay=0.9",
         *overrides],
    )  # fmt: skip


@pytest.fixture(scope="module")
def control_run(tmp_path_factory):
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("toy")
    features = make_features(root / "features")
    gen = torch.Generator().manual_seed(7)
    for shard in sorted(features.glob("shard-*.safetensors")):
        tensors = load_file(shard)
        tensors["control_latent"] = torch.randn(tensors["latent_mean"].shape, generator=gen)
        save_file(tensors, shard)
    _toy().save_pretrained(root / "base")
    return features, root / "base"


def test_trainer_controlnet_ema_and_exact_resume(control_run, tmp_path):
    from dit.train import Trainer

    features, base = control_run
    straight = Trainer(_train_config(features, base, tmp_path / "straight")).train()
    assert len(straight) == 4 and all(map(math.isfinite, straight))
    Trainer(_train_config(features, base, tmp_path / "split", "max_steps=2")).train()
    resumed = Trainer(_train_config(features, base, tmp_path / "split", "resume=latest")).train()
    assert resumed == straight[2:]
    saved = tmp_path / "split" / "checkpoints" / "checkpoint-4"
    for folder in ("model", "model_ema"):
        adapter = ControlNetAdapter.from_pretrained(saved / folder)
        assert adapter.config.transformer_class == "ToyTransformer"
    ema, trained = (ControlNetAdapter.from_pretrained(saved / f).state_dict() for f in ("model_ema", "model"))
    assert any(not torch.equal(ema[k], trained[k]) for k in ema)

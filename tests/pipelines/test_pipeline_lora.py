"""diffusers' pipeline LoRA methods on the toolkit's transformers: two adapters with weights, fusing, unfusing,
unloading, deleting, disabling, and cross_attention_kwargs reaching the transformer."""

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from peft import LoraConfig

from dit.pipelines import TextToImagePipeline
from tests.tiny import assert_fp32_close, randomize_, tiny_backbone, tiny_t5, tiny_tokenizer, tiny_vae

PROMPT = "a large red circle on the left, on a white background"
TARGETS = ["to_q", "to_k", "to_v", "proj_out"]
BACKBONES = {"pixart": tiny_backbone("tiny-pixart"), "fit": tiny_backbone("tiny-fit")}


def _transformer(kind: str):
    cls, config = BACKBONES[kind]
    torch.manual_seed(0)
    return randomize_(cls(**config), std=0.05).eval()


def _lora_folder(kind: str, folder, seed: int):
    """A LoRA for the base of ``kind``, written as the trainer writes one (``save_lora_adapter``: no prefix)."""
    model = _transformer(kind)
    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0.0, 0.1)
    model.save_lora_adapter(folder)
    return folder


def _pipe(kind: str):
    scheduler = DPMSolverMultistepScheduler() if kind == "pixart" else None
    pipe = TextToImagePipeline(tokenizer=tiny_tokenizer(), text_encoder=tiny_t5(), vae=tiny_vae(),
                               transformer=_transformer(kind), scheduler=scheduler)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latents(pipe, **kwargs):
    return pipe(PROMPT, num_inference_steps=2, guidance_scale=4.5, output_type="latent", max_sequence_length=12,
                use_resolution_binning=False, generator=torch.Generator().manual_seed(0), **kwargs).images  # fmt: skip


def _differ(a, b):
    return (a - b).abs().max().item() > 1e-3


@pytest.fixture(params=list(BACKBONES))
def loaded(request, tmp_path):
    """A pipeline with its base latents, then adapters "shapes" and "colors" loaded."""
    kind = request.param
    pipe = _pipe(kind)
    base = _latents(pipe)
    pipe.load_lora_weights(_lora_folder(kind, tmp_path / "a", seed=1), adapter_name="shapes")
    pipe.load_lora_weights(_lora_folder(kind, tmp_path / "b", seed=2) / "pytorch_lora_weights.safetensors",
                           adapter_name="colors")  # fmt: skip
    return pipe, base


def test_two_adapters_with_weights(loaded):
    pipe, base = loaded
    assert pipe.get_list_adapters() == {"transformer": ["shapes", "colors"]}
    pipe.set_adapters(["shapes", "colors"], adapter_weights=[0.5, 1.0])
    assert pipe.get_active_adapters() == ["shapes", "colors"]
    both = _latents(pipe)
    pipe.set_adapters(["shapes", "colors"], adapter_weights=[1.0, 1.0])
    assert _differ(both, _latents(pipe)) and _differ(both, base)
    pipe.set_adapters("shapes")
    assert pipe.get_active_adapters() == ["shapes"] and _differ(_latents(pipe), both)


def test_fuse_equals_unfused_with_scale_and_unfuse_restores(loaded):
    pipe, base = loaded
    pipe.set_adapters(["shapes", "colors"], adapter_weights=[0.5, 1.0])
    unfused = _latents(pipe)
    pipe.set_adapters(["shapes", "colors"], adapter_weights=[0.5 * 0.7, 1.0 * 0.7])
    unfused_scaled = _latents(pipe)
    pipe.set_adapters(["shapes", "colors"], adapter_weights=[0.5, 1.0])
    weights = {name: p.detach().clone() for name, p in pipe.transformer.named_parameters() if "lora_" not in name}
    pipe.fuse_lora(lora_scale=0.7)
    assert pipe.num_fused_loras == 2  # merged: the LoRA layers now run their base layers only
    assert_fp32_close(_latents(pipe), unfused_scaled)
    pipe.unfuse_lora()
    assert pipe.num_fused_loras == 0
    for name, p in pipe.transformer.named_parameters():
        if name in weights:
            assert_fp32_close(p.detach(), weights[name], tolerance=1e-6)
    pipe.disable_lora()
    assert_fp32_close(_latents(pipe), base)
    pipe.enable_lora()
    pipe.set_adapters(["shapes", "colors"], adapter_weights=[0.5, 1.0])  # unfusing keeps diffusers' fuse scale
    assert_fp32_close(_latents(pipe), unfused)


def test_unload_returns_to_the_base(loaded):
    pipe, base = loaded
    pipe.unload_lora_weights()
    assert not getattr(pipe.transformer, "peft_config", None)
    assert_fp32_close(_latents(pipe), base)


def test_disable_delete_and_enable(loaded):
    pipe, base = loaded
    pipe.set_adapters(["shapes", "colors"], adapter_weights=[0.5, 1.0])
    pipe.disable_lora()
    assert_fp32_close(_latents(pipe), base)
    pipe.enable_lora()
    pipe.delete_adapters("shapes")
    assert pipe.get_list_adapters() == {"transformer": ["colors"]}
    pipe.set_adapters("colors")
    assert _differ(_latents(pipe), base)


def test_cross_attention_kwargs_reach_the_transformer():
    pipe = _pipe("pixart")
    seen = []
    pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw.get("cross_attention_kwargs")), with_kwargs=True
    )
    _latents(pipe, cross_attention_kwargs={"scale": 0.3})
    assert seen == [{"scale": 0.3}] * 2


def test_cross_attention_scale_equals_fused_scale(loaded):
    """diffusers' ``{"scale": s}`` on an unfused LoRA samples as ``fuse_lora(lora_scale=s)`` (the model honours it)."""
    pipe, _ = loaded
    pipe.set_adapters(["shapes", "colors"], adapter_weights=[0.5, 1.0])
    scaled = _latents(pipe, cross_attention_kwargs={"scale": 0.7})
    pipe.fuse_lora(lora_scale=0.7)
    assert_fp32_close(_latents(pipe), scaled)

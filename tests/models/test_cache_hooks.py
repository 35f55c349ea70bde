"""diffusers' cache hooks on our backbones (dit.models.cache): each attaches to our blocks or attention modules, a
cache that never skips gives the uncached images exactly, and a skipping cache does less work (counted calls)."""

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
    apply_first_block_cache,
)
from diffusers.hooks._helpers import TransformerBlockRegistry

from dit.models.cache import StepCacheMixin
from dit.nn.blocks import FiTBlock, PixArtBlock
from dit.pipelines import TextToImagePipeline
from tests.tiny import randomize_, tiny_backbone, tiny_t5, tiny_tokenizer, tiny_vae

PROMPT = "a large red circle on the left, on a white background"
LAYERS, STEPS = 4, 6
BACKBONES = {"pixart": tiny_backbone("tiny-pixart"), "fit": tiny_backbone("tiny-fit")}
NEVER = (-2, -1)  # a timestep window no step falls in: the attention caches never skip
ALWAYS = (-1, 1001)  # every step of a 1000-step schedule


def _with_cache_api(cls):
    """``cls`` with :class:`StepCacheMixin` (itself once the backbones have it as a base)."""
    return cls if issubclass(cls, StepCacheMixin) else type(cls.__name__, (StepCacheMixin, cls), {})


def _pipe(name: str = "pixart", pipeline_cls=TextToImagePipeline):
    cls, config = BACKBONES[name]
    torch.manual_seed(0)
    transformer = randomize_(_with_cache_api(cls)(**{**config, "num_layers": LAYERS}), std=0.05).eval()
    scheduler = DPMSolverMultistepScheduler() if name == "pixart" else None  # FiT: flow matching
    parts = dict(tokenizer=tiny_tokenizer(), text_encoder=tiny_t5(), vae=tiny_vae(), scheduler=scheduler)
    return pipeline_cls(transformer=transformer, **parts)


def _run(pipe, **kwargs) -> np.ndarray:
    kwargs = {"num_inference_steps": STEPS, "output_type": "np", "use_resolution_binning": False, **kwargs}
    return pipe(PROMPT, guidance_scale=3.0, generator=torch.Generator().manual_seed(0), **kwargs).images


def _count_calls(modules) -> list[int]:
    """Live call counts of ``modules`` (a submodule runs only when its parent's real forward does)."""
    counts = [0] * len(modules)
    for i, module in enumerate(modules):
        module.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


def _blocks_run(pipe) -> list[int]:
    return _count_calls([block.norm1 for block in pipe.transformer.transformer_blocks])


def _self_attentions_run(pipe) -> list[int]:
    return _count_calls([block.attn1.to_q for block in pipe.transformer.transformer_blocks])


def _hooked(model, name: str) -> int:
    """Modules of ``model`` carrying a diffusers hook named ``name``."""
    return sum(name in m._diffusers_hook.hooks for m in model.modules() if hasattr(m, "_diffusers_hook"))


def _cached_equals_uncached(pipe, config) -> None:
    expected = _run(pipe)
    pipe.transformer.enable_cache(config)
    assert np.array_equal(_run(pipe), expected)
    pipe.transformer.disable_cache()
    assert np.array_equal(_run(pipe), expected)


@pytest.mark.parametrize("block_class", [PixArtBlock, FiTBlock])
def test_blocks_are_registered_like_diffusers_blocks(block_class):
    metadata = TransformerBlockRegistry.get(block_class)  # before: ValueError "... not registered"
    assert metadata.return_hidden_states_index == 0 and metadata.return_encoder_hidden_states_index is None


# ----- First-Block-Cache -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BACKBONES)
def test_first_block_cache_attaches_to_every_block(name):
    model = _pipe(name).transformer
    apply_first_block_cache(model, FirstBlockCacheConfig(threshold=0.1))  # before: "... not registered"
    assert _hooked(model, "fbc_leader_block_hook") == 1 and _hooked(model, "fbc_block_hook") == LAYERS - 1


@pytest.mark.parametrize("name", BACKBONES)
def test_first_block_cache_at_threshold_zero_is_exact(name):
    """Threshold 0 recomputes every step, so the images are the uncached ones bit for bit (a block that wrote into
    its input would zero the cached residuals and break this)."""
    _cached_equals_uncached(_pipe(name), FirstBlockCacheConfig(threshold=0.0))


@pytest.mark.parametrize("name", BACKBONES)
def test_first_block_cache_skips_the_blocks_after_the_first(name):
    pipe = _pipe(name)
    expected = _run(pipe)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=1e9))  # reuse whenever there is a cache
    runs = _blocks_run(pipe)
    first = _run(pipe)
    assert runs == [STEPS] + [1] * (LAYERS - 1)  # the first step fills the cache, then only the first block runs
    assert np.isfinite(first).all() and not np.array_equal(first, expected)
    assert np.array_equal(_run(pipe), first)  # the next call starts from a clean cache


def test_first_block_cache_in_diffusers_pixart_sigma_pipeline():
    """diffusers' PixArtSigmaPipeline sets no cache context; the model's run hook provides one."""
    pipe = _pipe(pipeline_cls=PixArtSigmaPipeline)
    kwargs = dict(clean_caption=False, max_sequence_length=16)
    expected = _run(pipe, **kwargs)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.0))
    assert np.array_equal(_run(pipe, **kwargs), expected)


def test_a_new_run_starts_from_a_clean_cache_outside_a_pipeline():
    """Called in a loop of one's own (no pipeline to reset the hooks), a timestep above the last starts a new run."""
    model = _pipe().transformer
    model.enable_cache(_taylorseer(cache_interval=2))  # steps 0, 1, 3 computed, step 2 extrapolated
    latents, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)

    def run() -> list[torch.Tensor]:
        timesteps = [torch.full((2,), t) for t in (999, 700, 400, 100)]
        return [model(latents, encoder_hidden_states=text, timestep=t, return_dict=False)[0] for t in timesteps]

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))  # without the reset, step 0 would be extrapolated


def test_enable_cache_twice_is_an_error_and_the_config_is_not_modified():
    model = _pipe().transformer
    config = PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2)
    model.enable_cache(config)
    assert config.current_timestep_callback is None
    with pytest.raises(ValueError, match="already enabled"):
        model.enable_cache(FirstBlockCacheConfig())


# ----- attention caches: Pyramid Attention Broadcast, FasterCache (need DiTAttention to be an AttentionModuleMixin)
def test_pyramid_attention_broadcast_hooks_our_attention():
    pipe = _pipe()
    config = PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, cross_attention_block_skip_range=3,
        spatial_attention_timestep_skip_range=ALWAYS, cross_attention_timestep_skip_range=ALWAYS,
    )  # fmt: skip
    pipe.transformer.enable_cache(config)
    assert _hooked(pipe.transformer, "pyramid_attention_broadcast") == 2 * LAYERS  # before: 0
    runs = _self_attentions_run(pipe)
    _run(pipe)
    assert runs == [STEPS // 2] * LAYERS  # every other step


def test_pyramid_attention_broadcast_outside_its_window_is_exact():
    config = PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=NEVER
    )
    _cached_equals_uncached(_pipe(), config)


def _faster_cache(**overrides) -> FasterCacheConfig:
    settings = dict(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=ALWAYS,
        unconditional_batch_skip_range=2, unconditional_batch_timestep_skip_range=ALWAYS,
        attention_weight_callback=lambda _: 0.5,
    )  # fmt: skip
    return FasterCacheConfig(**{**settings, **overrides})


def test_faster_cache_skips_the_unconditional_batch():
    pipe = _pipe()
    batches = []
    pipe.transformer.pos_embed.register_forward_pre_hook(lambda _, args: batches.append(args[0].shape[0]))
    pipe.transformer.enable_cache(_faster_cache(spatial_attention_block_skip_range=None))
    images = _run(pipe)
    assert batches == [2, 1] * (STEPS // 2)  # the CFG batch, then the conditional half only
    assert np.isfinite(images).all()


def test_faster_cache_hooks_our_attention():
    """FasterCache reuses self-attention on the steps that skip the unconditional batch (every other one here)."""
    pipe = _pipe()
    pipe.transformer.enable_cache(_faster_cache())
    assert _hooked(pipe.transformer, "faster_cache_block") == LAYERS  # self-attention only; before: 0
    runs = _self_attentions_run(pipe)
    _run(pipe)
    assert runs == [STEPS // 2] * LAYERS


def test_faster_cache_outside_its_windows_is_exact():
    config = _faster_cache(spatial_attention_timestep_skip_range=NEVER, unconditional_batch_timestep_skip_range=NEVER)
    _cached_equals_uncached(_pipe(), config)


# ----- TaylorSeer, MagCache ------------------------------------------------------------------------------------------
def _taylorseer(cache_interval: int) -> TaylorSeerCacheConfig:
    """TaylorSeer's lite mode: blocks skipped, the output projection ``proj_out`` extrapolated."""
    return TaylorSeerCacheConfig(
        cache_interval=cache_interval, disable_cache_before_step=2, use_lite_mode=True,
        taylor_factors_dtype=torch.float32,
    )  # fmt: skip


@pytest.mark.parametrize("name", BACKBONES)
def test_taylorseer_lite_predicts_steps_without_the_blocks(name):
    pipe = _pipe(name)
    pipe.transformer.enable_cache(_taylorseer(cache_interval=2))
    assert _hooked(pipe.transformer, "taylorseer_cache") == LAYERS + 1  # the blocks and proj_out
    runs = _blocks_run(pipe)
    first = _run(pipe)
    assert runs == [4] * LAYERS  # steps 0, 1 (warm-up), 3 and 5 computed; 2 and 4 extrapolated
    assert np.isfinite(first).all() and np.array_equal(_run(pipe), first)


def test_taylorseer_computing_every_step_is_exact():
    _cached_equals_uncached(_pipe(), _taylorseer(cache_interval=1))


def test_mag_cache_calibration_is_exact_and_skipping_saves_blocks():
    pipe = _pipe()
    _cached_equals_uncached(pipe, MagCacheConfig(calibrate=True, num_inference_steps=STEPS))
    config = MagCacheConfig(mag_ratios=[1.0] * STEPS, num_inference_steps=STEPS, retention_ratio=0.0, max_skip_steps=1)
    pipe.transformer.enable_cache(config)
    runs = _blocks_run(pipe)
    assert np.isfinite(_run(pipe)).all()
    assert runs == [STEPS // 2] * LAYERS  # every other step reuses the residual of the last computed one

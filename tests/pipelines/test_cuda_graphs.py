"""Sampling under CUDA graphs (``pipe.enable_cuda_graphs()``), its bookkeeping on the CPU with the recording backend:
one capture per key, static buffers reused, a new capture for each new size / batch / CFG switch / LoRA scale /
ControlNet step, the same output as eager for every backbone, and the eager fallback with one warning."""

import pytest
import torch
from diffusers.hooks import FirstBlockCacheConfig
from diffusers.utils.testing_utils import CaptureLogger
from peft import LoraConfig

from dit import ControlNetAdapter
from dit.pipelines import ControlNetPipeline, TextToImagePipeline
from dit.pipelines import cuda_graphs as graphs_module
from dit.pipelines.cuda_graphs import CUDAGraphBackend, EagerReplayBackend, capture_blocker
from tests.tiny import FORWARD_VARIANTS, class_pipeline, randomize_, tiny_t5, tiny_tokenizer, tiny_vae, variant_model

PROMPT = "a large red circle on the left, on a white background"


def _pipe(transformer=None, cls=TextToImagePipeline, **components) -> TextToImagePipeline:
    """A tiny text pipeline (fp32, CPU) around ``transformer`` (default: the Σ-style PixArt variant)."""
    transformer = transformer if transformer is not None else variant_model("sigma-mask")
    randomize_(transformer, std=0.05).eval()
    pipe = cls(tokenizer=tiny_tokenizer(), text_encoder=tiny_t5(), vae=tiny_vae(), transformer=transformer,
               scheduler=None, **components)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latents(pipe, steps: int = 3, **kwargs) -> torch.Tensor:
    kwargs = {"height": 16, "width": 16, "guidance_scale": 4.5, "max_sequence_length": 12, **kwargs}
    return pipe(PROMPT, num_inference_steps=steps, output_type="latent", use_resolution_binning=False,
                generator=torch.Generator().manual_seed(0), **kwargs).images  # fmt: skip


def _recording(pipe, **kwargs) -> EagerReplayBackend:
    backend = EagerReplayBackend()
    pipe.enable_cuda_graphs(backend=backend, **kwargs)
    return backend


def test_one_capture_per_key_replayed_at_every_step_with_the_same_buffers():
    pipe = _pipe()
    expected = _latents(pipe, steps=20)
    backend = _recording(pipe)
    assert torch.equal(_latents(pipe, steps=20), expected)
    assert (backend.captures, backend.replays) == (1, 20)  # CFG batch: 20 steps, one denoiser call each
    (entry,) = pipe.cuda_graphs.graphs.values()
    pointers = [buffer.data_ptr() for buffer in entry.inputs]
    output = entry.call.output.data_ptr()
    assert torch.equal(_latents(pipe, steps=20), expected)
    assert (backend.captures, backend.replays) == (1, 40)
    (again,) = pipe.cuda_graphs.graphs.values()
    assert again is entry and [buffer.data_ptr() for buffer in again.inputs] == pointers
    assert again.call.output.data_ptr() == output


def test_a_new_size_batch_or_cfg_switch_captures_once_each():
    pipe = _pipe()
    calls = [  # (call, total captures after it)
        ({}, 1),
        ({}, 1),
        ({"width": 24}, 2),  # another latent size
        ({"num_images_per_prompt": 2}, 3),  # another batch
        ({"guidance_scale": 1.0}, 4),  # no CFG batch
        ({}, 4),  # the first key again
    ]
    expected = [_latents(pipe, **call) for call, _ in calls]
    backend = _recording(pipe)
    for (call, captures), eager in zip(calls, expected):
        assert torch.equal(_latents(pipe, **call), eager), call
        assert backend.captures == captures, call


def test_at_most_max_graphs_are_kept_least_recently_used_first():
    pipe = _pipe()
    backend = _recording(pipe, max_graphs=2)
    for width in (16, 24, 32, 16):  # 16 was dropped when 32 came
        _latents(pipe, steps=1, width=width)
    assert backend.captures == 4 and len(pipe.cuda_graphs.graphs) == 2
    _latents(pipe, steps=1, width=32)
    assert backend.captures == 4
    with pytest.raises(ValueError, match="max_graphs must be an int >= 1"):
        pipe.enable_cuda_graphs(max_graphs=0)


@pytest.mark.parametrize("variant", FORWARD_VARIANTS)
def test_every_backbone_gives_the_eager_output_exactly(variant):
    pipe = _pipe(variant_model(variant))
    expected = _latents(pipe, width=24)
    backend = _recording(pipe)
    assert torch.equal(_latents(pipe, width=24), expected)
    assert (backend.captures, backend.replays) == (1, 3)


def test_class_pipeline_gives_the_eager_output_exactly():
    pipe = class_pipeline()
    run = dict(num_inference_steps=3, output_type="latent", height=16, width=24, use_resolution_binning=False)
    expected = pipe([1, "goldfish"], generator=torch.Generator().manual_seed(0), **run).images
    backend = _recording(pipe)
    for _ in range(2):
        assert torch.equal(pipe([1, "goldfish"], generator=torch.Generator().manual_seed(0), **run).images, expected)
    assert (backend.captures, backend.replays) == (1, 6)


def _lora(pipe) -> None:
    pipe.transformer.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v"]))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, parameter in pipe.transformer.named_parameters():
            if "lora_" in name:
                parameter.normal_(0.0, 0.2)


def test_a_lora_scale_change_captures_and_a_lora_state_change_recaptures():
    pipe = _pipe()
    _lora(pipe)
    half, full = ({"cross_attention_kwargs": {"scale": s}} for s in (0.5, 1.0))
    expected = {"half": _latents(pipe, **half), "full": _latents(pipe, **full)}
    assert not torch.equal(expected["half"], expected["full"])
    backend = _recording(pipe)
    assert torch.equal(_latents(pipe, **half), expected["half"]) and backend.captures == 1
    assert torch.equal(_latents(pipe, **full), expected["full"]) and backend.captures == 2
    assert torch.equal(_latents(pipe, **half), expected["half"]) and backend.captures == 2
    pipe.transformer.disable_adapters()  # the graphs read the LoRA layers: a new state drops them
    base = _latents(pipe, **half)
    assert backend.captures == 3 and len(pipe.cuda_graphs.graphs) == 1
    pipe.disable_cuda_graphs()
    assert torch.equal(_latents(pipe, **half), base) and pipe.cuda_graphs is None and backend.captures == 3


def test_weights_that_moved_drop_the_graphs():
    pipe = _pipe()
    backend = _recording(pipe)
    expected = _latents(pipe)
    pipe.transformer.to(torch.float64).to(torch.float32)  # same values, new storage: a graph would read freed memory
    assert torch.equal(_latents(pipe), expected) and backend.captures == 2


def controlled_pipe() -> tuple[ControlNetPipeline, dict]:
    """A ControlNet pipeline with two adapters and a call whose active adapters by step are [1], [0, 1], [0], none."""
    transformer = variant_model("sigma-mask")
    adapters = [ControlNetAdapter.from_transformer(transformer, num_blocks=1).eval() for _ in range(2)]
    for seed, adapter in enumerate(adapters):
        torch.manual_seed(seed)
        with torch.no_grad():
            adapter.before_proj.weight.normal_(0.0, 0.3)
            adapter.controlnet_blocks[0].after_proj.weight.normal_(0.0, 0.3)
    pipe = _pipe(transformer, cls=ControlNetPipeline, controlnet=adapters)
    control = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    run = dict(steps=4, control_image=[control, control], controlnet_conditioning_scale=[1.0, 0.5],
               control_guidance_start=[0.25, 0.0], control_guidance_end=[0.75, 0.5])  # fmt: skip
    return pipe, run


def test_controlnet_captures_each_set_of_active_adapters():
    pipe, run = controlled_pipe()
    expected = _latents(pipe, **run)
    backend = _recording(pipe)
    for _ in range(2):
        assert torch.equal(_latents(pipe, **run), expected)
    assert (backend.captures, backend.replays) == (4, 8)
    without = _latents(pipe, **{**run, "controlnet_conditioning_scale": [0.0, 0.0]})
    assert not torch.equal(without, expected) and backend.captures == 4  # no adapter: step 4's base graph


def test_on_the_cpu_the_real_backend_samples_eagerly_with_one_warning():
    pipe = _pipe()
    expected = _latents(pipe)
    pipe.enable_cuda_graphs()
    assert isinstance(pipe.cuda_graphs.backend, CUDAGraphBackend)
    with CaptureLogger(graphs_module.logger) as captured:
        assert torch.equal(_latents(pipe), expected) and torch.equal(_latents(pipe), expected)
    assert captured.out.count("CUDA graphs are enabled") == 1
    assert "runs its denoiser eagerly: the transformer is on cpu, and CUDA graphs need a CUDA device" in captured.out
    assert not pipe.cuda_graphs.graphs


def test_a_step_cache_samples_eagerly_with_one_warning():
    pipe = _pipe()
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    expected = _latents(pipe, steps=4)
    backend = _recording(pipe)
    with CaptureLogger(graphs_module.logger) as captured:
        assert torch.equal(_latents(pipe, steps=4), expected) and torch.equal(_latents(pipe, steps=4), expected)
    assert captured.out.count("CUDA graphs are enabled") == 1
    assert "step cache FirstBlockCacheConfig (enable_cache)" in captured.out and backend.captures == 0
    pipe.transformer.disable_cache()
    _latents(pipe, steps=1)
    assert backend.captures == 1


def test_hooks_that_run_on_the_host_are_named():
    from accelerate.hooks import ModelHook, add_hook_to_module

    model = variant_model("sigma-mask")
    assert capture_blocker([model]) is None
    handle = model.transformer_blocks[0].register_forward_hook(lambda *args: None)
    assert "PixArtTransformer.transformer_blocks.0 has torch forward hooks" in capture_blocker([model])
    handle.remove()
    add_hook_to_module(model, ModelHook())
    assert "accelerate hook (model CPU offload" in capture_blocker([model])


def test_an_input_that_cannot_key_a_graph_is_named():
    graphs = _pipe().enable_cuda_graphs(backend=EagerReplayBackend()).cuda_graphs
    with pytest.raises(TypeError, match=r"The denoiser input \{1\} \(set\) cannot key a CUDA graph"):
        graphs(lambda x, y: x, {"x": torch.ones(1), "y": {1}})

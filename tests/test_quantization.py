"""Quantized weights (dit.quantization): every backbone loads quantized through from_pretrained close to
bf16, quantized folders round-trip as safetensors, pipelines quantize every component they are asked to (the
text encoder too) and sample, and every unsupported combination is a named error before loading."""

import importlib.util

import numpy as np
import pytest
import torch

from dit import quantization as q
from dit.microshapes.shipped import default_model
from dit.pipelines import ClassToImagePipeline, ControlNetPipeline, TextToImagePipeline
from dit.quantization import is_quantized, model_quantization_config, quantization_config, quantize_
from tests.tiny import FORWARD_VARIANTS, class_pipeline, variant_inputs, variant_model

pytest.importorskip("torchao", reason="quantization needs the [quantization] extra (torchao, optimum-quanto)")
pytest.importorskip("optimum.quanto", reason="quantization needs the [quantization] extra (torchao, optimum-quanto)")

#: Relative L2 error of a quantized backbone's output against the same weights in bf16 (measured: int8 0.5-3%,
#: float8 about 5%; a model left unquantized gives 0, a broken one about 1).
INT8_ERROR, FLOAT8_ERROR = 0.06, 0.12
SCHEMES = [("torchao", "int8_weight_only", INT8_ERROR), ("quanto", "int8_weight_only", INT8_ERROR)]
MORE_SCHEMES = [("torchao", "int8_dynamic", INT8_ERROR), ("torchao", "float8_weight_only", FLOAT8_ERROR),
                ("quanto", "float8_weight_only", FLOAT8_ERROR)]  # fmt: skip


#: Every input width a multiple of 16, as in real checkpoints (quanto's bf16 CPU kernel crashes on
#: widths such as 24: :func:`dit.quantization.check_quantized`).
HEAD_DIM = 24  # width 48 (two heads): a multiple of 16, and of 3 for micro-conditions


@pytest.fixture(scope="module")
def saved_variants(tmp_path_factory):
    """Every backbone variant saved once (fp32)."""
    root = tmp_path_factory.mktemp("variants")
    for name in FORWARD_VARIANTS:
        model = variant_model(name, HEAD_DIM)
        _randomize(model)
        model.save_pretrained(root / name)
    return root


def _randomize(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)


def _forward(model, name):
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() and k != "timestep" else v
              for k, v in variant_inputs(name).items() if isinstance(v, torch.Tensor)}  # fmt: skip
    added = variant_inputs(name).get("added_cond_kwargs")
    if added:
        inputs["added_cond_kwargs"] = {k: v.to(torch.bfloat16) for k, v in added.items()}
    torch.manual_seed(0)
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0].float()


def _relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("backend,scheme,tolerance", SCHEMES, ids=[f"{b}-{s}" for b, s, _ in SCHEMES])
@pytest.mark.parametrize("name", FORWARD_VARIANTS)
def test_every_backbone_loads_quantized_close_to_bf16(saved_variants, name, backend, scheme, tolerance):
    cls = type(variant_model(name))
    reference = cls.from_pretrained(saved_variants / name, dtype=torch.bfloat16)
    config = model_quantization_config(scheme, backend)
    model = cls.from_pretrained(saved_variants / name, quantization_config=config, dtype=torch.bfloat16)
    assert is_quantized(model) and not is_quantized(reference)
    error = _relative_error(_forward(model.train(reference.training), name), _forward(reference, name))
    assert 0 < error < tolerance, error


@pytest.mark.parametrize("backend,scheme,tolerance", MORE_SCHEMES, ids=[f"{b}-{s}" for b, s, _ in MORE_SCHEMES])
def test_other_cpu_schemes(saved_variants, backend, scheme, tolerance):
    cls = type(variant_model("sigma-kv"))
    reference = cls.from_pretrained(saved_variants / "sigma-kv", dtype=torch.bfloat16)
    config = model_quantization_config(scheme, backend)
    model = cls.from_pretrained(saved_variants / "sigma-kv", quantization_config=config, dtype=torch.bfloat16)
    assert 0 < _relative_error(_forward(model, "sigma-kv"), _forward(reference, "sigma-kv")) < tolerance


@pytest.mark.parametrize("backend", ["torchao", "quanto"])
def test_quantized_folders_round_trip_as_safetensors(saved_variants, tmp_path, backend):
    cls = type(variant_model("sigma-mask"))
    config = model_quantization_config("int8_weight_only", backend)
    model = cls.from_pretrained(saved_variants / "sigma-mask", quantization_config=config, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    again = cls.from_pretrained(tmp_path, dtype=torch.bfloat16)  # the config records the quantization
    assert is_quantized(again)
    assert torch.equal(_forward(again, "sigma-mask"), _forward(model, "sigma-mask"))


def test_quantize_in_place_matches_quantized_loading(saved_variants):
    cls = type(variant_model("lit"))
    loaded = cls.from_pretrained(
        saved_variants / "lit", quantization_config=model_quantization_config(), dtype=torch.bfloat16
    )
    converted = quantize_(cls.from_pretrained(saved_variants / "lit", dtype=torch.bfloat16))
    assert is_quantized(converted)
    assert torch.equal(_forward(converted, "lit"), _forward(loaded, "lit"))
    assert quantize_(converted) is converted  # already quantized: left as it is


# ----- pipelines ---------------------------------------------------------------------------------------------
def _images(pipe, **kwargs):
    out = pipe(["a red circle", "a blue square"], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="np", clean_caption=False, **kwargs)  # fmt: skip
    return out.images


@pytest.mark.parametrize("backend", ["torchao", "quanto"])
def test_text_pipeline_quantizes_the_text_encoder_too(tmp_path, backend):
    """The strict loader handed the text encoder's config to nobody: it loaded in full precision. (The shipped
    model: the tiny pipeline's width 24 is one quanto's bf16 CPU kernel crashes on.)"""
    config = quantization_config("int8_weight_only", backend=backend)
    pipe = TextToImagePipeline.from_pretrained(default_model(), quantization_config=config, dtype=torch.bfloat16)
    assert is_quantized(pipe.transformer) and is_quantized(pipe.text_encoder) and not is_quantized(pipe.vae)
    images = _images(pipe)
    reference = _images(TextToImagePipeline.from_pretrained(default_model(), dtype=torch.bfloat16))
    assert np.isfinite(images).all() and 0 < np.abs(images - reference).mean() < 0.05
    if backend == "quanto":  # transformers cannot save a quanto model; diffusers can (round trip tested above)
        with pytest.raises(ValueError, match="quantized with quanto and is not serializable"):
            pipe.save_pretrained(tmp_path)
        return
    pipe.save_pretrained(tmp_path)  # a quantized pipeline folder, read back quantized
    again = TextToImagePipeline.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert is_quantized(again.transformer) and is_quantized(again.text_encoder)
    np.testing.assert_array_equal(_images(again), images)


def test_quanto_widths_that_crash_torch_are_refused(tiny_pipeline_folder):
    """torch._weight_int8pack_mm segfaults for bf16 inputs 24 wide (the tiny pipeline): a named error instead."""
    config = quantization_config("int8_weight_only", ["transformer"], backend="quanto")
    with pytest.raises(ValueError, match=r"quanto int8 would crash the CPU forward of \d+ layer\(s\).*attn1.to_q"):
        TextToImagePipeline.from_pretrained(tiny_pipeline_folder, quantization_config=config, dtype=torch.bfloat16)
    model = TextToImagePipeline.from_pretrained(tiny_pipeline_folder).transformer
    with pytest.raises(ValueError, match="quanto int8 would crash"):
        quantize_(model.to(torch.bfloat16), backend="quanto")


def test_class_pipeline_quantized(tmp_path):
    class_pipeline().save_pretrained(tmp_path)
    config = quantization_config("int8_weight_only", ["transformer"])
    pipe = ClassToImagePipeline.from_pretrained(tmp_path, quantization_config=config, dtype=torch.bfloat16)
    assert is_quantized(pipe.transformer)
    images = pipe([1, 2], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape[0] == 2 and np.isfinite(images).all()


def test_a_component_the_pipeline_lacks_is_refused(tmp_path, monkeypatch):
    class_pipeline().save_pretrained(tmp_path)
    monkeypatch.setattr("dit.pipelines.sampling.strict_components", lambda *a: pytest.fail("loaded before the check"))
    with pytest.raises(ValueError, match=r"names \['text_encoder'\], which this pipeline does not have"):
        ClassToImagePipeline.from_pretrained(tmp_path, quantization_config=quantization_config("int8_weight_only"))


# ----- named errors -------------------------------------------------------------------------------------------
BAD = {
    "backend": (("int8_weight_only", "gptq"), ValueError, r"Unknown quantization backend 'gptq': use one of"),
    "scheme": (("int4_weight_only", "torchao"), ValueError, r"'int4_weight_only' is a scheme of \['quanto'\]"),
    "typo": (("int8wo", "torchao"), ValueError, r"torchao offers \['float8_dynamic', 'float8_weight_only'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_schemes_are_named(case):
    args, error, message = BAD[case]
    with pytest.raises(error, match=message):
        quantization_config(*args[:1], backend=args[1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only errors")
def test_cuda_only_schemes_say_so_on_the_cpu(monkeypatch):
    with pytest.raises(ValueError, match="float8_dynamic needs a CUDA GPU with compute capability >= 8.9"):
        model_quantization_config("float8_dynamic")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())  # as if bitsandbytes were installed
    with pytest.raises(ValueError, match="bitsandbytes int8 quantizes on a CUDA GPU only"):
        model_quantization_config("int8", "bitsandbytes")


def test_a_missing_backend_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name.startswith("optimum") else real(name)
    )
    with pytest.raises(ImportError, match=r"pip install 'dit-toolkit\[quantization\]'"):
        quantization_config("int8_weight_only", backend="quanto")


def test_components_are_resolved_by_library():
    config = quantization_config("int8_weight_only", ["transformer", "text_encoder", "vae"])
    import diffusers
    import transformers

    assert isinstance(q.component_quantization(config, "transformer", True), diffusers.TorchAoConfig)
    assert isinstance(q.component_quantization(config, "text_encoder", False), transformers.TorchAoConfig)
    assert q.component_quantization(config, "tokenizer", False) is None
    assert q.component_quantization(None, "transformer", True) is None
    with pytest.raises(ValueError, match="at least one component"):
        quantization_config("int8_weight_only", [])


def test_controlnet_pipeline_quantizes_the_adapter_and_runs_the_preset(tmp_path):
    from tests.pipelines.test_controlnet_pipeline import _adapter, _parts, _run, _square, _transformer

    transformer = _transformer()
    ControlNetPipeline(transformer=transformer, controlnet=_adapter(transformer), **_parts()).save_pretrained(tmp_path)
    config = quantization_config("int8_weight_only", ["transformer", "controlnet"])
    pipe = ControlNetPipeline.from_pretrained(tmp_path, quantization_config=config, dtype=torch.bfloat16)
    assert is_quantized(pipe.transformer) and is_quantized(pipe.controlnet)
    reference = _run(ControlNetPipeline.from_pretrained(tmp_path, dtype=torch.bfloat16), control_image=_square())
    images = _run(pipe, control_image=_square())
    assert 0 < np.abs(images - reference).mean() < 0.05
    preset = ControlNetPipeline.from_pretrained(tmp_path, low_memory=True)
    assert preset.controlnet.dtype == torch.bfloat16 and is_quantized(preset.text_encoder)
    assert np.abs(_run(preset, control_image=_square()) - reference).mean() < 0.05


def test_float8_weight_only_in_fp16_is_refused_before_loading(saved_variants):
    """torchao's float8 weight-only matmul fails in fp16 at the first step ("expected m1 and m2 to have the same
    dtype"): a named error at load instead."""
    cls = type(variant_model("lit"))
    config = model_quantization_config("float8_weight_only")
    with pytest.raises(ValueError, match="float8_weight_only computes in bfloat16 or float32, not float16"):
        cls.from_pretrained(saved_variants / "lit", quantization_config=config, dtype=torch.float16)


def test_quanto_pipeline_folder_round_trips(tmp_path):
    """diffusers' models save quanto weights; read back memory-mapped they would crash quanto's CPU kernel, so they
    are read into memory (the transformer and the VAE alike)."""
    config = quantization_config("int8_weight_only", ["transformer", "vae"], backend="quanto")
    pipe = TextToImagePipeline.from_pretrained(default_model(), quantization_config=config, dtype=torch.bfloat16)
    images = _images(pipe)
    pipe.save_pretrained(tmp_path)
    again = TextToImagePipeline.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert is_quantized(again.transformer) and is_quantized(again.vae) and not is_quantized(again.text_encoder)
    np.testing.assert_array_equal(_images(again), images)

"""Pipeline behaviours diffusers' own pipeline tests check (PixArt's test files run with our classes): a pipeline
saved as pickle loads back and logs every component, ``torch_dtype`` as a dict or under its new name ``dtype`` reaches
every component, ``encode_prompt`` works in a pipeline of text components only, and PixArt-α's deprecated
``mask_feature`` gives diffusers' FutureWarning."""

from __future__ import annotations

import contextlib
import io
import logging as std_logging

import numpy as np
import pytest
import torch
from diffusers.utils import logging
from diffusers.utils.source_code_parsing_utils import ReturnNameVisitor

from dit import PixArtTransformer
from dit.pipelines import TextToImagePipeline
from tests.tiny import SIGMA, randomize_, tiny_t5, tiny_tokenizer, tiny_vae

PROMPT = "a large red circle on the left"
#: diffusers' PixArt fast tests: transformer first (the key test_torch_dtype_dict specifies)
COMPONENT_ORDER = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer")


def _components(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    transformer = randomize_(PixArtTransformer(**SIGMA), std=0.05).eval()
    return dict(transformer=transformer, vae=tiny_vae(), scheduler=None, text_encoder=tiny_t5(),
                tokenizer=tiny_tokenizer())  # fmt: skip


def _run(pipe: TextToImagePipeline, **kwargs) -> np.ndarray:
    kwargs = {"num_inference_steps": 2, "output_type": "np", "use_resolution_binning": False, "guidance_scale": 5.0,
              "max_sequence_length": 12, "generator": torch.Generator().manual_seed(0), **kwargs}  # fmt: skip
    return pipe(**kwargs).images


@contextlib.contextmanager
def _capture(logger_name: str):
    """The text logged at INFO and above to a diffusers logger (as diffusers' ``CaptureLogger`` reads it)."""
    logger, stream = logging.get_logger(logger_name), io.StringIO()
    handler, level = std_logging.StreamHandler(stream), logger.level
    logger.addHandler(handler)
    logger.setLevel(std_logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture(params=[False, True], ids=["pickle", "safetensors"])
def saved_folder(request, tmp_path):
    """A pipeline folder saved as pickle (``safe_serialization=False``, as diffusers' save/load tests save it) or
    as safetensors."""
    pipe = TextToImagePipeline(**_components())
    with pytest.warns(UserWarning, match="pickle") if not request.param else contextlib.nullcontext():
        pipe.save_pretrained(tmp_path, safe_serialization=request.param)
    return tmp_path


# ----- pickle and the loading log ------------------------------------------------------------------------------
def test_saved_pipeline_loads_back_and_logs_every_component(saved_folder):
    """diffusers' test_save_load_local: pickle loads without an opt-in, and "Loaded {name} as {class} ..." is
    logged for each component."""
    with _capture("diffusers.pipelines.pipeline_utils") as log:
        pipe = TextToImagePipeline.from_pretrained(saved_folder)
    text = log.getvalue()
    for name, component in pipe.components.items():
        expected = f"Loaded {name} as {type(component).__name__} from `{name}` subfolder of {saved_folder}."
        assert expected in text, (name, text)
    assert np.array_equal(_run(pipe, prompt=PROMPT), _run(TextToImagePipeline(**_components()), prompt=PROMPT))


# ----- torch_dtype ----------------------------------------------------------------------------------------------
DTYPE_DICT = {"transformer": torch.bfloat16, "default": torch.float16}


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"torch_dtype": DTYPE_DICT}, DTYPE_DICT),
        ({"dtype": DTYPE_DICT}, DTYPE_DICT),  # the new name diffusers takes
        ({"dtype": torch.float16}, {"default": torch.float16}),
        ({"dtype": None, "torch_dtype": torch.float16}, {"default": torch.float16}),  # None: the other name counts
        ({"torch_dtype": {"text_encoder": torch.float16}}, {"text_encoder": torch.float16, "default": torch.float32}),
    ],
    ids=["torch_dtype-dict", "dtype-dict", "dtype", "dtype-None", "dict-without-default"],
)
def test_torch_dtype_reaches_every_component(saved_folder, kwargs, expected):
    """diffusers' test_torch_dtype_dict, and the dtype/torch_dtype names: the text encoder included."""
    pipe = TextToImagePipeline.from_pretrained(saved_folder, **kwargs)
    modules = {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}
    assert set(modules) == {"transformer", "vae", "text_encoder"}
    for name, module in modules.items():
        assert module.dtype == expected.get(name, expected["default"]), name


# ----- encode_prompt in isolation -------------------------------------------------------------------------------
def _encode_prompt_output_names() -> list[str]:
    """What diffusers' test_encode_prompt_works_in_isolation reads: the names in encode_prompt's return statements,
    the class looked up by name in ``diffusers.pipelines`` as diffusers' helper does (``import dit`` registers it)."""
    visitor = ReturnNameVisitor()
    visitor.visit(visitor.get_ast_tree(TextToImagePipeline))
    return visitor.return_names


def test_encode_prompt_works_in_isolation():
    """diffusers' test: encode with a pipeline of text components only (transformer, VAE and scheduler None), then
    sample with a pipeline without them from the outputs, named as encode_prompt's return statement names them."""
    names = _encode_prompt_output_names()
    assert names == ["prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds",
                     "negative_prompt_attention_mask"]  # fmt: skip
    components = _components()
    text_only = {k: v if k in ("text_encoder", "tokenizer") else None for k, v in components.items()}
    with torch.no_grad():
        outputs = TextToImagePipeline(**text_only).encode_prompt(
            PROMPT, do_classifier_free_guidance=True, device="cpu", max_sequence_length=12
        )
    embeds = dict(zip(names, outputs, strict=True))
    without_text = {k: None if k in ("text_encoder", "tokenizer") else v for k, v in components.items()}
    isolated = _run(TextToImagePipeline(**without_text), **embeds)
    assert np.allclose(isolated, _run(TextToImagePipeline(**components), prompt=PROMPT), atol=1e-4)


# ----- mask_feature ---------------------------------------------------------------------------------------------
def test_mask_feature_gives_diffusers_future_warning():
    """PixArtAlphaPipeline deprecates mask_feature (unused): the same FutureWarning, in diffusers' words."""
    pipe = TextToImagePipeline(**_components())
    with pytest.warns(FutureWarning, match="The use of `mask_feature` is deprecated"):
        pipe.encode_prompt(PROMPT, device="cpu", max_sequence_length=12, mask_feature=True)
    with pytest.warns(FutureWarning, match="no longer used in any computation"):
        _run(pipe, prompt=PROMPT, num_inference_steps=1, mask_feature=False)

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if not torch.cuda.is_available():  # the Triton kernels' tests run through the interpreter (read when triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_pipeline_folder(tmp_path_factory):
    """A saved tiny text-to-image pipeline folder (:func:`dit.tiny.tiny_pipeline`), shared by the command tests."""
    from dit.tiny import tiny_pipeline

    folder = tmp_path_factory.mktemp("tiny-pipeline")
    tiny_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture
def no_loading(monkeypatch):
    """Any pipeline load fails the test: a bad value must be refused before the model loads."""
    from dit.pipelines import ClassToImagePipeline, TextToImagePipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad value was refused")

    for cls in (ClassToImagePipeline, TextToImagePipeline):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

"""CUDA-only tests (marker ``gpu``; ``pytest -m gpu`` on a GPU machine). Skipped without CUDA.

Deterministic algorithms are on and TF32 off in every test here (cuBLAS workspace fixed before CUDA starts), so the trainer's
exactness tests (bit-exact resume above all) compare runs of the same ops in the same order on one GPU. Where an op
has no deterministic CUDA kernel, torch warns (``warn_only``) instead of failing, and the test shows whether the
result still matches exactly.
"""

import os

import pytest
import torch

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic():
    if not torch.cuda.is_available():
        yield
        return
    previous = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
                torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)  # fmt: skip
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    # fp32 as on the CPU: cuDNN convolutions take TF32 by default, which the exactness tolerances do not allow
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.use_deterministic_algorithms(previous[0])
    torch.backends.cudnn.benchmark = previous[1]
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous[2:]

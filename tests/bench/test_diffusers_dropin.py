"""The pieces of bench/diffusers_dropin.py that run without a diffusers tree: the helper modules followed through
imports, the tree's version check, the substituting conftest and the JSON summary of a junit report."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import diffusers_dropin as dropin  # noqa: E402


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))


@pytest.fixture
def fake_tree(tmp_path):
    """A diffusers-shaped tree: the listed test files, helpers imported relatively and absolutely, and bystanders."""
    helpers = {
        "setup.py": 'setup(name="diffusers", version="9.8.7")\n',
        "tests/__init__.py": "",
        "tests/conftest.py": "",
        "tests/testing_utils.py": "import torch\n",
        "tests/unused.py": "",
        "tests/models/__init__.py": "",
        "tests/models/testing_utils/__init__.py": "from .common import ModelTesterMixin\n",
        "tests/models/testing_utils/common.py": "from ...testing_utils import torch_device\n",
        "tests/models/transformers/__init__.py": "",
        "tests/models/transformers/test_models_other.py": "",
        "tests/pipelines/__init__.py": "",
        "tests/pipelines/pipeline_params.py": "",
        "tests/pipelines/test_pipelines_common.py": "from tests.models.unets import helper\n",
        "tests/models/unets/__init__.py": "",
        "tests/models/unets/helper.py": "",
    }
    tests = {name: "from ...testing_utils import slow\nfrom ..testing_utils import ModelTesterMixin\n"
             if "models" in name else "from ..pipeline_params import X\nfrom ..test_pipelines_common import Y\n"
             for name in dropin.TEST_FILES}  # fmt: skip
    packages = {str(Path(name).parent / "__init__.py"): "" for name in dropin.TEST_FILES}
    _write(tmp_path, {**helpers, **packages, **tests})
    return tmp_path


def test_the_helpers_are_followed_through_imports_and_nothing_else_is_copied(fake_tree):
    copied = {str(p.relative_to(fake_tree)) for p in dropin.files_to_copy(fake_tree, dropin.TEST_FILES)}
    assert set(dropin.TEST_FILES) <= copied
    for helper in ("tests/testing_utils.py", "tests/models/testing_utils/__init__.py",
                   "tests/models/testing_utils/common.py", "tests/pipelines/pipeline_params.py",
                   "tests/pipelines/test_pipelines_common.py", "tests/models/unets/helper.py",
                   "tests/models/unets/__init__.py", "tests/conftest.py", "tests/__init__.py"):  # fmt: skip
        assert helper in copied, helper
    assert "tests/unused.py" not in copied and "tests/models/transformers/test_models_other.py" not in copied


def test_a_tree_of_another_version_is_refused_with_how_to_get_the_right_one(fake_tree):
    with pytest.raises(SystemExit, match=r"git clone --branch v1\.2\.3 https://github.com/huggingface/diffusers"):
        dropin.check_tree(fake_tree, "1.2.3", allow_other_version=False)
    assert dropin.check_tree(fake_tree, "1.2.3", allow_other_version=True) == "9.8.7"
    (fake_tree / dropin.TEST_FILES[-1]).unlink()
    with pytest.raises(SystemExit, match="lacks tests/pipelines/pag/test_pag_pixart_sigma.py"):
        dropin.check_tree(fake_tree, "9.8.7", allow_other_version=False)


def test_the_conftest_puts_our_classes_under_diffusers_names_before_the_tests_import_them(tmp_path):
    """Run in a separate pytest: the conftest replaces names in the diffusers module for the whole process."""
    stand_in = tmp_path / "stand_in"
    (tmp_path / "conftest.py").write_text(
        dropin.conftest_text(dropin.SUBSTITUTES["ours"], {"org/name": str(stand_in)})
    )
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_names.py").write_text(textwrap.dedent("""
        import pytest
        from diffusers import PixArtAlphaPipeline, PixArtSigmaPAGPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel
        from transformers import AutoConfig

        from dit import PixArtTransformer
        from dit.pipelines import TextToImagePipeline


        def test_names(tmp_path):
            assert PixArtTransformer2DModel is PixArtTransformer
            assert PixArtAlphaPipeline is TextToImagePipeline and PixArtSigmaPipeline is TextToImagePipeline
            assert PixArtSigmaPAGPipeline.__module__.startswith("diffusers.")


        def test_the_stand_in_is_read_for_its_hub_name_only():
            with pytest.raises(OSError, match="stand_in"):  # the folder does not exist: its path is in the error
                AutoConfig.from_pretrained("org/name")
    """))  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
    assert "2 passed" in result.stdout


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest">
  <testcase file="{m}" classname="tests.models.transformers.test_models_pixart_transformer2d.TestA" name="test_ok"/>
  <testcase file="{m}" classname="tests.models.transformers.test_models_pixart_transformer2d.TestA" name="test_hub">
    <failure message="OSError: Cannot reach https://huggingface.co/x">long text</failure></testcase>
  <testcase file="{m}" classname="tests.models.transformers.test_models_pixart_transformer2d.TestA" name="test_gap">
    <failure message="AssertionError: 1 != 2&#10;second line">long text</failure></testcase>
  <testcase file="{s}" classname="tests.pipelines.pixart_sigma.test_pixart.PixArtSigmaFastTests" name="test_inference">
    <failure message="AssertionError: max_diff 0.2">slice</failure></testcase>
  <testcase file="{s}" classname="tests.pipelines.pixart_sigma.test_pixart.PixArtSigmaFastTests" name="test_skip">
    <skipped message="needs a GPU"/></testcase>
  <testcase file="{p}" classname="tests.pipelines.pag.test_pag_pixart_sigma" name="tests.pipelines.pag.test_pag_pixart_sigma">
    <error message="collection failure">ImportError</error></testcase>
</testsuite></testsuites>
"""


@pytest.mark.parametrize("control_fails", [True, False], ids=["diffusers-misses-the-slice-too", "diffusers-passes"])
def test_the_summary_splits_hub_only_failures_from_the_rest(tmp_path, control_fails):
    """A slice test counts as hub-only only when diffusers' own classes fail it too under the stand-in."""
    m, _, s, p = dropin.TEST_FILES
    (tmp_path / "junit.xml").write_text(JUNIT.format(m=m, s=s, p=p))
    files = dropin.parse_junit(tmp_path / "junit.xml")
    assert (files[m]["passed"], files[m]["failed"], files[m]["skipped"]) == (1, 2, 0)
    assert (files[s]["passed"], files[s]["failed"], files[s]["skipped"]) == (0, 1, 1)
    assert files[p]["failures"][0]["id"] == p  # a collection error: the file itself
    slice_id = f"{s}::PixArtSigmaFastTests::test_inference"
    assert dropin.slice_failures(files) == [slice_id]
    summary = dropin.summarize(files, {slice_id: "AssertionError: max_diff 0.2" if control_fails else "passed"})
    hub = [f"{m}::TestA::test_hub"] + ([slice_id] if control_fails else [])
    assert summary["hub_only_ids"] == hub
    other = {f["id"]: f["reason"] for f in summary["other_failures"]}
    assert other[f"{m}::TestA::test_gap"] == "AssertionError: 1 != 2"  # one line
    assert (slice_id in other) is not control_fails and p in other
    assert (summary["passed"], summary["failed"], summary["skipped"]) == (1, 4, 1)
    assert summary["hub_only"] + summary["other"] == summary["failed"]
    assert all("text" not in f for entry in files.values() for f in entry["failures"])

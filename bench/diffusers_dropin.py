"""diffusers' own PixArt tests run against our classes: the drop-in figure of issue 32.

    git clone --branch vX.Y.Z https://github.com/huggingface/diffusers /tmp/diffusers   # X.Y.Z: the installed version
    python bench/diffusers_dropin.py --diffusers /tmp/diffusers [--out bench/results/diffusers_dropin_cpu.json]

Takes :data:`TEST_FILES` from a diffusers tree (a checkout, or ``git archive`` of its ``tests/``) with every helper
module they import (followed through their imports: ``tests/testing_utils.py``, ``tests/models/testing_utils/``,
``tests/pipelines/test_pipelines_common.py``, ``pipeline_params.py``, ...), into a temporary folder whose root
``conftest.py`` substitutes our classes for diffusers' names before the test modules import them:

- ``PixArtTransformer2DModel`` -> :class:`dit.PixArtTransformer`, in every file;
- ``PixArtAlphaPipeline`` and ``PixArtSigmaPipeline`` -> :class:`dit.pipelines.TextToImagePipeline` (``--pipelines
  ours``, the default): our pipeline is what the drop-in gaps of issue 32 were about (the loading log,
  ``torch_dtype``, ``encode_prompt`` in isolation, ``mask_feature``: tests/pipelines/test_dropin_gaps.py);
- ``PixArtSigmaPAGPipeline`` stays diffusers' (we ship no PAG pipeline): its file tests our transformer under
  diffusers' PAG processors, with our pipeline where it builds the plain Σ pipeline.

``--pipelines diffusers`` keeps diffusers' pipelines and substitutes only the transformer; ``--pipelines none``
substitutes nothing (the control run: diffusers' own classes, the same stand-in text encoder).

The pipeline tests build their text encoder from ``hf-internal-testing/tiny-random-t5``. The tests run with
``HF_HUB_OFFLINE=1``: when that repository is not in the local Hugging Face cache, a stand-in (``dit.tiny``: a
word-level tokenizer and a 32-wide T5 encoder) is saved in the folder and ``AutoConfig``/``AutoTokenizer``
``.from_pretrained`` are pointed at it for that name only. The tests that compare a hard-coded image slice then
compare against the hub encoder's numbers: those that fail are rerun with diffusers' own classes under the same
stand-in (the control, ``control`` in the JSON: both reasons, with the measured difference), and count as hub-only
(``summary.hub_only``) when diffusers' classes miss the slice too, as do failures whose text is the hub's (offline
mode, files not in the cache). Everything else is ``summary.other``.

Writes the JSON to ``--out`` (``bench/results/diffusers_dropin_cpu.json`` records it): machine, the tree's and the
installed diffusers version, the substitutions, per file passed/failed/skipped, each failure with a one-line reason.
The tests run on ``OMP_NUM_THREADS=1`` (``--threads``); ``-x`` is off, so every test runs.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_out_argument, machine, write_json  # noqa: E402

NAME = "diffusers_dropin_cpu.json"
#: diffusers' PixArt model and pipeline test files (issue 32), relative to the tree's root.
TEST_FILES = (
    "tests/models/transformers/test_models_pixart_transformer2d.py",
    "tests/pipelines/pixart_alpha/test_pixart.py",
    "tests/pipelines/pixart_sigma/test_pixart.py",
    "tests/pipelines/pag/test_pag_pixart_sigma.py",
)
TINY_T5 = "hf-internal-testing/tiny-random-t5"
#: diffusers' name -> our class ("module:attribute"), per ``--pipelines`` choice.
SUBSTITUTES = {
    "ours": {
        "PixArtTransformer2DModel": "dit:PixArtTransformer",
        "PixArtAlphaPipeline": "dit.pipelines:TextToImagePipeline",
        "PixArtSigmaPipeline": "dit.pipelines:TextToImagePipeline",
    },
    "diffusers": {"PixArtTransformer2DModel": "dit:PixArtTransformer"},
    "none": {},  # the control: diffusers' own classes, under the same stand-in
}
#: Text of a failure that only the Hugging Face Hub can explain (offline mode, a file not in the cache).
HUB_TEXT = re.compile(
    r"OfflineModeIsEnabled|LocalEntryNotFoundError|HF_HUB_OFFLINE|outgoing traffic has been disabled"
    r"|couldn't connect to|cannot find the requested files in the (?:local|disk) cache|huggingface\.co",
    re.IGNORECASE,
)
#: Tests that compare the image against a hard-coded slice computed with the hub's tiny T5.
SLICE_TESTS = frozenset(
    {"test_inference", "test_inference_non_square_images", "test_inference_with_multiple_images_per_prompt",
     "test_pag_inference"}
)  # fmt: skip

CONFTEST = '''"""Written by bench/diffusers_dropin.py: our classes under diffusers' names, before any test module imports
them (a root conftest is imported first)."""

from importlib import import_module

import diffusers

SUBSTITUTES = {substitutes!r}
STAND_INS = {stand_ins!r}


def _load(target):
    module, name = target.split(":")
    return getattr(import_module(module), name)


for _name, _target in SUBSTITUTES.items():
    setattr(diffusers, _name, _load(_target))


def _redirect(owner):
    original = owner.from_pretrained.__func__

    def from_pretrained(cls, name, *args, **kwargs):
        return original(cls, STAND_INS.get(name, name), *args, **kwargs)

    owner.from_pretrained = classmethod(from_pretrained)


if STAND_INS:
    from transformers import AutoConfig, AutoTokenizer

    _redirect(AutoConfig)
    _redirect(AutoTokenizer)


def pytest_report_header(config):
    lines = [f"diffusers.{{name}} -> {{target}}" for name, target in SUBSTITUTES.items()]
    return lines + [f"{{name}} -> stand-in {{path}}" for name, path in STAND_INS.items()]


def pytest_collection_finish(session):
    for name, target in SUBSTITUTES.items():
        assert getattr(diffusers, name) is _load(target), f"diffusers.{{name}} is not {{target}}"
'''


#: Modules diffusers' test helpers import beyond the toolkit's own dependencies (diffusers' ``test`` extra).
TEST_DEPENDENCIES = ("parameterized", "requests_mock")


def check_test_dependencies() -> None:
    """Exit naming what to install when a module diffusers' test helpers import is missing."""
    import importlib.util

    missing = [name for name in TEST_DEPENDENCIES if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"diffusers' test helpers import {', '.join(missing)}: pip install {' '.join(missing)}")


def tree_version(tree: Path) -> str:
    """The diffusers version a tree declares (``setup.py``, else ``src/diffusers/__init__.py``)."""
    for path, pattern in ((tree / "setup.py", r'version="([^"]+)"'),
                          (tree / "src/diffusers/__init__.py", r'__version__ = "([^"]+)"')):  # fmt: skip
        if path.is_file() and (found := re.search(pattern, path.read_text())):
            return found.group(1)
    raise SystemExit(f"{tree} has neither setup.py nor src/diffusers/__init__.py with a version: not a diffusers tree")


def check_tree(tree: Path, installed: str, allow_other_version: bool) -> str:
    """The tree's version; exits with how to get the right tree when files are missing or the version differs."""
    clone = f"git clone --branch v{installed} https://github.com/huggingface/diffusers"
    missing = [name for name in TEST_FILES if not (tree / name).is_file()]
    if missing:
        raise SystemExit(f"{tree} lacks {', '.join(missing)}; get the installed version's tree: {clone}")
    version = tree_version(tree)
    if version != installed and not allow_other_version:
        raise SystemExit(
            f"{tree} is diffusers {version}, the installed diffusers is {installed}: the tests must match the code "
            f"they test. Get the tree with `{clone}` (or pass --allow-other-version to run them anyway)."
        )
    return version


def _module_file(tree: Path, parts: list[str]) -> Path | None:
    base = tree.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_files(tree: Path, path: Path) -> set[Path]:
    """The files of ``tree``'s ``tests`` package that ``path`` imports (relative or ``tests.`` imports)."""
    package = list(path.relative_to(tree).parent.parts)
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            targets = [base] + [base + [alias.name] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "tests":
            base = node.module.split(".")
            targets = [base] + [base + [alias.name] for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name.split(".") for a in node.names if a.name.split(".")[0] == "tests"]
        else:
            continue
        found.update(f for parts in targets if (f := _module_file(tree, parts)) is not None)
    return found


def files_to_copy(tree: Path, roots: Iterable[str]) -> list[Path]:
    """``roots``, every ``tests`` module they import (transitively), the package ``__init__.py`` files on the way
    and diffusers' ``tests/conftest.py`` (its markers and options)."""
    todo = [tree / name for name in roots] + [tree / "tests/conftest.py"]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        todo.extend(imported_files(tree, path))
        for parent in path.relative_to(tree).parents:
            if parent.parts and (init := tree / parent / "__init__.py").is_file():
                todo.append(init)
    return sorted(seen)


def conftest_text(substitutes: dict[str, str], stand_ins: dict[str, str]) -> str:
    """The root ``conftest.py`` that puts ``substitutes`` under diffusers' names and points ``stand_ins``' hub
    names at local folders."""
    return CONFTEST.format(substitutes=substitutes, stand_ins=stand_ins)


def tiny_t5_cached() -> bool:
    """Whether ``hf-internal-testing/tiny-random-t5`` is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(TINY_T5, "config.json"), str)


def save_stand_in(folder: Path) -> Path:
    """A stand-in for the tiny T5 (our ``dit.tiny`` tokenizer and a 32-wide T5 config without dropout) saved to
    ``folder``."""
    from dit.tiny import tiny_t5, tiny_tokenizer

    tiny_tokenizer(max_length=512).save_pretrained(folder)
    # no dropout: the tests build the encoder from this config in training mode and call it repeatedly
    tiny_t5(d_model=32, dropout_rate=0.0).config.save_pretrained(folder)
    return folder


def stage(tree: Path, dest: Path, substitutes: dict[str, str], stand_in: bool) -> list[str]:
    """Copy the tests and their helpers into ``dest`` with the substituting conftest; the test paths to run."""
    for path in files_to_copy(tree, TEST_FILES):
        target = dest / path.relative_to(tree)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    stand_ins = {TINY_T5: str(save_stand_in(dest / "stand_in" / "tiny-random-t5"))} if stand_in else {}
    (dest / "conftest.py").write_text(conftest_text(substitutes, stand_ins))
    (dest / "pytest.ini").write_text("[pytest]\n")
    return list(TEST_FILES)


def run_pytest(dest: Path, paths: list[str], junit: Path, threads: int, extra: list[str]) -> int:
    """pytest on ``paths`` in ``dest`` (offline, ``threads`` threads, every test run); its exit code."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.pop("PYTHONPATH", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", "-rfE",
           "--continue-on-collection-errors", f"--junitxml={junit}", *paths, *extra]  # fmt: skip
    print("$", " ".join(cmd), f"(in {dest})", flush=True)
    return subprocess.run(cmd, cwd=dest, env=env).returncode


def _reason(element: ET.Element) -> str:
    """The first line of a failure's message (else the last line of its text), at most 240 characters."""
    message = (element.get("message") or "").strip()
    if message:
        return message.splitlines()[0][:240]
    lines = (element.text or "").strip().splitlines()
    return (lines[-1] if lines else "(no message)")[:240]


def _test_file(case: ET.Element) -> str:
    """The listed test file a junit testcase belongs to (its classname or, for a collection error, its name), not
    the mixin file that defines the test."""
    dotted = case.get("classname") or case.get("name", "")
    for name in TEST_FILES:
        module = name.removesuffix(".py").replace("/", ".")
        if dotted == module or dotted.startswith(module + "."):
            return name
    return dotted


def _test_id(name: str, case: ET.Element) -> str:
    """``file::Class::test`` from a junit testcase (``file`` alone for a collection error)."""
    module = name.removesuffix(".py").replace("/", ".")
    cls = case.get("classname", "").removeprefix(module).lstrip(".")
    return "::".join(part for part in (name, cls, case.get("name", "")) if part and part != module)


def parse_junit(junit: Path) -> dict[str, dict]:
    """Per file: passed/failed/skipped counts and each failure's (or error's) test id and one-line reason."""
    files: dict[str, dict] = {name: {"passed": 0, "failed": 0, "skipped": 0, "failures": []} for name in TEST_FILES}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = _test_file(case)
        entry = files.setdefault(name, {"passed": 0, "failed": 0, "skipped": 0, "failures": []})
        test_id = _test_id(name, case)
        problem = case.find("failure")
        problem = problem if problem is not None else case.find("error")
        if problem is not None:
            entry["failed"] += 1
            entry["failures"].append({"id": test_id, "reason": _reason(problem), "text": problem.text or ""})
        elif case.find("skipped") is not None:
            entry["skipped"] += 1
        else:
            entry["passed"] += 1
    return files


def hub_only(failure: dict, control: dict[str, str]) -> bool:
    """Whether only the Hugging Face Hub explains ``failure``: hub text, or a hard-coded slice of the hub's T5 that
    diffusers' own classes miss as well under the stand-in (``control``: test id -> the control run's reason)."""
    if HUB_TEXT.search(failure["reason"] + "\n" + failure.get("text", "")):
        return True
    return failure["id"] in control and control[failure["id"]] != "passed"


def summarize(files: dict[str, dict], control: dict[str, str]) -> dict:
    """Totals and the failures split into hub-only and the rest (ids and reasons); drops the long failure text."""
    hub, other = [], []
    for entry in files.values():
        for failure in entry["failures"]:
            (hub if hub_only(failure, control) else other).append(failure)
            failure.pop("text", None)
    totals = {key: sum(entry[key] for entry in files.values()) for key in ("passed", "failed", "skipped")}
    return {**totals, "hub_only": len(hub), "other": len(other),
            "hub_only_ids": [f["id"] for f in hub], "other_failures": other}  # fmt: skip


def slice_failures(files: dict[str, dict]) -> list[str]:
    """The failed tests that compare against a hard-coded slice of the hub's tiny T5."""
    ids = [f["id"] for entry in files.values() for f in entry["failures"]]
    return [i for i in ids if i.rsplit("::", 1)[-1].split("[")[0] in SLICE_TESTS]


def run_stage(tree: Path, dest: Path, substitutes: dict[str, str], stand_in: bool, threads: int,
              extra: list[str], select: list[str] | None = None) -> tuple[int, dict[str, dict]]:  # fmt: skip
    """Stage into ``dest``, run pytest there (on ``select``, test ids, when given) and parse its report: (exit code,
    per-file results)."""
    paths = stage(tree, dest, substitutes, stand_in)
    code = run_pytest(dest, select or paths, dest / "junit.xml", threads, extra)
    if not (dest / "junit.xml").is_file():
        raise SystemExit(f"pytest wrote no report (exit code {code})")
    return code, parse_junit(dest / "junit.xml")


def run_control(tree: Path, ids: list[str], threads: int) -> dict[str, str]:
    """The slice tests ``ids`` rerun with diffusers' own classes under the same stand-in: test id -> "passed" or
    the reason it fails there too."""
    if not ids:
        return {}
    with tempfile.TemporaryDirectory(prefix="diffusers_dropin_control_") as scratch:
        _, files = run_stage(tree, Path(scratch), SUBSTITUTES["none"], True, threads, [], select=ids)
    reasons = {f["id"]: f["reason"] for entry in files.values() for f in entry["failures"]}
    return {i: reasons.get(i, "passed") for i in ids}


def main() -> None:
    import diffusers

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--diffusers", type=Path, required=True, metavar="PATH", help="diffusers tree at the tag")
    parser.add_argument("--pipelines", choices=sorted(SUBSTITUTES), default="ours", help="whose pipelines run")
    parser.add_argument("--allow-other-version", action="store_true", help="run a tree of another version")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the test run")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="stage into DIR and keep it (default: a temp dir)")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest after --, e.g. -- -k fused")
    add_out_argument(parser, NAME)
    args = parser.parse_args()

    check_test_dependencies()
    tree = args.diffusers.resolve()
    version = check_tree(tree, diffusers.__version__, args.allow_other_version)
    stand_in = not tiny_t5_cached()
    with tempfile.TemporaryDirectory(prefix="diffusers_dropin_") as scratch:
        dest = args.keep.resolve() if args.keep else Path(scratch)
        dest.mkdir(parents=True, exist_ok=True)
        substitutes = SUBSTITUTES[args.pipelines]
        code, files = run_stage(tree, dest, substitutes, stand_in, args.threads, args.pytest_args)
    control = run_control(tree, slice_failures(files), args.threads) if stand_in and substitutes else {}
    summary = summarize(files, control)
    payload = {
        "machine": machine("cpu"),
        "diffusers_installed": diffusers.__version__,
        "diffusers_tests": version,
        "tests_tree": str(tree),
        "substitutes": substitutes or "none (control: diffusers' own classes)",
        "text_encoder": f"stand-in for {TINY_T5} (not in the local cache)" if stand_in else f"{TINY_T5} (cached)",
        "test_threads": args.threads,
        "pytest_exit_code": code,
        "files": files,
        "control": {
            i: {
                "ours": next(f["reason"] for e in files.values() for f in e["failures"] if f["id"] == i),
                "diffusers": reason,
            }
            for i, reason in control.items()
        },  # fmt: skip
        "summary": summary,
    }
    write_json(args.out, payload, NAME)
    print(f"passed {summary['passed']}, failed {summary['failed']} ({summary['hub_only']} hub-only, "
          f"{summary['other']} other), skipped {summary['skipped']}")  # fmt: skip
    for failure in summary["other_failures"]:
        print(f"  {failure['id']}: {failure['reason']}")


if __name__ == "__main__":
    main()

"""The package's layers: every import, module-level or inside a function, goes to the importing module's own layer
or a lower one, and no group of modules imports itself in a cycle (see README, "Architecture")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: source folder -> the package it is installed as (pyproject.toml's package-dir)
FOLDERS = {"dit": "dit", "pipelines": "dit.pipelines", "train": "dit.train", "configs": "dit.configs"}
#: module prefix -> layer, lowest first; a module's layer is that of its longest matching prefix
LAYERS = {
    "dit.nn": 0,  # the nn core: attention, blocks, embeddings, normalization, MoE, packing, masking, context
    "dit.checkpoint": 0,  # safetensors I/O and key checks
    "dit.errors": 0,  # one-line errors of the commands (stdlib only)
    "dit.lazy": 0,  # lazy package attributes (stdlib only)
    "dit.configs": 0,  # the shipped YAML configs (data)
    "dit.quantization": 0,  # quantized weights: schemes, configs, checks (torch, diffusers, transformers only)
    "dit.models": 1,  # backbones, ControlNet adapters, the pixel autoencoder
    "dit.convert": 2,  # original-checkpoint conversion
    "dit.pipelines": 3,  # diffusers pipelines
    "dit.train": 4,  # the training loop, its objectives and features, feature extraction
    "dit.microshapes": 5,  # the MicroShapes world, its evaluator and recipe
    "dit.tiny": 5,  # tiny components (T5, tokenizer, VAE, pipeline) for tests and the MicroShapes recipe
    "dit.cli": 6,  # the `dit` command: its parser and the list of its commands
    "dit.commands": 6,  # `dit generate`, `dit eval`
    "dit.controlnet_relevance": 6,  # `dit controlnet-relevance`
    "dit": 6,  # the package root: a facade over the layers (never imported from inside them)
}


def _modules() -> dict[str, Path]:
    """Every module of the toolkit by its import name."""
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> set[str]:
    """The toolkit modules ``name`` imports anywhere in its file (function-local imports included)."""
    base = name if _is_package(name) else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            package = node.module or ""
            if node.level:
                anchor = base.rsplit(".", node.level - 1)[0] if node.level > 1 else base
                package = f"{anchor}.{package}" if package else anchor
            targets.add(package)
            targets.update(f"{package}.{alias.name}" for alias in node.names)
    return {t for t in targets if t in MODULES and t != name}


GRAPH = {name: _imports(name) for name in MODULES}


def layer(name: str) -> int:
    prefix = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)
    return LAYERS[prefix]


def test_every_module_has_a_layer():
    assert {layer(name) for name in MODULES} <= set(LAYERS.values())
    assert "dit.nn.context" in MODULES or "dit.nn.blocks" in MODULES


def test_no_import_from_a_higher_layer():
    upward = sorted(
        f"{src} (layer {layer(src)}) imports {dst} (layer {layer(dst)})"
        for src, targets in GRAPH.items()
        for dst in targets
        if layer(dst) > layer(src)
    )
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize(
    "graph, expected",
    [
        ({"a": {"b"}, "b": {"a"}, "c": set()}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, [["a", "b", "c"]]),
    ],
)
def test_the_cycle_finder_finds_cycles(graph, expected):
    assert _cycles(graph) == expected


def test_function_local_imports_count(tmp_path, monkeypatch):
    """An import inside a function is an edge too: hiding one there does not hide a cycle or an upward import."""
    source = "def f():\n    from dit.cli import main\n"
    monkeypatch.setitem(MODULES, "dit.nn.fake", tmp_path / "fake.py")
    (tmp_path / "fake.py").write_text(source)
    assert _imports("dit.nn.fake") == {"dit.cli"}


def test_train_keeps_at_most_twelve_modules_at_its_top_level():
    """The loop, its config and engine stay at the top of ``train/``; data, features, objectives, the run folder and
    feature extraction live in sub-packages (issue 30)."""
    top = sorted(path.name for path in (ROOT / "train").glob("*.py"))
    packages = sorted(path.parent.name for path in (ROOT / "train").glob("*/__init__.py"))
    assert len(top) <= 12, top
    assert {"data", "extract", "features", "objectives", "run"} <= set(packages), packages

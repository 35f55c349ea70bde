"""Lazy package attributes: a package names what it exports and the module defining each, and the names are
imported on first use (so ``import dit``, ``dit.train`` or ``dit.pipelines`` imports no torch). Stdlib only."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module


def lazy_exports(package: dict, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The module ``__getattr__`` and ``__dir__`` of the package whose ``globals()`` is ``package``: each name of
    ``exports`` (name -> module, absolute or relative to the package) is imported on first access and cached."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package['__name__']!r} has no attribute {name!r}")
        value = getattr(import_module(exports[name], package["__name__"]), name)
        package[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted([*package, *exports])

    return __getattr__, __dir__

"""Nested dataclass configs to and from YAML: reading a file (YAML 1.2 booleans) and ``key=value`` overrides,
building the dataclasses with every value type-checked, the ranges numbers may take, and writing YAML back.

Generic: :mod:`dit.train.config` declares the training config's sections, ranges and choices on top of this.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration key that does not exist or a value of the wrong type; the message names it."""


class _Loader(yaml.SafeLoader):
    """YAML with 1.2 booleans: only true/false are booleans, so ``mixed_precision: no`` stays the string 'no'."""


_Loader.yaml_implicit_resolvers = {
    key: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:bool"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_yaml(text: str) -> Any:
    """``text`` parsed as YAML with 1.2 booleans."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def read_yaml_file(path: Path) -> Any:
    """The YAML file ``path``; a missing file or broken YAML is a :class:`ConfigError` naming the file (and the line
    and column)."""
    try:
        return load_yaml(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        reason = "no such file" if isinstance(error, FileNotFoundError) else " ".join(str(error).split())
        raise ConfigError(f"--config {path}: {reason}.") from error
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(error, "problem", None) or " ".join(str(error).split())
        raise ConfigError(f"{where}: not valid YAML ({problem}).") from error


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to a nested dict."""
    if "=" not in override:
        raise ConfigError(f"Override {override!r} must look like key=value (e.g. optim.lr=1e-4).")
    key, raw = override.split("=", 1)
    *parents, leaf = key.strip().split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"Override {override!r}: {part!r} is not a section.")
    node[leaf] = load_yaml(raw)


def _coerce_union(value: Any, annotation: Any, where: str) -> Any:
    options = typing.get_args(annotation)
    if value is None and type(None) in options:
        return None
    for option in options:
        if option is type(None):
            continue
        try:
            return coerce(value, option, where)
        except ConfigError:
            continue
    raise ConfigError(f"{where}: {value!r} is not of type {annotation}.")


def _coerce_container(value: Any, annotation: Any, where: str) -> Any:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}.")
        return tuple(coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}.")
        return [coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}.")
    return dict(value)


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a type annotation (and turn YAML lists into tuples), or raise ConfigError."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, annotation, where)
    if origin in (tuple, list, dict):
        return _coerce_container(value, annotation, where)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if annotation in (int, float, str, bool) and (type(value) is not annotation):
        raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r} ({type(value).__name__}).")
    return value


def from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass ``cls`` from a nested dict; unknown keys and wrong types are errors naming the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known keys are {', '.join(sorted(fields))}.")
    values = {}
    for name, value in data.items():
        hint, key = hints[name], f"{where}.{name}"
        values[name] = from_dict(hint, value, key) if dataclasses.is_dataclass(hint) else coerce(value, hint, key)
    return cls(**values)


def lookup(config: Any, key: str) -> Any:
    """The value of the dotted ``key`` (``objective.lcm.loss``) in nested dataclasses."""
    for part in key.split("."):
        config = getattr(config, part)
    return config


def to_yaml(config: Any) -> str:
    """Nested dataclasses as YAML (tuples as lists), in field order; :func:`from_dict` reads it back."""

    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value

    return yaml.safe_dump(plain(dataclasses.asdict(config)), sort_keys=False)


@dataclass(frozen=True)
class Range:
    """The values a number may take: ``low``/``high`` bounds (None: unbounded), each closed unless ``*_open``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def admits(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{self.low:g}, {self.high:g}{right}"


AT_LEAST_1, NON_NEGATIVE, POSITIVE = Range(1), Range(0), Range(0, low_open=True)
FRACTION, DECAY = Range(0, 1), Range(0, 1, high_open=True)


def check_ranges(config: Any, ranges: dict[str, Range], where: str = "config") -> None:
    """Every key of ``ranges`` holds a number in its range (null stays allowed where the type is optional; tuples are
    checked per element); else a ConfigError names the key (``where.key``), the value and the range."""
    for key, allowed in ranges.items():
        value = lookup(config, key)
        values = value if isinstance(value, tuple) else (value,)
        if value is not None and not all(allowed.admits(v) for v in values):
            raise ConfigError(f"{where}.{key}: {value!r} is out of range; it must be {allowed}.")


def check_choices(config: Any, choices: dict[str, tuple], where: str = "config") -> None:
    """Every key of ``choices`` holds one of its values; else a ConfigError (``where.key``) lists them."""
    for key, options in choices.items():
        value = lookup(config, key)
        if value not in options:
            listed = ", ".join(repr(o) for o in options)
            raise ConfigError(f"{where}.{key}: {value!r} is not one of {listed}.")

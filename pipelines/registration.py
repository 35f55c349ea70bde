"""Our pipeline classes where ``DiffusionPipeline.from_pretrained`` looks them up, so that it loads the folders this
toolkit writes.

diffusers resolves a folder's ``model_index.json`` in two parts (``diffusers.pipelines.pipeline_loading_utils``):

- each component entry ``[library, class]`` is imported by name (``importlib.import_module(library)``), so
  ``["dit.models.pixart_transformer", "PixArtTransformer"]`` needs nothing from us;
- the pipeline's ``_class_name`` is looked up as an attribute of the ``diffusers`` module
  (``_get_pipeline_class``: ``getattr(diffusers, "TextToImagePipeline")``), which fails for any class diffusers does
  not ship. The one other route, custom code (``_class_name: [file, class]`` and ``file.py`` in the folder), makes
  every load of the folder, ``TextToImagePipeline.from_pretrained`` included, run that file through diffusers'
  dynamic-module cache and require ``trust_remote_code=True``; so the folders keep the plain class name.

So ``import dit`` (which any import of ``dit.*`` runs first) adds :data:`PIPELINES` to the names the ``diffusers``
module resolves (:func:`register_when_imported`: at once when diffusers is already imported, else right after its
import, so that ``import dit`` itself imports neither diffusers nor torch): after it,
``DiffusionPipeline.from_pretrained(folder)`` returns a :class:`TextToImagePipeline` (or
:class:`ControlNetPipeline`, :class:`ClassToImagePipeline`), and ``diffusers.TextToImagePipeline`` is our class. Nothing diffusers defines is
changed or shadowed (a name diffusers already has is left to diffusers), and the pipeline modules are imported on
the first lookup only (``import dit`` stays as light as before): diffusers' package is a lazy module whose extra
objects (``_objects``, where it keeps ``__version__``) are consulted before it raises ``AttributeError``, and the
names are added there behind an import-on-first-use mapping. A ``diffusers`` without that mapping gets the classes
set as plain attributes instead (imported then).

Without importing ``dit`` first, ``DiffusionPipeline.from_pretrained`` cannot know the name: load such a folder with
``dit.pipelines.TextToImagePipeline.from_pretrained`` (strict: every component's keys are checked, see
:mod:`dit.pipelines.loading`) or ``import dit`` before. ``DiffusionPipeline.from_pretrained`` loads the components
as diffusers does: the toolkit's own models are strict on their own, the VAE and text encoder are not key-checked.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys
from importlib import import_module

#: Pipeline class name -> the module defining it, as ``model_index.json`` records the name.
PIPELINES = {
    "TextToImagePipeline": "dit.pipelines.text_to_image",
    "ControlNetPipeline": "dit.pipelines.controlnet",
    "ClassToImagePipeline": "dit.pipelines.class_to_image",
}

logger = logging.getLogger(__name__)


class LazyObjects(dict):
    """A mapping of names to objects where ``lazy`` names (name -> module) are imported on first lookup.

    Used as the ``diffusers`` module's ``_objects``: its ``__getattr__`` asks ``name in _objects`` and then
    ``_objects[name]``.
    """

    def __init__(self, objects: dict, lazy: dict[str, str]):
        super().__init__(objects)
        self.lazy = dict(lazy)

    def __contains__(self, name: object) -> bool:
        return super().__contains__(name) or name in self.lazy

    def __missing__(self, name: str):
        if name not in self.lazy:
            raise KeyError(name)
        value = getattr(import_module(self.lazy[name]), name)
        self[name] = value
        return value


def register_pipelines(module=None, pipelines: dict[str, str] = PIPELINES) -> list[str]:
    """Make ``pipelines`` (class name -> module) resolvable as attributes of ``module`` (default: ``diffusers``),
    where ``DiffusionPipeline.from_pretrained`` looks a folder's ``_class_name`` up. Returns the names registered.

    Idempotent; a name ``module`` already defines otherwise is not registered (logged), so diffusers' own classes
    win.
    """
    if module is None:
        import diffusers as module
    wanted = {}
    for name, where in pipelines.items():
        if _defined_elsewhere(module, name, where):
            logger.warning("%s already defines %s; its own class is left in place.", module.__name__, name)
        else:
            wanted[name] = where
    objects = getattr(module, "_objects", None)
    if isinstance(objects, dict):
        if not isinstance(objects, LazyObjects):
            objects = module._objects = LazyObjects(objects, {})
        objects.lazy.update(wanted)
    else:  # not a lazy module: set the classes themselves
        for name, where in wanted.items():
            setattr(module, name, getattr(import_module(where), name))
    return sorted(wanted)


def _defined_elsewhere(module, name: str, where: str) -> bool:
    """Whether ``module`` has ``name`` (set, or importable lazily) from another module than ``where``."""
    value = vars(module).get(name)
    if value is not None:
        return getattr(value, "__module__", None) != where
    lazy = getattr(getattr(module, "_objects", None), "lazy", {})
    if name in lazy:
        return lazy[name] != where
    return name in getattr(module, "_class_to_module", ()) or name in getattr(module, "_modules", ())


def register_when_imported(name: str = "diffusers") -> None:
    """:func:`register_pipelines` on the module ``name`` now if it is imported, else right after its import (a
    one-shot import hook), so that ``import dit`` stays cheap and ``DiffusionPipeline.from_pretrained`` still
    resolves our classes."""
    if name in sys.modules:
        register_pipelines(sys.modules[name])
    elif not any(isinstance(finder, _RegisterOnImport) and finder.name == name for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport(name))


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds ``name`` with the other finders and has its loader register our pipelines once it ran the module."""

    def __init__(self, name: str):
        self.name = name

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # one shot: the lookup below must not come back here
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    """``loader``, with :func:`register_pipelines` on the module after it ran."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        register_pipelines(sys.modules.get(module.__name__, module))  # diffusers replaces itself by a lazy module

    def __getattr__(self, name: str):  # get_data, get_resource_reader, ... of the real loader
        return getattr(self.loader, name)

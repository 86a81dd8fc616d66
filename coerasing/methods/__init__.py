"""Erasers behind one interface (:mod:`.base`): train an artifact, apply it to a pipeline.

Every eraser is one module or one folder of this package with a :class:`~.base.Method` subclass,
found by name through :data:`REGISTRY` and imported on first use:

| name | class | artifact |
|---|---|---|
| ``esd`` | :mod:`.coerasing` | UNet (stage 1, text erasing) |
| ``coerasing`` | :mod:`.coerasing` | UNet (stage 1, then stage 2 with images and text refinement) |
| ``image-only``, ``no-refinement``, ``esd-equal-compute`` | :mod:`.coerasing` | Co-Erasing's ablations |
| ``coerasing-preserve`` | :mod:`.coerasing` | UNet (Co-Erasing with the anchor-preservation term, our option) |
| ``cpe`` | :mod:`.cpe` (folder) | ResAG gates on the cross-attention keys and values (folder) |
| ``stereo`` | :mod:`.stereo` | UNet (adversarial search, then robust erasing) |
| ``gie`` | :mod:`.gie` (folder) | attention processors at inference (folder: settings, adapter) |

Methods outside the package: ``COERASING_METHODS="name=package.module:Class[,…]"`` in the
environment adds them to the registry (every process started by ``compare.py`` inherits it).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from ..errors import CoErasingError
from ..generation import load_generation_pipeline
from .base import ARTIFACT_FILE, UNET_CHECKPOINT, Artifact, Method, Runtime, UNetRuntime, read_artifact, write_artifact

#: Method name → ``module:Class`` of its :class:`Method` subclass (one line per method).
REGISTRY: dict[str, str] = {
    "esd": "coerasing.methods.coerasing:ESD",
    "coerasing": "coerasing.methods.coerasing:CoErasing",
    "coerasing-preserve": "coerasing.methods.coerasing:CoErasingPreserve",
    "image-only": "coerasing.methods.coerasing:ImageOnly",
    "no-refinement": "coerasing.methods.coerasing:NoRefinement",
    "esd-equal-compute": "coerasing.methods.coerasing:ESDEqualCompute",
    "cpe": "coerasing.methods.cpe:CPEMethod",
    "stereo": "coerasing.methods.stereo:Stereo",
    "gie": "coerasing.methods.gie:GIEMethod",
}

#: The environment variable of methods defined outside the package (``name=module:Class``, comma-separated).
METHODS_ENV = "COERASING_METHODS"


def _registry() -> dict[str, str]:
    """:data:`REGISTRY` plus the methods of :data:`METHODS_ENV`."""
    table = dict(REGISTRY)
    for entry in filter(None, (part.strip() for part in os.environ.get(METHODS_ENV, "").split(","))):
        name, _, target = entry.partition("=")
        if not name.strip() or ":" not in target:
            raise CoErasingError(f"{METHODS_ENV}: {entry!r} is not name=package.module:Class; e.g. "
                                 f"{METHODS_ENV}=mine=my_package.my_method:MyMethod.")
        table[name.strip()] = target.strip()
    return table


def method_names() -> list[str]:
    return list(_registry())


def get_method(name: str) -> Method:
    """The method called ``name`` (an instance of its class)."""
    if name == UNET_CHECKPOINT:
        return Method()
    table = _registry()
    if name not in table:
        raise CoErasingError(f"unknown method {name!r}; known methods: {', '.join(table)}.")
    module_name, _, class_name = table[name].partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise CoErasingError(f"method {name!r}: could not import {class_name!r} from {module_name!r} ({exc}).") from exc
    if not (isinstance(cls, type) and issubclass(cls, Method)) or cls.name != name:
        raise CoErasingError(f"method {name!r}: {table[name]} is not a Method subclass whose name is {name!r}.")
    return cls()


def trainable_names() -> list[str]:
    """The methods that ``erase_pipeline.py`` trains (their class sets ``trainable = True``)."""
    return [name for name in method_names() if get_method(name).trainable]

def apply_artifact(pipe: Any, path: Any, flag: str = "--artifact") -> Runtime:
    """Read any artifact (:func:`read_artifact`) and apply it to ``pipe``; ``None`` gives the base model."""
    if path is None:
        return Runtime(pipe)
    artifact = read_artifact(path, flag)
    if artifact.method == UNET_CHECKPOINT:
        return UNetRuntime(pipe, artifact, flag)
    return get_method(artifact.method).apply(artifact, pipe)


def load_runtime(
    ckpt_path: str, artifact: Any, device: Any, dtype: Any, scheduler: str = "default", flag: str = "--artifact"
) -> Runtime:
    """The base pipeline of ``ckpt_path`` (safety checker off) with ``artifact`` applied (``None``: the base)."""

    runtime = apply_artifact(load_generation_pipeline(ckpt_path, device, dtype, scheduler), artifact, flag)
    if artifact is not None:
        print(f"erased model {artifact}: {getattr(runtime, 'format', runtime.describe()['method'])}")
    return runtime


__all__ = [
    "ARTIFACT_FILE", "Artifact", "Method", "Runtime", "UNetRuntime", "apply_artifact", "get_method", "load_runtime",
    "method_names", "read_artifact", "trainable_names", "write_artifact",
]

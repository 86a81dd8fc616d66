"""Erasers behind one interface (:mod:`.base`): train an artifact, apply it to a pipeline.

Methods are found by name; each lives in its own module, imported on first use:

| name | module | artifact |
|---|---|---|
| ``esd`` | :mod:`.esd` | UNet (stage 1, text erasing) |
| ``coerasing`` | :mod:`.coerasing` | UNet (stage 1, then stage 2 with images and text refinement) |
| ``image-only``, ``no-refinement``, ``esd-equal-compute`` | :mod:`.coerasing` | Co-Erasing's ablations |
| ``cpe`` | :mod:`.cpe` | ResAG gates on the cross-attention keys and values (folder) |
| ``stereo`` | :mod:`.stereo` | UNet (adversarial search, then robust erasing) |
| ``gie`` | :mod:`.gie` | attention processors at inference (folder: settings, adapter) |
"""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import CoErasingError
from .base import ARTIFACT_FILE, UNET_CHECKPOINT, Artifact, Method, Runtime, UNetRuntime, read_artifact, write_artifact

#: Method name → module that defines it (the module's ``METHODS`` dict maps names to classes).
_MODULES: dict[str, str] = {
    "esd": "coerasing.methods.coerasing",
    "coerasing": "coerasing.methods.coerasing",
    "image-only": "coerasing.methods.coerasing",
    "no-refinement": "coerasing.methods.coerasing",
    "esd-equal-compute": "coerasing.methods.coerasing",
    "cpe": "coerasing.methods.cpe",
    "stereo": "coerasing.methods.stereo",
    "gie": "coerasing.methods.gie",
}


def register_method_module(name: str, module: str) -> None:
    """Make ``get_method(name)`` import ``module`` (which defines ``METHODS[name]``)."""
    _MODULES[name] = module


def method_names() -> list[str]:
    return list(_MODULES)


def get_method(name: str) -> Method:
    """The method called ``name`` (an instance of its class)."""
    if name == UNET_CHECKPOINT:
        return Method()
    if name not in _MODULES:
        raise CoErasingError(f"unknown method {name!r}; known methods: {', '.join(method_names())}.")
    module = importlib.import_module(_MODULES[name])
    return module.METHODS[name]()


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
    from ..generation import load_generation_pipeline

    runtime = apply_artifact(load_generation_pipeline(ckpt_path, device, dtype, scheduler), artifact, flag)
    if artifact is not None:
        print(f"erased model {artifact}: {getattr(runtime, 'format', runtime.describe()['method'])}")
    return runtime


__all__ = [
    "ARTIFACT_FILE", "Artifact", "Method", "Runtime", "UNetRuntime", "apply_artifact", "get_method", "load_runtime",
    "method_names", "read_artifact", "register_method_module", "write_artifact",
]

"""CPE's artifact files: the gates' weights and their layout."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ...errors import CoErasingError
from ...files import atomic_write, atomic_write_json
from ...formats import read_safetensors
from ..base import ARTIFACT_FILE, write_artifact
from .config import FORMAT, LAYOUT_FILE, METHOD_NAME, WEIGHTS_FILE
from .modules import ConceptEraser, CPEAdapter, CPELayout


def save_cpe(folder: str | Path, erasers: Sequence[ConceptEraser], layout: CPELayout, settings: dict[str, Any],
             **extra: Any) -> Path:
    """Write ``cpe.safetensors``, ``cpe.json`` and, last, ``artifact.json`` into ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors = {
        f"concepts.{index}.{key}": value.detach().to("cpu", torch.float32).contiguous()
        for index, eraser in enumerate(erasers)
        for key, value in eraser.state_dict().items()
    }
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": FORMAT}))
    atomic_write_json(folder / LAYOUT_FILE, asdict(layout))
    write_artifact(folder, METHOD_NAME, settings, layout=LAYOUT_FILE, weights=WEIGHTS_FILE, **extra)
    return folder


#: Each field of ``cpe.json`` (:class:`CPELayout`): its type, and for a list the type of its items.
_LAYOUT_TYPES: dict[str, tuple[type, type | None]] = {
    "concepts": (list, str), "layers": (list, str), "out_features": (list, int), "text_dim": (int, None),
    "gate_dim": (int, None), "rank": (int, None), "separate_key": (bool, None), "format": (str, None),
}


def _is(value: Any, kind: type) -> bool:
    """``isinstance`` that keeps booleans out of ``int`` and needs sizes to be positive."""
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0
    return isinstance(value, kind)


def _read_layout(path: Path) -> CPELayout:
    """``cpe.json`` checked field by field (names, types, positive sizes) before any module is built."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CoErasingError(f"the CPE layout {path} is not readable JSON ({exc}); write the artifact again.") from exc
    required = set(_LAYOUT_TYPES) - {"format"}
    if not isinstance(raw, dict) or set(raw) - set(_LAYOUT_TYPES) or required - set(raw):
        raise CoErasingError(f"the CPE layout {path} must be an object with the keys {', '.join(_LAYOUT_TYPES)}; "
                             "write the artifact again.")
    for key, (kind, item) in _LAYOUT_TYPES.items():
        value = raw.get(key, "")
        if not _is(value, kind) or (item is not None and not all(_is(v, item) for v in value)):
            raise CoErasingError(f"the CPE layout {path}: '{key}' has the wrong type or value ({value!r}); write "
                                 "the artifact again.")
    if not raw["concepts"] or len(raw["layers"]) != len(raw["out_features"]):
        raise CoErasingError(f"the CPE layout {path} names no concept, or its layers and sizes differ in number; "
                             "write the artifact again.")
    return CPELayout(**raw)


def load_cpe(folder: str | Path, layout_path: Path | None = None, weights_path: Path | None = None
             ) -> tuple[CPEAdapter, CPELayout]:
    """The adapter and layout stored in a CPE artifact folder (:func:`save_cpe`), every file checked.

    The weights must be safetensors (never unpickled) with finite values matching the layout.
    """
    folder = Path(folder)
    layout_path, weights_path = layout_path or folder / LAYOUT_FILE, weights_path or folder / WEIGHTS_FILE
    layout = _read_layout(layout_path)
    tensors, _ = read_safetensors(weights_path, "the CPE weights")
    erasers = []
    for index in range(len(layout.concepts)):
        eraser = layout.new_eraser()
        prefix = f"concepts.{index}."
        state = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
        try:
            eraser.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CoErasingError(f"{weights_path} does not match its layout {layout_path.name} ({exc}).") from exc
        erasers.append(eraser)
    return CPEAdapter(erasers), layout


def stage_artifacts(folder: str | Path) -> list[Path]:
    """The complete ``stage_<i>`` artifact folders of a run, in stage order (a trade-off curve's points)."""
    found = []
    for path in Path(folder).glob("stage_*"):
        match = re.fullmatch(r"stage_(\d+)", path.name)
        if match and (path / ARTIFACT_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]

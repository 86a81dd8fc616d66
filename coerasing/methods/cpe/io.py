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


def load_cpe(folder: str | Path) -> tuple[CPEAdapter, CPELayout]:
    """The adapter and layout stored in a CPE artifact folder (:func:`save_cpe`)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        raw = json.loads((folder / LAYOUT_FILE).read_text(encoding="utf-8"))
        layout = CPELayout(**raw)
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except (OSError, ValueError, TypeError) as exc:
        raise CoErasingError(f"{folder} is not a readable CPE artifact ({LAYOUT_FILE} and {WEIGHTS_FILE} are "
                             f"needed): {exc}.") from exc
    erasers = []
    for index in range(len(layout.concepts)):
        eraser = layout.new_eraser()
        prefix = f"concepts.{index}."
        state = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
        try:
            eraser.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CoErasingError(f"{folder / WEIGHTS_FILE} does not match its {LAYOUT_FILE} ({exc}).") from exc
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

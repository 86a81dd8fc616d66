"""The toy world in ``evaluate.py``: its classifier as a detector, and its prompt sets as CSV files.

``--detector toy`` (the default for ``--prompts toy_<shape>``) calls an image positive when the
toy-world classifier (``<model>/classifier``, :mod:`coerasing.toy.classifier`) sees one of the
target shapes, the toy world's NudeNet. ``python -m coerasing.toy.detector DIR`` writes the prompt
sets ``toy_<shape>.csv`` shipped in ``data/prompts/``: the held-out prompts that name or imply the
shape (:func:`coerasing.toy.world.explicit_prompts`, :func:`~coerasing.toy.world.implicit_prompts`),
each with several seeds, at the toy model's default guidance.
"""

from __future__ import annotations

import argparse
import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import CoErasingError
from ..eval.detectors import Detection, DetectorSpec, register_detector
from . import TOY_GUIDANCE
from .classifier import CLASSIFIER_SHAPES, ToyClassifier
from .world import SHAPES, explicit_prompts, implicit_prompts

#: Seeds per prompt in the shipped toy prompt sets, and their guidance (the toy model's default).
SEEDS_PER_PROMPT = 4
CSV_COLUMNS = ("case_number", "prompt", "evaluation_seed", "evaluation_guidance", "kind", "shape", "colour")


class ToyShapeDetector:
    """Positive when the toy classifier's predicted shape is one of ``targets``."""

    name = "toy"

    def __init__(self, classifier: str | Path, targets: Sequence[str], device: str | None = None) -> None:
        folder = Path(classifier).expanduser()
        if not (folder / "config.json").is_file():
            raise CoErasingError(
                f"--classifier {classifier}: no toy-world classifier there (config.json and model.safetensors); "
                "pass the classifier/ folder of the toy model, e.g. --classifier coerasing/assets/toy_world/classifier."
            )
        unknown = [t for t in targets if t not in SHAPES]
        if not targets or unknown:
            raise CoErasingError(
                f"--target {','.join(targets) or '(none)'}: the toy detector needs shapes of the toy world as "
                f"targets, from: {', '.join(SHAPES)}."
            )
        self.folder = folder
        self.targets = list(targets)
        self.model = ToyClassifier.from_pretrained(folder, device or "cpu")

    def detect(self, images: Sequence[Image.Image]) -> list[Detection]:
        predictions = self.model.predict(list(images))
        return [
            Detection(
                positive=p["shape"] in self.targets,
                labels=[p["shape"]] if p["shape"] in self.targets else [],
                scores={},
                details=dict(p),
            )
            for p in predictions
        ]

    def describe(self) -> dict[str, Any]:
        return {
            "detector": self.name,
            "protocol": "toy-world classifier: positive if the predicted shape is a target "
            f"(shapes {', '.join(CLASSIFIER_SHAPES)})",
            "classifier": str(self.folder),
            "targets": self.targets,
        }


def detector_from_spec(spec: DetectorSpec) -> ToyShapeDetector:
    """The detector factory (``--detector toy``, and the toy prompt sets' default plug-in reference)."""
    return ToyShapeDetector(spec.classifier, spec.targets, spec.device)


def register_toy_detector() -> None:
    """Make ``--detector toy`` build :class:`ToyShapeDetector` (called by ``evaluate.py`` and ``compare.py``,
    which sit above both the toy world and the evaluation's detector registry)."""
    register_detector("toy", detector_from_spec)


register_toy_detector()


def prompt_rows(shape: str, seeds_per_prompt: int = SEEDS_PER_PROMPT) -> list[dict[str, str]]:
    """The CSV rows of ``toy_<shape>.csv``: explicit then implicit held-out prompts, ``seeds_per_prompt`` each."""
    if shape not in SHAPES:
        raise CoErasingError(f"{shape!r} is not a toy-world shape; use one of {', '.join(SHAPES)}.")
    rows = []
    for prompt in [*explicit_prompts([shape]), *implicit_prompts([shape])]:
        for _ in range(seeds_per_prompt):
            rows.append({
                "case_number": str(len(rows)),
                "prompt": prompt.prompt,
                "evaluation_seed": str(len(rows)),
                "evaluation_guidance": str(TOY_GUIDANCE),
                "kind": "explicit" if prompt.kind in ("full", "shape") else "implicit",
                "shape": shape,
                "colour": prompt.colour or "",
            })
    return rows


def prompt_csv(shape: str) -> str:
    """``toy_<shape>.csv`` as text."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(prompt_rows(shape))
    return buffer.getvalue()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m coerasing.toy.detector", description="write toy_<shape>.csv")
    parser.add_argument("out", help="folder for the CSV files (the shipped ones live in data/prompts)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for shape in SHAPES:
        (out / f"toy_{shape}.csv").write_text(prompt_csv(shape), encoding="utf-8")
        print(out / f"toy_{shape}.csv")


if __name__ == "__main__":
    main()

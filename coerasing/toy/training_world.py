"""What the toy world lends a method at training time (:class:`coerasing.methods.base.TrainingWorld`).

``erase_pipeline.py`` passes :class:`ToyTrainingWorld` to ``Method.train``: a toy shape's default
base model is the shipped toy model, and its detector (GIE's adapter labels) is the toy classifier
of the model folder. The method layer itself never imports the toy world.
"""

from __future__ import annotations

from pathlib import Path

from . import TOY_MODEL_DIR
from .detector import ToyShapeDetector
from .world import SHAPES


class ToyTrainingWorld:
    """The toy world's defaults for methods: its model for its shapes, its classifier as their detector."""

    def __init__(self, model: str | Path = TOY_MODEL_DIR) -> None:
        self.model = Path(model)

    def default_model(self, concept: str) -> str | None:
        return str(self.model) if concept.strip().lower() in SHAPES else None

    def detector(self, model: str, concept: str, device: str | None) -> object | None:
        """The toy classifier of ``model`` (``<model>/classifier``) for a toy shape, else ``None``."""
        classifier = Path(model).expanduser() / "classifier"
        if concept.strip().lower() not in SHAPES or not (classifier / "config.json").is_file():
            return None

        return ToyShapeDetector(classifier, [concept.strip().lower()], device)

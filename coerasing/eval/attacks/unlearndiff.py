"""UnlearnDiff (Zhang et al. 2023) behind the attack interface; the algorithm is :mod:`coerasing.eval.attack`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from ...generation import GenerationSettings, ImageRow
from ...methods.base import Runtime
from ..attack import AttackModels, AttackSettings, attack_row_record
from ..detectors import Detector
from .base import Attack, Record


@dataclass
class UnlearnDiff(Attack):
    """``k`` prefix tokens that make the erased model denoise the base model's image of the prompt.

    ``references(row)``: the base model's image of the row; ``detector()``: the judge (built in
    :meth:`prepare`, so a finished attack loads nothing); ``generation``: how the attacked prompt is
    generated (as the no-attack image).
    """

    name: ClassVar[str] = "unlearndiff"

    attack_settings: AttackSettings
    generation: GenerationSettings
    references: Callable[[ImageRow], Image.Image]
    detector: Callable[[], Detector]
    _models: AttackModels | None = field(default=None, init=False, repr=False)
    _runtime: Runtime | None = field(default=None, init=False, repr=False)
    _detector: Detector | None = field(default=None, init=False, repr=False)
    _out_dir: Path | None = field(default=None, init=False, repr=False)

    needs_references: ClassVar[bool] = True

    @classmethod
    def from_eval_config(cls, config: Any, references: Callable[[ImageRow], Image.Image],
                         detector: Callable[[], Detector]) -> UnlearnDiff:
        return cls(config.attack_settings().validate(), config.generation_settings(), references, detector)

    def settings(self) -> dict[str, Any]:
        return vars(self.attack_settings.validate())

    def prepare(self, runtime: Runtime, out_dir: Path, made_by: Mapping[str, Any]) -> None:
        self._detector = self.detector()
        self._runtime, self._models, self._out_dir = runtime, AttackModels.from_runtime(runtime), out_dir

    def attack_one(self, row: ImageRow) -> Record:
        assert self._models is not None and self._runtime is not None and self._detector is not None
        assert self._out_dir is not None
        record = attack_row_record(self._models, self._runtime, self._detector, row, self.attack_settings,
                                   self.generation, self.references(row), self._out_dir)
        if self._runtime.device.type == "cuda":
            torch.cuda.empty_cache()  # the next prompt's optimisation starts from a clean cache
        return record

    def describe(self, record: Record) -> str:
        return (f"case {record['case']}: attack {'succeeded' if record['success'] else 'failed'} after "
                f"{len(record['rounds'])} round(s): {record['attack_prompt'][:80]!r}")

    def close(self) -> None:
        self._models = self._runtime = self._detector = None

"""Fixtures of the evaluation tests: a small prompt CSV, a tiny image classifier, a fake detector."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from PIL import Image

from coerasing.eval.detectors import Detection

ROWS_CSV = """case_number,prompt,evaluation_seed,evaluation_guidance,sd_image_width,sd_image_height
a1,a photo of a red circle,4261553411,7,,
a2,a blue square on grass,12,7.5,,
a3,"a long prompt, with commas",99,5,64,48
a4,a small green triangle,7,7.5,,
a5,a yellow star at night,3,9,,
"""


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread during these tests: on a small shared CPU, OpenMP threads competing with other
    processes slow the tiny models down by orders of magnitude. Restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def rows_csv(tmp_path_factory) -> Path:
    """Five prompt rows; a3 has its own size (64×48) and guidance, a1 a seed above 2**31."""
    path = tmp_path_factory.mktemp("prompts") / "rows.csv"
    path.write_text(ROWS_CSV, encoding="utf-8")
    return path


class ScriptedDetector:
    """A plug-in detector for tests: negative until its ``positive_from``-th image, positive from then on."""

    name = "scripted"

    def __init__(self, positive_from: int | None = None):
        self.calls = 0
        self.positive_from = positive_from

    def detect(self, images: Sequence[Image.Image]) -> list[Detection]:
        results = []
        for _image in images:
            self.calls += 1
            positive = self.positive_from is not None and self.calls >= self.positive_from
            results.append(Detection(positive=positive, labels=["X"] if positive else [], scores={"X": 1.0 * positive}))
        return results

    def describe(self) -> dict:
        return {"detector": self.name, "protocol": "scripted for tests"}


def scripted_factory(spec) -> ScriptedDetector:
    """A plug-in factory, for ``--detector tests.eval.conftest:scripted_factory``."""
    return ScriptedDetector(positive_from=spec.options.get("from", 1))


class EveryThird(ScriptedDetector):
    """Positive on every third image it sees (3rd, 6th, …): a deterministic mix for end-to-end runs."""

    def detect(self, images: Sequence[Image.Image]) -> list[Detection]:
        results = []
        for _image in images:
            self.calls += 1
            positive = self.calls % 3 == 0
            results.append(Detection(positive=positive, labels=["X"] if positive else []))
        return results


def every_third_factory(spec) -> EveryThird:
    """``--detector tests.eval.conftest:every_third_factory``."""
    return EveryThird()

"""The toy world in evaluate.py: shipped prompt sets, the ``toy`` detector and its defaults."""

from __future__ import annotations

import pytest

from coerasing.errors import CoErasingError
from coerasing.eval import EvalConfig
from coerasing.eval.detectors import DetectorSpec, build_detector
from coerasing.eval.prompts import PROMPTS_DIR, load_prompts
from coerasing.toy import TOY_GUIDANCE, TOY_MODEL_DIR
from coerasing.toy.detector import prompt_csv
from coerasing.toy.world import SHAPES, Scene, render


@pytest.mark.parametrize("shape", SHAPES)
def test_shipped_prompt_sets_match_the_generator_and_load(shape):
    path = PROMPTS_DIR / f"toy_{shape}.csv"
    assert path.read_text(encoding="utf-8") == prompt_csv(shape)
    rows = load_prompts(f"toy_{shape}")
    assert len({r.seed for r in rows}) == len(rows)
    assert all(r.guidance == TOY_GUIDANCE and r.extra["shape"] == shape for r in rows)
    assert {r.extra["kind"] for r in rows} == {"explicit", "implicit"}


def test_toy_prompt_sets_default_to_the_toy_detector_with_the_model_classifier():
    config = EvalConfig(command="detect", prompts="toy_star", output_dir="x", ckpt_path="some/model")
    spec = config.detector_spec()
    assert spec.name == "toy" and spec.targets == ["star"]
    assert spec.classifier.replace("\\", "/") == "some/model/classifier"


def test_toy_detector_needs_a_classifier_folder_and_shape_targets(tmp_path):
    with pytest.raises(CoErasingError, match="no toy-world classifier"):
        build_detector(DetectorSpec(name="toy", classifier=str(tmp_path), targets=["circle"]))
    if (TOY_MODEL_DIR / "classifier").is_dir():
        with pytest.raises(CoErasingError, match="shapes of the toy world"):
            build_detector(DetectorSpec(name="toy", classifier=str(TOY_MODEL_DIR / "classifier"), targets=["dog"]))


def test_toy_detector_on_rendered_shapes():
    detector = build_detector(DetectorSpec(name="toy", classifier=str(TOY_MODEL_DIR / "classifier"),
                                           targets=["circle"]))
    scenes = [Scene(shape, "blue", "white", 0.3, 0.5, 0.5) for shape in SHAPES]
    detections = detector.detect([render(s) for s in scenes])
    assert [d.positive for d in detections] == [s.shape == "circle" for s in scenes]
    assert detections[0].labels == ["circle"] and detections[1].labels == []
    assert detector.describe()["targets"] == ["circle"]


@pytest.mark.slow
def test_the_scripts_register_the_toy_detector_and_the_registry_names_nothing_above_it():
    """``--detector toy`` comes from the toy world, registered by the scripts on top (docs/architecture.md)."""
    import subprocess
    import sys

    from ..conftest import REPO_ROOT

    code = ("import sys; from coerasing.eval.detectors import detector_names; found = ['toy' in detector_names()]; "
            "import evaluate; found.append('toy' in detector_names()); import compare; print(*found)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.stdout.split() == ["False", "True"], result.stderr[-2000:]

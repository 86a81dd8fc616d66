"""Image-classifier detector (objects/styles), the detector registry, and detection over a folder."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from coerasing.errors import CoErasingError
from coerasing.eval import detectors as D

from .conftest import ScriptedDetector


def _images() -> list[Image.Image]:
    return [Image.new("RGB", (40, 40), colour) for colour in ((250, 10, 10), (10, 250, 10), (10, 10, 250))]


def test_classifier_top_k(tiny_classifier):
    probe = D.ImageClassifierDetector(str(tiny_classifier), ["0"], top_k=5, device="cpu")
    results = probe.detect(_images())
    assert all(r.positive for r in results)  # every class is in the top 5 of 5
    top1 = [r.details["top_ids"][0] for r in results]
    by_label = D.ImageClassifierDetector(str(tiny_classifier), [probe.id2label[top1[0]]], top_k=1, device="cpu")
    first = by_label.detect(_images())
    assert first[0].positive and first[0].labels == [probe.id2label[top1[0]]]
    assert [r.positive for r in first] == [t == top1[0] for t in top1]
    assert len(first[0].scores) == 1 and sum(results[0].scores.values()) == pytest.approx(1.0, abs=1e-5)
    assert by_label.describe()["top_k"] == 1


def test_classifier_errors(tiny_classifier):
    with pytest.raises(CoErasingError, match="not a class"):
        D.ImageClassifierDetector(str(tiny_classifier), ["garbage truck"], device="cpu")
    with pytest.raises(CoErasingError, match="needs --target"):
        D.ImageClassifierDetector(str(tiny_classifier), [], device="cpu")
    with pytest.raises(CoErasingError, match=r"--classifier microsoft/resnet-50 .*--classifier DIR, a local folder"):
        D.ImageClassifierDetector("microsoft/resnet-50", ["497"], device="cpu")  # the Hub is unreachable here


def test_registry_accepts_plug_in_detectors():
    D.register_detector("scripted-test", lambda spec: ScriptedDetector(positive_from=spec.options["from"]))
    detector = D.build_detector(D.DetectorSpec(name="scripted-test", options={"from": 2}))
    assert isinstance(detector, D.Detector)
    assert [d.positive for d in detector.detect(_images())] == [False, True, True]
    assert "scripted-test" in D.detector_names()
    with pytest.raises(CoErasingError, match="is not known"):
        D.build_detector(D.DetectorSpec(name="nope"))


def test_plug_in_detectors_by_module_path():
    detector = D.build_detector(D.DetectorSpec(name="tests.eval.conftest:scripted_factory"))
    assert [d.positive for d in detector.detect(_images()[:2])] == [True, True]
    with pytest.raises(CoErasingError, match="could not import"):
        D.build_detector(D.DetectorSpec(name="tests.eval.nowhere:factory"))
    with pytest.raises(CoErasingError, match="could not import"):
        D.build_detector(D.DetectorSpec(name="tests.eval.conftest:missing"))


def test_detect_folder_resumes_and_needs_every_image(tmp_path):
    for case, image in zip(("1", "2", "3"), _images(), strict=True):
        image.save(tmp_path / f"{case}.png")
    detector = ScriptedDetector(positive_from=3)
    found = D.detect_folder(detector, tmp_path, ["1", "2", "3"], batch_size=2)
    assert [found[c].positive for c in "123"] == [False, False, True] and detector.calls == 3
    again = ScriptedDetector(positive_from=1)
    assert D.detect_folder(again, tmp_path, ["1", "2", "3"]) == found and again.calls == 0  # same detector: reused
    description, saved = D.load_detections(tmp_path / D.DETECTIONS)
    assert description == detector.describe() and saved == found
    assert json.loads((tmp_path / D.DETECTIONS).read_text())["images"]["3"]["labels"] == ["X"]
    with pytest.raises(CoErasingError, match="run `evaluate.py generate`"):
        D.detect_folder(detector, tmp_path, ["1", "4"])


def test_a_truncated_detections_file_is_detected_again_and_an_unreadable_one_named(tmp_path, capsys):
    for case, image in zip(("1", "2"), _images()[:2], strict=True):
        image.save(tmp_path / f"{case}.png")
    found = D.detect_folder(ScriptedDetector(positive_from=2), tmp_path, ["1", "2"])
    path = tmp_path / D.DETECTIONS
    path.write_bytes(path.read_bytes()[:40])
    again = ScriptedDetector(positive_from=2)
    assert D.detect_folder(again, tmp_path, ["1", "2"]) == found and again.calls == 2  # detected again
    assert f"warning: {path} is not a valid record" in capsys.readouterr().err
    path.write_text('{"detector": {}, "images": []}')
    with pytest.raises(CoErasingError, match=rf"{path} is not a valid record: its 'images' field is list"):
        D.load_detections(path)  # the attack and report steps: an error naming the file, no traceback

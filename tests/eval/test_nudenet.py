"""UnlearnDiff's NudeNet rule on fixture detector outputs (no onnxruntime needed).

The expected values of ``test_matches_nudenet_301_on_random_outputs`` and the resize hashes were
computed with the nudenet 3.0.1 wheel's own ``_postprocess`` and OpenCV 5.0's ``cv2.resize``.
"""

from __future__ import annotations

import hashlib
import importlib.util

import numpy as np
import pytest
from PIL import Image

from coerasing.errors import CoErasingError
from coerasing.eval import detectors as D

CLS = {name: i for i, name in enumerate(D.NUDENET_CLASSES)}


def raw_output(*boxes: tuple[str, float, float, float, float, float], n: int = 2100) -> np.ndarray:
    """A best.onnx output ``[1, 22, n]``: one column (cx, cy, w, h, 18 scores) per box, in 320-px input units."""
    out = np.zeros((1, 4 + len(D.NUDENET_CLASSES), n), np.float32)
    for column, (name, score, cx, cy, w, h) in enumerate(boxes):
        out[0, :4, 7 * column + 3] = (cx, cy, w, h)
        out[0, 4 + CLS[name], 7 * column + 3] = score
    return out


def decide(*boxes, size=(512, 512)) -> D.Detection:
    return D.nudity_decision(D.decode_nudenet_output(raw_output(*boxes), *size))


def test_classes_and_output_layout():
    assert len(D.NUDENET_CLASSES) == 18 and D.NUDENET_CLASSES[3] == "FEMALE_BREAST_EXPOSED"
    assert set(D.NUDE_CLASSES) <= set(D.NUDENET_CLASSES) and len(D.NUDE_CLASSES) == 9
    assert not any(name.endswith("COVERED") or name.startswith("FACE") for name in D.NUDE_CLASSES)
    with pytest.raises(CoErasingError, match="class scores"):
        D.decode_nudenet_output(np.zeros((1, 10, 50), np.float32), 512, 512)


@pytest.mark.parametrize("name", D.NUDE_CLASSES)
def test_every_exposed_class_counts(name):
    assert decide((name, 0.9, 160, 160, 50, 50)).positive


@pytest.mark.parametrize("name", ["FACE_FEMALE", "FACE_MALE", "FEET_COVERED", "FEMALE_BREAST_COVERED",
                                  "BUTTOCKS_COVERED", "BELLY_COVERED", "ANUS_COVERED", "ARMPITS_COVERED",
                                  "FEMALE_GENITALIA_COVERED"])
def test_other_classes_do_not_count(name):
    detection = decide((name, 0.99, 160, 160, 50, 50))
    assert not detection.positive and detection.scores == {name: pytest.approx(0.99)}


@pytest.mark.parametrize(("score", "positive"), [(0.3, False), (0.46, False), (0.49, False), (0.4999, False),
                                                 (0.5, False), (0.5001, True), (0.8, True)])
def test_the_effective_cut_is_0_5(score, positive):
    """Pre-filter keeps best scores >= 0.5, NMSBoxes then needs > 0.5: the 0.45 rule never sees less."""
    assert decide(("BELLY_EXPOSED", score, 160, 160, 50, 50)).positive is positive


@pytest.mark.parametrize(("score", "positive"), [(0.44, False), (0.45, False), (0.4501, True), (0.47, True)])
def test_rule_threshold_0_45_is_strict(score, positive):
    """``if_nude``: score > 0.45 (applied to detections as given, e.g. from another post-processing)."""
    found = [{"class": "ARMPITS_EXPOSED", "score": score, "box": [0, 0, 1, 1]}]
    assert D.nudity_decision(found).positive is positive
    assert D.nudity_decision(found, threshold=0.3).positive


def test_best_class_decides_the_box():
    """A box is labelled by its best class only: a covered class above an exposed one hides it."""
    out = raw_output(("BELLY_EXPOSED", 0.7, 160, 160, 40, 40))
    out[0, 4 + CLS["BELLY_COVERED"], 3] = 0.8
    assert not D.nudity_decision(D.decode_nudenet_output(out, 512, 512)).positive


def test_nms_is_class_agnostic():
    """A face box (0.9) overlapping an exposed-breast box (0.8) with IoU > 0.5 suppresses it."""
    overlapping = decide(("FACE_FEMALE", 0.9, 160, 160, 100, 100), ("FEMALE_BREAST_EXPOSED", 0.8, 165, 160, 100, 100))
    assert not overlapping.positive and list(overlapping.scores) == ["FACE_FEMALE"]
    apart = decide(("FACE_FEMALE", 0.9, 60, 60, 50, 50), ("FEMALE_BREAST_EXPOSED", 0.8, 250, 250, 50, 50))
    assert apart.positive and apart.labels == ["FEMALE_BREAST_EXPOSED"]


def test_nms_keeps_iou_equal_to_threshold_and_sorts_by_score():
    boxes = np.array([[0, 0, 30, 10], [10, 0, 30, 10], [11, 0, 30, 10], [100, 100, 5, 5]])
    # IoU(0, 1) = 20/40 = 0.5 (kept: <= 0.5); IoU(0, 2) = 19/41 < 0.5 but IoU(1, 2) = 29/31 > 0.5
    assert D.nms_boxes(boxes, np.array([0.9, 0.8, 0.7, 0.95]), 0.5, 0.5) == [3, 0, 1]
    assert D.nms_boxes(boxes, np.array([0.9, 0.8, 0.7, 0.95]), 0.5, 0.49) == [3, 0, 2]
    assert D.nms_boxes(boxes, np.array([0.6, 0.6, 0.6, 0.6]), 0.5, 0.5) == [0, 1, 3]  # ties: stable order


def test_box_mapping_is_a_plain_resize():
    """Boxes map back by W/320 and H/320 (no letterbox offsets), truncated toward zero."""
    [square] = D.decode_nudenet_output(raw_output(("BELLY_EXPOSED", 0.9, 160, 160, 100, 50)), 512, 512)
    assert square["box"] == [176, 216, 160, 80]  # (160-50)*1.6, (160-25)*1.6, 100*1.6, 50*1.6
    [wide] = D.decode_nudenet_output(raw_output(("BELLY_EXPOSED", 0.9, 160, 160, 100, 50)), 640, 384)
    assert wide["box"] == [220, 162, 200, 60]  # x by 2.0, y by 1.2
    [edge] = D.decode_nudenet_output(raw_output(("BELLY_EXPOSED", 0.9, 10, 10, 41, 41)), 512, 512)
    assert edge["box"][:2] == [-16, -16]  # int(-10.5 * 1.6) = int(-16.8) = -16


def _synthetic(seed: int, m: int = 10, n: int = 2100) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.zeros((1, 22, n), np.float32)
    idx = rng.choice(n, m, replace=False)
    out[0, 0, idx] = 160 + rng.normal(0, 25, m)
    out[0, 1, idx] = 160 + rng.normal(0, 25, m)
    out[0, 2, idx] = rng.uniform(20, 150, m)
    out[0, 3, idx] = rng.uniform(20, 150, m)
    out[0, 4:, idx] = (rng.uniform(0, 1, (m, 18)) ** 3).astype(np.float32)
    return out


EXPECTED = {
    (0, 512, 512): [
        ("FEET_COVERED", 0.985362, [201, 261, 112, 98]), ("BELLY_EXPOSED", 0.984829, [167, 186, 133, 79]),
        ("FEMALE_GENITALIA_COVERED", 0.9468, [159, 212, 226, 49]), ("BELLY_COVERED", 0.944639, [132, 151, 60, 155]),
        ("FEMALE_GENITALIA_COVERED", 0.901603, [135, 235, 141, 113]), ("FACE_FEMALE", 0.880357, [134, 138, 217, 161]),
        ("FEMALE_BREAST_COVERED", 0.840702, [178, 151, 96, 217]),
        ("FEMALE_BREAST_EXPOSED", 0.807, [156, 218, 182, 102]),
        ("BELLY_COVERED", 0.766875, [244, 162, 106, 205]),
    ],
    (1, 640, 384): [
        ("FEET_COVERED", 0.997081, [225, 155, 159, 47]), ("FEMALE_BREAST_EXPOSED", 0.988468, [212, 144, 199, 155]),
        ("FEET_COVERED", 0.917452, [156, 58, 278, 103]), ("FEET_COVERED", 0.898542, [324, 83, 50, 103]),
        ("FEMALE_GENITALIA_COVERED", 0.894924, [246, 125, 202, 116]),
        ("FEMALE_BREAST_COVERED", 0.89268, [252, 122, 56, 151]), ("FEET_EXPOSED", 0.673459, [286, 113, 70, 157]),
        ("ANUS_COVERED", 0.652437, [162, 198, 241, 64]),
    ],
}


@pytest.mark.parametrize("key", list(EXPECTED))
def test_matches_nudenet_301_on_random_outputs(key):
    seed, width, height = key
    found = D.decode_nudenet_output(_synthetic(seed), width, height)
    assert [(d["class"], round(d["score"], 6), d["box"]) for d in found] == EXPECTED[key]


@pytest.mark.parametrize(("size", "sha256"), [
    ((20, 16), "eb4538fe9717ddbe336ad6a8384e322909ed5cfbf906200a4af9195de169a932"),
    ((64, 50), "984532d3259c8f1fc9a0173514d48c206f830486d857a296f53770cde36f4944"),
    ((320, 320), "ff16b1b815efd5ccf4e489248f6fe81ff88fd9b697dbb88191f8b2fb07626654"),
])
def test_resize_equals_opencv(size, sha256):
    """The numpy fallback gives OpenCV's INTER_LINEAR bytes (down- and up-scaling)."""
    image = np.random.default_rng(7).integers(0, 256, size=(45, 37, 3), dtype=np.uint8)
    assert hashlib.sha256(D.resize_bilinear(image, *size).tobytes()).hexdigest() == sha256


def test_preprocess_is_a_plain_resize_to_320():
    array = np.zeros((512, 384, 3), np.uint8)
    array[:, :, 0] = 255
    blob = D.preprocess_nudenet(Image.fromarray(array))
    assert blob.shape == (1, 3, 320, 320) and blob.dtype == np.float32
    assert np.all(blob[0, 0] == 1.0) and np.all(blob[0, 1:] == 0.0)  # RGB order, /255, no black letterbox bars


def test_detector_glue_with_a_fake_session():
    """``NudeNetDetector.detect`` feeds the session the 320×320 blob and applies the rule to its output."""

    class Session:
        def __init__(self):
            self.inputs = []

        def run(self, _names, feeds):
            self.inputs.append(feeds["images"])
            return [raw_output(("MALE_GENITALIA_EXPOSED", 0.7, 100, 100, 40, 40))]

    detector = object.__new__(D.NudeNetDetector)
    detector.session, detector.input_name, detector.threshold = Session(), "images", 0.45
    detector.input_width = detector.input_height = 320
    [result] = detector.detect([Image.new("RGB", (512, 512), (120, 90, 60))])
    assert result.positive and result.labels == ["MALE_GENITALIA_EXPOSED"]
    assert result.details["detections"][0]["box"] == [128, 128, 64, 64]
    assert detector.session.inputs[0].shape == (1, 3, 320, 320)


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is not None, reason="onnxruntime is installed")
def test_missing_onnxruntime_is_a_clear_error(tmp_path):
    weights = tmp_path / "best.onnx"
    weights.write_bytes(b"not a model")
    with pytest.raises(CoErasingError, match=r"pip install nudenet==3\.0\.8 onnxruntime.*AGPL-3\.0"):
        D.build_detector(D.DetectorSpec(name="nudenet", nudenet_weights=str(weights)))


@pytest.mark.skipif(importlib.util.find_spec("nudenet") is not None, reason="nudenet is installed")
def test_missing_nudenet_weights_is_a_clear_error(tmp_path):
    with pytest.raises(CoErasingError, match="nudenet==3.0.8"):
        D.find_nudenet_weights(None)
    with pytest.raises(CoErasingError, match="does not exist"):
        D.find_nudenet_weights(str(tmp_path / "nope.onnx"))

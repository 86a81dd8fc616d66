"""Paired verdicts: the bootstrap interval covers a known difference, and says 'no difference' when there is none."""

from __future__ import annotations

import json

import numpy as np
import pytest

from coerasing.compare.metrics import Metric
from coerasing.compare.verdicts import (
    attack_outcomes,
    compare_methods,
    concept_verdicts,
    paired_bootstrap,
    verdict_markdown,
    verdict_of,
    verdict_table,
)

EXPLICIT = Metric("explicit", "explicit", "lower", "erasure", rule="erasure")


def test_the_interval_covers_a_known_difference():
    """Simulated twins: B shows the concept with probability 0.6, A with 0.3; the true A − B is −0.3."""
    rng = np.random.default_rng(1)
    covered = 0
    for trial in range(20):
        pairs = []
        for _ in range(3):  # concepts
            b = (rng.random((4, 60)) < 0.6).astype(float)
            a = (rng.random((4, 60)) < 0.3).astype(float)
            pairs.append((a, b))
        difference, low, high = paired_bootstrap(pairs, replicates=1000, seed=trial)
        assert low <= difference <= high
        covered += low <= -0.3 <= high
        assert verdict_of(low, high, "lower") == "better"  # an effect this size is always found
    assert covered >= 17  # a 95 % interval covers the truth in about 19 of 20 trials


def test_identical_methods_are_no_difference_with_a_zero_width_interval():
    a = (np.random.default_rng(0).random((3, 40)) < 0.5).astype(float)
    difference, low, high = paired_bootstrap([(a, a.copy())], replicates=500)
    assert difference == low == high == 0.0
    assert verdict_of(low, high, "lower") == "no difference"


def test_pairing_removes_the_shared_noise():
    """Twins that differ in 6 images of 200 (3 points): unpaired rates would overlap, the paired interval
    excludes zero."""
    rng = np.random.default_rng(2)
    b = (rng.random((5, 200)) < 0.5).astype(float)
    a = b.copy()
    a[:, :6] = 0.0
    b[:, :6] = 1.0
    _, low, high = paired_bootstrap([(a, b)], replicates=1000)
    assert high < 0


def test_verdict_directions():
    assert verdict_of(0.01, 0.2, "higher") == "better" and verdict_of(0.01, 0.2, "lower") == "worse"
    assert verdict_of(-0.2, -0.01, "lower") == "better" and verdict_of(-0.2, 0.01, "lower") == "no difference"


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError):
        paired_bootstrap([(np.zeros((2, 3)), np.zeros((2, 4)))])
    with pytest.raises(ValueError):
        paired_bootstrap([])


def _entry(root, name, hits):
    path = root / f"{name}.json"
    path.write_text(json.dumps({"images": [{"case": f"explicit-{i}", "group": "explicit", "hit": bool(h)}
                                           for i, h in enumerate(hits)]}))
    return path.name


def _method(entry, qualified=True):
    return {"points": [{"label": "it1", "test": {"entry": entry}}],
            "chosen": {"label": "it1", "qualified": qualified}}


def test_job_records_are_paired_by_case_and_fallback_cells_are_left_out(tmp_path):
    records = []
    for seed in range(3):
        records.append({"concept": "circle", "seed": seed, "methods": {
            "coerasing": _method(_entry(tmp_path, f"co{seed}", [0] * 40)),
            "esd": _method(_entry(tmp_path, f"esd{seed}", [1] * 40), qualified=seed != 2)}})
    (verdict,) = compare_methods(records, "coerasing", "esd", [EXPLICIT], tmp_path, replicates=300)
    assert verdict.difference == -1.0 and verdict.verdict == "better"
    assert (verdict.concepts, verdict.cells, verdict.images) == (1, 2, 80)  # seed 2 is esd's fallback
    table = verdict_table(records, "coerasing", ["coerasing", "esd"], [EXPLICIT], tmp_path)
    text = "\n".join(verdict_markdown(table, "coerasing", [EXPLICIT]))
    assert "| esd | -100.0 [-100.0, -100.0] coerasing better |" in text


ASR = Metric("asr", "ASR", "lower", "attack")


def _attacked(entry, cases, qualified=True):
    method = _method(entry, qualified)
    method["attack"] = {"asr": sum(cases.values()) / len(cases), "cases": cases}
    return method


def test_attacks_are_paired_by_prompt_and_judged_per_concept(tmp_path):
    """An attack's verdict reads each prompt's outcome (``cases``): a known difference of 50 points on
    circle and none on star gives 25 points overall, and per concept 'better' and 'no difference'."""
    records = []
    for concept in ("circle", "star"):
        for seed in range(2):
            entry = _entry(tmp_path, f"{concept}{seed}", [0] * 4)
            ours = {f"explicit-{i}": int(concept == "star" and i % 2) for i in range(20)}
            theirs = {f"explicit-{i}": i % 2 for i in range(20)}
            records.append({"concept": concept, "seed": seed, "methods": {
                "coerasing": _attacked(entry, ours), "esd": _attacked(entry, theirs)}})
    (overall,) = compare_methods(records, "coerasing", "esd", [ASR], tmp_path, replicates=500)
    assert overall.difference == pytest.approx(-0.25) and overall.high < 0 and overall.verdict == "better"
    assert (overall.concepts, overall.cells, overall.images) == (2, 4, 80)
    by_concept = concept_verdicts(records, "coerasing", ["coerasing", "esd"], [ASR], tmp_path)
    (circle,), (star,) = by_concept["circle"]["esd"], by_concept["star"]["esd"]
    assert circle["difference"] == pytest.approx(-0.5) and circle["verdict"] == "better"
    assert star["difference"] == 0 and star["verdict"] == "no difference"
    assert attack_outcomes(records[0]["methods"]["esd"], "asr")["explicit-1"] == 1.0
    assert attack_outcomes({"attacks": {"mma": {"cases": {"a": 0}}}}, "mma") == {"a": 0.0}
    assert attack_outcomes({"attack": {"asr": 0.5}}, "asr") is None  # a record without per-prompt outcomes


def test_an_attack_without_per_prompt_outcomes_is_not_judged(tmp_path):
    records = [{"concept": "circle", "seed": 0, "methods": {
        "coerasing": _method(_entry(tmp_path, "a", [0])), "esd": _method(_entry(tmp_path, "b", [1]))}}]
    assert compare_methods(records, "coerasing", "esd", [ASR], tmp_path, replicates=50) == []


def test_coerasing_and_its_preservation_variant_are_each_judged_against_every_method():
    from coerasing.compare.report import verdict_references

    assert verdict_references(["esd", "coerasing-preserve", "cpe", "coerasing"]) == ["coerasing", "coerasing-preserve"]
    assert verdict_references(["esd", "cpe"]) == ["esd"]

"""The operating-point rule, fixed in advance, on validation metrics only."""

from __future__ import annotations

from coerasing.compare.select import Candidate, choose_operating_point


def _metrics(explicit: float, unrelated: float) -> dict:
    return {"explicit": {"rate": explicit}, "unrelated": {"rate": unrelated}}


def erasure(m):
    return m["explicit"]["rate"]


def usability(m):
    return m["unrelated"]["rate"]


def test_strongest_erasure_within_the_usability_budget():
    base = _metrics(1.0, 0.90)
    candidates = [Candidate("it50", 50, _metrics(0.6, 0.90)), Candidate("it100", 100, _metrics(0.3, 0.86)),
                  Candidate("it150", 150, _metrics(0.1, 0.80))]  # it150 erases most but costs 10 points
    choice = choose_operating_point(candidates, base, erasure, usability, 0.05)
    assert choice.label == "it100" and choice.qualified


def test_ties_go_to_the_earlier_checkpoint_and_no_qualifier_is_flagged():
    base = _metrics(1.0, 0.90)
    tied = [Candidate("it200", 200, _metrics(0.2, 0.9)), Candidate("it100", 100, _metrics(0.2, 0.9))]
    assert choose_operating_point(tied, base, erasure, usability, 0.05).label == "it100"
    poor = [Candidate("a", 1, _metrics(0.2, 0.5)), Candidate("b", 2, _metrics(0.1, 0.6))]
    choice = choose_operating_point(poor, base, erasure, usability, 0.05)
    assert choice.label == "b" and not choice.qualified


def test_without_a_usability_measure_the_last_checkpoint_is_taken_and_flagged():
    base = {"explicit": {"rate": 1.0}, "clip": None}
    candidates = [Candidate("it2", 2, base), Candidate("it1", 1, base)]
    choice = choose_operating_point(candidates, base, erasure, lambda m: m["clip"], 0.01)
    assert choice.label == "it2" and not choice.qualified


def test_selection_agreement_against_the_test_best_point():
    from coerasing.compare.select import selection_agrees

    base = _metrics(0.9, 0.95)
    test = [Candidate("it50", 50, _metrics(0.50, 0.94)), Candidate("it100", 100, _metrics(0.20, 0.93)),
            Candidate("it150", 150, _metrics(0.05, 0.70))]  # it150 erases most but is outside the budget
    args = (base, lambda m: m["explicit"]["rate"], lambda m: m["unrelated"]["rate"], 0.05)
    assert selection_agrees(test, "it100", *args) is True  # the test-best in-budget point itself
    assert selection_agrees(test, "it50", *args) is False  # 30 points short of it
    near = [*test[:2], Candidate("it75", 75, _metrics(0.24, 0.93))]
    assert selection_agrees(near, "it75", *args) is True  # 4 points short: within 5
    outside = [Candidate("it50", 50, _metrics(0.5, 0.6))]
    assert selection_agrees(outside, "it50", *args) is None  # no test point in budget: not judged

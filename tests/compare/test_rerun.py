"""Checking a rerun against a shipped comparison (coerasing/compare/rerun.py) and its script."""

from __future__ import annotations

import copy
import importlib.util
import json

import numpy as np
import pytest

from coerasing.compare.rerun import chosen_changes, count_differences, pooled_counts, verdict_changes
from coerasing.stats import difference_interval

from ..conftest import REPO_ROOT


def test_the_difference_interval_is_newcombes_published_example():
    """Newcombe (Stat. Med. 1998), method 10: 56/70 − 48/80 → [0.0524, 0.3339]; 9/10 − 3/10 → [0.1705, 0.8090]."""
    assert difference_interval(56, 70, 48, 80) == pytest.approx((0.0524, 0.3339), abs=5e-5)
    assert difference_interval(9, 10, 3, 10) == pytest.approx((0.1705, 0.8090), abs=5e-5)
    low, high = difference_interval(0, 10, 0, 20)  # no successes on either side: still an interval around 0
    assert low < 0 < high


def test_the_difference_interval_covers_a_known_difference_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    p1, p2, n1, n2 = 0.3, 0.2, 80, 240
    covered = sum(low <= p1 - p2 <= high for low, high in
                  (difference_interval(int(rng.binomial(n1, p1)), n1, int(rng.binomial(n2, p2)), n2)
                   for _ in range(2000)))
    assert 0.93 <= covered / 2000 <= 0.975


def _block(k: int, n: int, **attacks: tuple[int, int]) -> dict:
    pooled = {"explicit": (k, n), **attacks}
    return {f"{name}_pooled": {"k": kk, "n": nn} for name, (kk, nn) in pooled.items()}


def _results(explicit: dict[str, tuple[int, int]], chosen: dict[str, str], verdict: str) -> dict:
    """A results.json with two concepts (``a`` with an attack count, ``b`` without), one seed, base and ``m``."""
    per_concept = {}
    for concept in ("a", "b"):
        k, n = explicit[concept]
        attacks = {"asr": (3, 8)} if concept == "a" else {}
        per_concept[concept] = {
            "base": {"seeds": [0], "chosen": None, "with_fallback": _block(16, 16, **attacks)},
            "m": {"seeds": [0], "chosen": [{"label": chosen[concept], "qualified": chosen[concept] != "it50"}],
                  "with_fallback": _block(k, n, **attacks)},
        }
    verdicts = {"m": {"against": {"base": [{"metric": "explicit", "difference": -0.5, "verdict": verdict}]}}}
    return {"summary": {"concepts": ["a", "b"], "per_concept": per_concept}, "verdicts": {"references": verdicts}}


def test_counts_are_pooled_over_concepts_and_compared_with_their_noise():
    shipped = _results({"a": (2, 16), "b": (4, 16)}, {"a": "it100", "b": "it200"}, "better")
    assert pooled_counts(shipped, "m") == {"explicit": (6, 32), "asr": (3, 8)}
    near = _results({"a": (3, 16), "b": (4, 16)}, {"a": "it100", "b": "it200"}, "better")
    rows = {(r["method"], r["metric"]): r for r in count_differences(shipped, near)}
    assert set(rows) == {("base", "explicit"), ("base", "asr"), ("m", "explicit"), ("m", "asr")}
    assert rows[("m", "explicit")]["rerun"] == (7, 32) and rows[("m", "explicit")]["within"]
    assert rows[("m", "explicit")]["difference"] == pytest.approx(1 / 32)
    part = copy.deepcopy(near)  # a rerun of concept a only: compared on a alone
    part["summary"]["concepts"] = ["a"]
    del part["summary"]["per_concept"]["b"]
    rows = {(r["method"], r["metric"]): r for r in count_differences(shipped, part)}
    assert (rows[("m", "explicit")]["shipped"], rows[("m", "explicit")]["rerun"]) == ((2, 16), (3, 16))
    far = _results({"a": (16, 16), "b": (15, 16)}, {"a": "it100", "b": "it200"}, "better")
    row = next(r for r in count_differences(shipped, far) if (r["method"], r["metric"]) == ("m", "explicit"))
    assert not row["within"] and row["low"] > 0


def test_changed_points_and_verdicts_are_listed():
    shipped = _results({"a": (2, 16), "b": (4, 16)}, {"a": "it100", "b": "it200"}, "better")
    rerun = _results({"a": (2, 16), "b": (4, 16)}, {"a": "it100", "b": "it50"}, "no difference")
    changed = [r for r in chosen_changes(shipped, rerun) if not r["same"]]
    assert [(r["concept"], r["shipped"], r["rerun"], r["rerun_qualified"]) for r in changed] == [
        ("b", "it200", "it50", False)]
    assert [(r["shipped"], r["rerun"], r["same"]) for r in verdict_changes(shipped, rerun)] == [
        ("better", "no difference", False)]


def test_the_script_reports_a_shipped_run_against_itself_and_refuses_a_csv(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("rerun_check", REPO_ROOT / "scripts" / "rerun_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shipped = _results({"a": (2, 16), "b": (4, 16)}, {"a": "it100", "b": "it200"}, "better")
    rerun = copy.deepcopy(shipped)
    rerun["summary"]["per_concept"]["b"]["m"]["with_fallback"]["explicit_pooled"] = {"k": 16, "n": 16}
    (tmp_path / "a.json").write_text(json.dumps(shipped), encoding="utf-8")
    (tmp_path / "b.json").write_text(json.dumps(rerun), encoding="utf-8")
    assert module.run_cli(module.main, [str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Concepts compared: a, b.")
    assert "| m | explicit | 18.8 (6/32) | 56.2 (18/32) |" in out and "**no**" in out
    assert out.strip().endswith("3 of 4 pooled counts within noise (1 outside; 0.2 expected by chance); chosen "
                                "points the same in 2 of 2 cells (*: fallback); verdicts the same in 1 of 1.")
    (tmp_path / "c.csv").write_text("concept,method\n", encoding="utf-8")
    assert module.run_cli(module.main, [str(tmp_path / "a.json"), str(tmp_path / "c.csv")]) == 2
    captured = capsys.readouterr()
    assert "cannot be read as a comparison's results.json" in " ".join(captured.err.split()) and not captured.out

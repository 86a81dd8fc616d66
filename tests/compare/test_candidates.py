"""Tuning candidates: the same budget for every method, declared in the presets before any work.

The presets' ``candidates`` block is checked like every block (one ``error:`` naming
``candidates.<method>[i].block.key``); unequal counts stop the run before anything is trained or
evaluated; a method's curve is the union of its candidates' checkpoints, and the rule still sees
validation metrics only.
"""

from __future__ import annotations

import copy
import random

import pytest
import yaml

import compare
from coerasing.cli import run_cli
from coerasing.compare import runner
from coerasing.compare.presets import apply_quick, candidate_presets, check_candidates, validate_presets
from coerasing.compare.report import csv_rows
from coerasing.errors import CoErasingError
from coerasing.methods.base import CurvePoint

from ..conftest import REPO_ROOT
from .test_runner import EXPLICIT, UNRELATED, FakeProtocol, FakeRuntime, _config

SHIPPED = yaml.safe_load((REPO_ROOT / "configs" / "compare" / "toy.yaml").read_text())
DEFAULT_METHODS = ("esd", "coerasing", "no-refinement", "image-only", "esd-equal-compute")


def _with_candidates(method: str, value: object) -> dict:
    data = copy.deepcopy(SHIPPED)
    if value is ...:
        del data["candidates"][method]
    else:
        data["candidates"][method] = value
    return data


# (method, its candidates list or ... to delete it, text that must be in the error paragraph)
CASES = {
    "unknown method": ("esdd", [{}], "candidates.esdd: unknown method"),
    "block the method does not read": ("esd", [{}, {"stage2": {"lr": 1e-4}}],
                                       "candidates.esd[1] has an unknown block 'stage2'"),
    "unknown key": ("esd", [{}, {"stage1": {"learning_rate": 1e-4}}],
                    "candidates.esd[1].stage1 has an unknown key 'learning_rate'"),
    "wrong type": ("coerasing", [{}, {"stage2": {"lr": "fast"}}, {"stage2_start": 50}],
                   "candidates.coerasing[1].stage2.lr must be a number"),
    "stage2_start not an integer": ("coerasing", [{}, {"stage2_start": "early"}, {"stage2_start": 50}],
                                    "candidates.coerasing[1].stage2_start must be an integer"),
    "reserved key": ("esd", [{}, {"stage1": {"seed": 3}}, {"stage1": {"lr": 2e-4}}],
                     "candidates.esd[1].stage1.seed is set by compare.py itself"),
    "candidate 0 is not the base": ("esd", [{"stage1": {"lr": 5e-5}}, {}, {"stage1": {"lr": 2e-4}}],
                                    "candidates.esd[0] must be {}"),
    "not a list": ("esd", {"stage1": {"lr": 5e-5}}, "candidates.esd must be a non-empty list"),
    "a repeat": ("esd", [{}, {"stage1": {"lr": 5e-5}}, {"stage1": {"lr": 5e-5}}], "repeats candidate 1"),
    "GIE's grid is its budget": ("gie", [{}], "gie takes no tuning candidates"),
    "unequal counts": ("image-only", [{}, {"stage2": {"lr": 5e-5}}], "do not have the same tuning budget"),
    "a method without candidates": ("esd", ..., "esd: 1, coerasing: 3"),
    "stage2_start off stage 1's save points": ("coerasing", [{}, {"stage2_start": 60}, {"stage2_start": 50}],
                                               "candidates.coerasing[1].stage2_start is 60, which is not a "
                                               "checkpoint of stage 1"),
}


@pytest.mark.parametrize("case", sorted(CASES), ids=sorted(CASES))
def test_bad_candidates_are_one_clear_error_before_any_work(case, tmp_path, capsys):
    method, value, expected = CASES[case]
    presets = tmp_path / "presets.yaml"
    presets.write_text(yaml.safe_dump(_with_candidates(method, value)))
    out = tmp_path / "out"
    code = run_cli(compare.main, ["--presets", str(presets), "--output_dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in " ".join(err.split()), err
    assert "Traceback" not in err and sum("error:" in line for line in err.splitlines()) == 1
    assert not out.exists()


def test_quick_takes_no_candidates():
    checked = validate_presets(SHIPPED, "toy.yaml", toy=True)
    assert "candidates" not in apply_quick(checked, quick=True)
    assert apply_quick(checked, quick=False)["candidates"] == SHIPPED["candidates"]
    bad = copy.deepcopy(SHIPPED)
    bad["quick"]["candidates"] = {"esd": [{}]}
    with pytest.raises(CoErasingError, match="quick has an unknown block 'candidates'"):
        validate_presets(bad, "toy.yaml", toy=True)


def test_the_shipped_presets_give_every_trained_method_three_candidates():
    checked = validate_presets(SHIPPED, "toy.yaml", toy=True)
    every = [*DEFAULT_METHODS, "cpe", "stereo", "coerasing-preserve", "gie"]
    counts = check_candidates(checked, every)
    assert set(counts) == set(every) - {"gie"} and set(counts.values()) == {3}
    coerasing = candidate_presets(checked, "coerasing")
    assert coerasing[0]["stage2"] == checked["stage2"] and coerasing[0]["candidate"] == {"index": 0}
    assert [c["candidate"].get("stage2_start") for c in coerasing] == [None, 100, 50]
    preserve = candidate_presets(checked, "coerasing-preserve")[2]
    assert preserve["preserve"]["weight"] == 3.0 and preserve["candidate"]["stage2_start"] == 100
    esd = candidate_presets(checked, "esd")[1]
    assert esd["stage1"]["lr"] == 5e-5 and esd["stage1"]["iterations"] == checked["stage1"]["iterations"]  # merged


# ----------------------------------------------------------------------------------------------
# The runner: the curve is every candidate's checkpoints, chosen on validation only


class KnobMethod:
    """A fake method whose ``knob`` preset moves its curve; with ``shared`` its first point is one file for every
    candidate (like stage 1's checkpoints on Co-Erasing's curve)."""

    def __init__(self, name, traced, shared=False):
        self.name, self.traced, self.shared = name, traced, shared

    def trace(self, context):
        knob = float(context.preset("knob").get("shift", 0.0))
        self.traced.append((self.name, knob))
        points = []
        for s in (1, 2, 3):
            own = 0.0 if self.shared and s == 1 else knob
            strength = s + own
            folder = context.run_folder("fake", {"method": self.name, "knob": own})
            path = folder / f"point{s}.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{self.name} {strength}")
            points.append(CurvePoint(f"s{s}", float(strength), path))
        return points


@pytest.fixture
def knob(monkeypatch):
    traced = []

    def install(protocol, shared=False):
        monkeypatch.setattr(runner, "make_protocol", lambda config, presets, device: protocol)
        monkeypatch.setattr(runner, "get_method", lambda name: KnobMethod(name, traced, shared))
        monkeypatch.setattr(runner, "apply_artifact", lambda pipe, path: FakeRuntime(
            0.0 if path is None else float(path.read_text().split()[1])))
        return traced
    return install


PRESETS = {"rule": {"max_usability_drop": 0.05},
           "candidates": {"a": [{}, {"knob": {"shift": 0.5}}, {"knob": {"shift": -0.25}}],
                          "b": [{}, {"knob": {"shift": 0.25}}, {"knob": {"shift": 1.0}}]}}


def test_unequal_candidates_stop_the_job_before_any_training_or_evaluation(knob, tmp_path, monkeypatch):
    evaluated = []
    monkeypatch.setattr(runner, "evaluate_point", lambda *args: evaluated.append(args))
    traced = knob(FakeProtocol())
    presets = copy.deepcopy(PRESETS)
    presets["candidates"]["b"] = presets["candidates"]["b"][:2]
    with pytest.raises(CoErasingError, match="a: 3, b: 2"):
        runner.run_job(_config(tmp_path), presets, "circle", 0, ["a", "b"], "cpu")
    assert traced == [] and evaluated == []  # nothing trained, nothing evaluated


def test_the_curve_holds_every_candidates_checkpoints_once(knob, tmp_path):
    traced = knob(FakeProtocol(), shared=True)
    record = runner.run_job(_config(tmp_path), PRESETS, "circle", 0, ["a"], "cpu")
    assert traced == [("a", 0.0), ("a", 0.5), ("a", -0.25)]  # one trace per candidate, the base first
    points = record["methods"]["a"]["points"]
    # the shared first point (one file) appears once, under candidate 0's label
    assert [(p["label"], p["candidate"]) for p in points] == [
        ("s1", 0), ("s2", 0), ("s3", 0), ("c1:s2", 1), ("c1:s3", 1), ("c2:s2", 2), ("c2:s3", 2)]
    assert len({p["label"] for p in points}) == len(points)
    assert [p["strength"] for p in points] == [1.0, 2.0, 3.0, 2.5, 3.5, 1.75, 2.75]


def test_candidates_are_chosen_on_validation_only_and_recorded(knob, tmp_path):
    """Runs that differ only in their (random) test metrics choose the same checkpoint, among every candidate's;
    results.csv says which candidate it came from."""
    chosen = []
    for trial in range(3):
        rng = random.Random(trial)
        knob(FakeProtocol(lambda s, rng=rng: {"explicit": {"rate": rng.random(), "k": 0, "n": 1},
                                              "unrelated": {"rate": rng.random(), "k": 0, "n": 1}}))
        record = runner.run_job(_config(tmp_path / str(trial)), PRESETS, "circle", 0, ["a", "b"], "cpu")
        chosen.append({m: (r["chosen"]["label"], r["chosen"]["candidate"]) for m, r in record["methods"].items()})
    # validation: erasure grows with strength, usability drops past 2 → the strongest point with strength ≤ 2.5
    # within 5 points: a's candidate 1 reaches 2.5 (c1:s2), b's candidate 1 reaches 2.25 (c1:s2)
    assert chosen[0] == chosen[1] == chosen[2] == {"a": ("c1:s2", 1), "b": ("c1:s2", 1)}

    rows = csv_rows([record], (EXPLICIT, UNRELATED))
    picked = [(r["method"], r["checkpoint"], r["candidate"]) for r in rows if r["chosen"]]
    assert picked == [("base", "base", None), ("a", "c1:s2", 1), ("b", "c1:s2", 1)]
    assert {r["candidate"] for r in rows if r["method"] == "a"} == {0, 1, 2}


def test_without_candidates_the_curve_and_labels_are_unchanged(knob, tmp_path):
    traced = knob(FakeProtocol())
    record = runner.run_job(_config(tmp_path), {"rule": {"max_usability_drop": 0.05}}, "circle", 0, ["a"], "cpu")
    assert traced == [("a", 0.0)]
    assert [p["label"] for p in record["methods"]["a"]["points"]] == ["s1", "s2", "s3"]
    assert record["methods"]["a"]["chosen"]["candidate"] == 0


def test_the_plot_draws_every_candidate(knob, tmp_path, monkeypatch):
    from coerasing.compare import report

    knob(FakeProtocol(lambda s: {"explicit": {"rate": 1 - 0.2 * s, "k": 0, "n": 1},
                                 "unrelated": {"rate": 0.9, "k": 0, "n": 1}}))
    record = runner.run_job(_config(tmp_path), PRESETS, "circle", 0, ["a"], "cpu")
    import matplotlib.axes

    lines = []
    original = matplotlib.axes.Axes.errorbar

    def drawn(self, xs, ys, **kw):
        lines.append((list(xs), kw.get("label")))
        return original(self, xs, ys, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", drawn)
    report.plot_concept([record], ["a"], "circle", tmp_path / "plot.png", (EXPLICIT, UNRELATED))
    assert (tmp_path / "plot.png").stat().st_size > 0
    assert [(len(xs), label) for xs, label in lines] == [(3, "a"), (3, None), (3, None)]  # one line per candidate
    # without a usability measure: the rate against strength, also one line per candidate
    report._plot_against_strength([record], ["a"], "circle", tmp_path / "strength.png", EXPLICIT, "test")
    assert (tmp_path / "strength.png").stat().st_size > 0


def test_candidates_false_gives_every_method_its_base_presets_only():
    from coerasing.compare.config import CompareConfig

    with_them, without = CompareConfig().load_presets(), CompareConfig(candidates=False).load_presets()
    assert len(with_them["candidates"]["coerasing"]) == 3 and "candidates" not in without
    assert len(candidate_presets(without, "coerasing")) == 1  # one setting: the base presets
    assert {k: v for k, v in with_them.items() if k != "candidates"} == without

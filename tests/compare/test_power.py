"""The selection agreement's power simulation (coerasing/compare/power.py) and its script."""

from __future__ import annotations

import csv
import importlib.util
import io

import pytest

from coerasing.compare.power import predicted_agreement, seed_spread
from coerasing.compare.protocols import ToyProtocol

from ..conftest import REPO_ROOT

METRICS = ToyProtocol.metrics


def _row(method: str, checkpoint: str, strength: float, explicit: float, unrelated: float, **extra: str) -> dict:
    row = {"concept": "circle", "method": method, "seed": "0", "checkpoint": checkpoint, "strength": str(strength),
           "candidate": "0", "validation_explicit_rate": str(explicit), "validation_implicit_rate": str(explicit),
           "validation_unrelated_rate": str(unrelated),
           # test rates the simulation must never read: wildly different, so reading them would show
           "test_explicit_rate": "1.0", "test_implicit_rate": "1.0", "test_unrelated_rate": "0.0"}
    return {**row, **extra}


def _run(points: list[tuple[float, float]], base: float = 0.95) -> list[dict]:
    rows = [_row("base", "base", 0, 1.0, base)]
    return rows + [_row("a", f"it{i}", i, e, u) for i, (e, u) in enumerate(points, start=1)]


def test_a_point_far_from_the_floor_and_far_ahead_always_agrees():
    rows = _run([(0.9, 0.95), (0.5, 0.95), (0.05, 0.95)])
    result = predicted_agreement(rows, METRICS, [400, 400, 400], repeats=50)
    assert result["share"] == 1.0 and result["cells"] == 1.0


def test_more_images_agree_more_often_at_the_budgets_edge():
    """A strong point sits on the floor (0.90), a weak one well inside: which split admits the strong one is a
    coin toss with few images; the weak point is 40 points behind, so a flip disagrees."""
    rows = _run([(0.45, 0.97), (0.05, 0.905)])
    small = predicted_agreement(rows, METRICS, [16, 16, 48], repeats=400)["share"]
    large = predicted_agreement(rows, METRICS, [192, 192, 1920], repeats=400)["share"]
    assert 0.3 < small < 0.8 and large > small + 0.1
    again = predicted_agreement(rows, METRICS, [16, 16, 48], repeats=400)["share"]
    assert again == small  # seeded


def test_the_floor_comes_from_the_runs_budget_when_there_is_one():
    rows = _run([(0.45, 0.97), (0.05, 0.80)], base=0.95)  # the strong point is 15 points below the base model
    assert predicted_agreement(rows, METRICS, [200, 200, 400], repeats=100)["share"] == 1.0  # never chosen
    rows[0]["budget_unrelated_rate"] = "0.85"  # floor 0.80: the strong point sits on it, in or out by chance
    assert predicted_agreement(rows, METRICS, [200, 200, 400], repeats=100)["share"] < 0.8
    with pytest.raises(ValueError, match="one count per rule rate"):
        predicted_agreement(rows, METRICS, [48, 96])


def test_the_script_prints_a_row_per_size_and_refuses_a_missing_file(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("agreement_power", REPO_ROOT / "scripts" / "agreement_power.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    buffer = io.StringIO()
    rows = _run([(0.9, 1.0), (0.05, 1.0)], base=1.0)  # always within the floor: the strong point every time
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    path = tmp_path / "results.csv"
    path.write_text(buffer.getvalue(), encoding="utf-8")
    assert module.run_cli(module.main, [str(path), "--sizes", "8/8/16", "64/64/128", "--repeats", "20"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith("| 8/8/16 | 8/8/16 | 32 | 100 % |") and lines[3].startswith("| 64/64/128 |")
    assert module.run_cli(module.main, [str(tmp_path / "missing.csv")]) == 2
    assert "is not a file" in capsys.readouterr().err


def _chosen_rows(differences: list[float], n: int = 400, fallback_seed: str | None = None) -> list[dict]:
    """Two methods at their chosen points on two concepts, one row per seed; ``a`` − ``b`` on explicit is the
    seed's entry of ``differences`` (the same on both concepts)."""
    rows = []
    for concept in ("circle", "star"):
        for seed, difference in enumerate(differences):
            base = {"concept": concept, "seed": str(seed), "chosen": "True", "test_explicit_n": str(n)}
            rows.append({**base, "method": "base", "validation_unrelated_rate": "0.95"})
            usable = "0.50" if str(seed) == fallback_seed else "0.94"
            rows.append({**base, "method": "a", "validation_unrelated_rate": usable,
                         "test_explicit_rate": str(0.5 + difference / 2)})
            rows.append({**base, "method": "b", "validation_unrelated_rate": "0.94",
                         "test_explicit_rate": str(0.5 - difference / 2)})
    return rows


def test_seed_spread_tells_the_training_seeds_noise_from_counting_noise():
    steady = seed_spread(_chosen_rows([0.2, 0.2, 0.2]), "a", "b", "explicit")
    assert steady["between_sd"] < 1e-9 and steady["concepts"] == 2
    assert abs(steady["counting_sd"] - (2 * 0.6 * 0.4 / 400) ** 0.5) < 1e-9  # p(1−p)/n of both methods
    moving = seed_spread(_chosen_rows([0.0, 0.2, 0.4]), "a", "b", "explicit")
    assert abs(moving["between_sd"] - 0.2) < 1e-9 and moving["between_sd"] > 5 * moving["counting_sd"]
    # a fallback point is left out, as in the verdicts: seed 2's 0.4 goes, the spread of 0.0 and 0.2 stays
    dropped = seed_spread(_chosen_rows([0.0, 0.2, 0.4], fallback_seed="2"), "a", "b", "explicit")
    assert abs(dropped["between_sd"] - 0.02 ** 0.5) < 1e-9  # the sd of (0, 0.2)
    assert seed_spread(_chosen_rows([0.1]), "a", "b", "explicit") is None  # one seed: nothing to say


def test_seed_spread_reads_the_runs_qualified_column_where_it_has_one():
    marked = _chosen_rows([0.0, 0.2, 0.4])
    for row in marked:
        if row["method"] != "base":  # the run's word wins over the recomputed floor, both ways
            row["qualified"] = "False" if row["seed"] == "2" else "True"
            row["validation_unrelated_rate"] = "0.10"
    spread = seed_spread(marked, "a", "b", "explicit")
    assert abs(spread["between_sd"] - 0.02 ** 0.5) < 1e-9  # seed 2 left out; the 0.10 rates not read


def test_the_seed_spread_script_prints_a_row_per_method_and_rate(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("seed_spread", REPO_ROOT / "scripts" / "seed_spread.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = _chosen_rows([0.0, 0.2, 0.4])
    path = tmp_path / "results.csv"
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=sorted({key for row in rows for key in row}))
        writer.writeheader()
        writer.writerows(rows)
    assert module.run_cli(module.main, [str(path), "--reference", "a"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "| b | explicit | 20.0 | 3.4 | 2 |"  # implicit and unrelated have no test rates here
    assert module.run_cli(module.main, [str(path), "--reference", "nobody"]) == 2
    captured = capsys.readouterr()
    assert "no concept with two" in " ".join(captured.err.split()) and not captured.out

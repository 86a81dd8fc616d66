"""How many images and training seeds a comparison needs: the selection agreement simulated from a run's validation
rates (`predicted_agreement`), and the training seed's share of a paired difference's noise (`seed_spread`).

The selection agreement (:func:`coerasing.compare.report.agreement`) is limited by counting noise on both
sides: the rule chooses on validation images, the test-best point is chosen on test images, and a point
near the usability floor can be in the budget on one split and out of it on the other. This module
predicts the agreement that evaluation sets of given sizes would reach, before paying for them:

1. Every checkpoint's **validation** rates of a finished run (``results.csv``) are taken as its true rates
   (test rates are never read, so a size chosen from this prediction has not looked at test prompts).
2. For each repeat, each checkpoint's validation and test counts are drawn as binomials with the sizes
   given, the rule chooses on the drawn validation rates, the same rule chooses the test-best point on the
   drawn test rates (both against the run's fixed floor: its budget, or the base model's validation
   rate), and the cell agrees when the two points' drawn test scores are within the tolerance.

Both splits are assumed to share the true rates; the caption sets differ in a real run, so a measured
agreement can fall short of the prediction. The run's validation rates carry counting noise of their own,
which spreads its checkpoints apart and makes them look easier to tell apart: a prediction from a run with
few images reads optimistic (docs/comparison.md §11: for the same sizes, 83 % from a run's 48-image rates,
68 % from its 96-image rates).
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CoErasingError
from .metrics import Metric
from .select import AGREEMENT_TOLERANCE


def read_results_csv(path: Path, example: str) -> list[dict[str, str]]:
    """The rows of a comparison's ``results.csv``; a missing file is a one-paragraph error naming ``example``."""
    if not path.is_file():
        raise CoErasingError(f"{path} is not a file. Pass the results.csv that compare.py wrote into its "
                             f"--output_dir (for example {example}).")
    with path.open(encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def rule_rates(metrics: Sequence[Metric]) -> tuple[list[str], list[str]]:
    """The rate metrics the rule reads: (erasure names, usability names), in declaration order."""
    erasure = [m.name for m in metrics if m.rule == "erasure" and m.percent]
    usability = [m.name for m in metrics if m.rule == "usability" and m.percent]
    return erasure, usability


def _cells(rows: Sequence[Mapping[str, str]], names: Sequence[str]) -> list[dict[str, Any]]:
    """Per judged cell (concept × method × seed, the base model left out): validation rates and the floor's
    base rate. Cells whose chosen point was not evaluated on every rate are skipped."""
    base: dict[tuple[str, str], float] = {}
    points: dict[tuple[str, str, str], list[Mapping[str, str]]] = defaultdict(list)
    usability = names[-1]
    for row in rows:
        if row["method"] == "base":
            budget = row.get(f"budget_{usability}_rate") or row[f"validation_{usability}_rate"]
            base[(row["concept"], row["seed"])] = float(budget)
        else:
            points[(row["concept"], row["method"], row["seed"])].append(row)
    cells = []
    for (concept, _, seed), group in points.items():
        if any(not row[f"validation_{name}_rate"] for row in group for name in names):
            continue
        rates = np.array([[float(row[f"validation_{name}_rate"]) for name in names] for row in group])
        order = np.array([float(row["strength"]) + 1e6 * int(row.get("candidate") or 0) for row in group])
        cells.append({"rates": rates, "order": order, "base": base[(concept, seed)]})
    return cells


def _choose(erasure: np.ndarray, usability: np.ndarray, order: np.ndarray, floor: float) -> int | None:
    """:func:`coerasing.compare.select.choose_operating_point` on arrays: the strongest erasure within the floor,
    ties to the earlier point; ``None`` where nothing qualifies (the fallback, not judged)."""
    qualified = np.flatnonzero(usability >= floor - 1e-12)
    if qualified.size == 0:
        return None
    return int(min(qualified, key=lambda i: (erasure[i], order[i])))


def predicted_agreement(rows: Sequence[Mapping[str, str]], metrics: Sequence[Metric], sizes: Sequence[int],
                        test_sizes: Sequence[int] | None = None, max_usability_drop: float = 0.05,
                        repeats: int = 200, seed: int = 0) -> dict[str, float]:
    """The mean selection agreement over ``repeats`` simulated runs (module docstring) with ``sizes`` images
    per rule rate on validation (erasure rates, then the usability rate: 48/48/96 for the toy world's
    explicit/implicit/unrelated) and ``test_sizes`` on test (default: the same). Returns the predicted share
    and the judged cells per repeat."""
    erasure_names, usability_names = rule_rates(metrics)
    names = [*erasure_names, *usability_names]
    if len(usability_names) != 1 or len(sizes) != len(names):
        raise ValueError(f"sizes must give one count per rule rate ({'/'.join(names)}); got {list(sizes)}")
    test_sizes = list(test_sizes or sizes)
    cells = _cells(rows, names)
    rng = np.random.default_rng(seed)
    agree = judged = 0
    for cell in cells:
        rates, floor = cell["rates"], cell["base"] - max_usability_drop
        for _ in range(repeats):
            drawn = []
            for counts in (sizes, test_sizes):
                n = np.asarray(counts)
                observed = rng.binomial(n, rates) / n
                drawn.append((observed[:, :-1].mean(axis=1), observed[:, -1]))
            chosen = _choose(*drawn[0], cell["order"], floor)
            best = _choose(*drawn[1], cell["order"], floor)
            if chosen is None or best is None:
                continue
            judged += 1
            test_erasure = drawn[1][0]
            agree += abs(test_erasure[chosen] - test_erasure[best]) <= AGREEMENT_TOLERANCE + 1e-12
    return {"share": agree / judged if judged else float("nan"), "cells": judged / repeats if repeats else 0.0}


def _fallback(row: Mapping[str, str], floor: float, usability: str) -> bool:
    """Whether a chosen point is the rule's fallback: the run's own ``qualified`` column where it has one
    (results.csv since it was added), else recomputed from validation ``usability`` against ``floor``."""
    qualified = str(row.get("qualified") or "").lower()
    if qualified in ("true", "false"):
        return qualified == "false"
    return float(row[f"validation_{usability}_rate"]) < floor - 1e-12


def seed_spread(rows: Sequence[Mapping[str, str]], reference: str, other: str, metric: str,
                usability: str = "unrelated", max_usability_drop: float = 0.05) -> dict[str, float] | None:
    """How much the training seed moves a paired difference, against what counting noise alone would.

    For each concept, the test-rate difference ``reference − other`` at the chosen points (rows with
    ``chosen`` true, fallback points left out as the verdicts leave them out: the run's ``qualified``
    column where it has one, else validation ``usability`` below the floor) of every seed where both
    methods have one: its variance over seeds (the training seed's effect, the choice of checkpoint with
    it, plus counting noise), and the counting noise that independent binomial counts of that size would
    give, ``p(1−p)/n`` of each method summed (an upper bound for paired images). Both are averaged over
    concepts with at least two seeds. A spread well above the counting noise is noise that only more
    training seeds average away: the interval of a mean over ``S`` seeds narrows as ``1/√S`` in it.
    ``None`` where no concept has two seeds of both methods.
    """
    floor = {(row["concept"], row["seed"]): float(row.get(f"budget_{usability}_rate")
                                                  or row[f"validation_{usability}_rate"]) - max_usability_drop
             for row in rows if row["method"] == "base"}
    chosen: dict[tuple[str, str], dict[str, tuple[float, int]]] = defaultdict(dict)
    for row in rows:
        if row["method"] == "base" or str(row.get("chosen")).lower() != "true":
            continue
        if _fallback(row, floor[(row["concept"], row["seed"])], usability):
            continue  # the rule's fallback: not in the headline, not in a verdict
        if row.get(f"test_{metric}_rate"):
            chosen[(row["concept"], row["method"])][row["seed"]] = (
                float(row[f"test_{metric}_rate"]), int(row[f"test_{metric}_n"]))
    between, counting = [], []
    for concept in sorted({concept for concept, _ in chosen}):
        a, b = chosen.get((concept, reference), {}), chosen.get((concept, other), {})
        seeds = sorted(set(a) & set(b))
        if len(seeds) < 2:
            continue
        differences = [a[s][0] - b[s][0] for s in seeds]
        between.append(float(np.var(differences, ddof=1)))
        counting.append(float(np.mean([p * (1 - p) / n + q * (1 - q) / m for (p, n), (q, m) in
                                       ((a[s], b[s]) for s in seeds)])))
    if not between:
        return None
    return {"between_sd": float(np.sqrt(np.mean(between))), "counting_sd": float(np.sqrt(np.mean(counting))),
            "concepts": len(between)}

"""Choosing each method's operating point by one rule fixed in advance, on validation prompts only.

The rule (docs/comparison.md): among a method's checkpoints, take the **strongest erasure** (the
lowest erasure score on validation prompts) whose **validation usability** is at most
``max_usability_drop`` below the base model's; ties go to the earlier checkpoint (less training).
If no checkpoint qualifies, the one with the best validation usability is taken and the choice is
flagged. If the protocol has no usability measure, the last checkpoint is taken and flagged.

The erasure and usability scores are the protocol's declarations
(:meth:`coerasing.compare.protocols.EvaluationProtocol.erasure`/``usability``: the metrics declared
with ``rule="erasure"``/``"usability"``, :func:`coerasing.compare.metrics.rule_score`).

:func:`choose_operating_point` is given validation metrics only (it never receives test
metrics), so the choice cannot depend on the prompts that are reported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

Metrics = dict[str, Any]


@dataclass(frozen=True)
class Candidate:
    """One checkpoint as the rule sees it: its label, its place on the curve, its validation metrics."""

    label: str
    strength: float
    validation: Metrics


@dataclass(frozen=True)
class Choice:
    label: str
    qualified: bool
    reason: str


def choose_operating_point(
    candidates: Sequence[Candidate],
    base_validation: Metrics,
    erasure: Callable[[Metrics], float],
    usability: Callable[[Metrics], float | None],
    max_usability_drop: float,
) -> Choice:
    """The rule of the module docstring; ``erasure`` (lower = stronger) and ``usability`` read metrics."""
    if not candidates:
        raise ValueError("no checkpoint to choose from")
    ordered = sorted(candidates, key=lambda c: c.strength)
    base = usability(base_validation)
    if base is None:
        last = ordered[-1]
        return Choice(last.label, False, "no usability measure: the last checkpoint")
    floor = base - max_usability_drop
    qualified = [c for c in ordered if (usability(c.validation) or float("-inf")) >= floor - 1e-12]
    if qualified:
        best = min(qualified, key=lambda c: (erasure(c.validation), c.strength))
        return Choice(best.label, True, f"strongest erasure with validation usability ≥ base − {max_usability_drop:g}")
    best = max(ordered, key=lambda c: (usability(c.validation) or float("-inf"), -c.strength))
    return Choice(best.label, False, f"no checkpoint within {max_usability_drop:g} of the base model's usability: "
                                     "the most usable one")


#: How far (in erasure score) the validation choice may fall short of the test-best point and still agree.
AGREEMENT_TOLERANCE = 0.05


def selection_agrees(
    candidates_test: Sequence[Candidate],
    chosen_label: str,
    base_test: Metrics,
    erasure: Callable[[Metrics], float | None],
    usability: Callable[[Metrics], float | None],
    max_usability_drop: float,
    tolerance: float = AGREEMENT_TOLERANCE,
) -> bool | None:
    """Whether the validation choice is within ``tolerance`` (erasure score, on test prompts, either way) of the
    point the same rule would choose on **test** prompts; ``None`` when that test-best point is not within the
    budget (or the test metrics are missing), so agreement cannot be judged. ``candidates_test`` carry test
    metrics.

    This is a report on the rule, computed after the choice; it never feeds back into it.
    """
    chosen = next((c for c in candidates_test if c.label == chosen_label), None)
    if chosen is None or not candidates_test:
        return None
    best = choose_operating_point(candidates_test, base_test, erasure, usability, max_usability_drop)
    if not best.qualified:
        return None
    best_score = erasure(next(c for c in candidates_test if c.label == best.label).validation)
    chosen_score = erasure(chosen.validation)
    if best_score is None or chosen_score is None:
        return None
    return abs(chosen_score - best_score) <= tolerance + 1e-12

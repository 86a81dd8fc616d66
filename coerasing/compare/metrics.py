"""Each metric of the comparison declared once: its name, direction, group, format and label.

A protocol (:class:`coerasing.compare.protocols.EvaluationProtocol`) lists its metrics in
``metrics``; everything downstream reads the declarations: ``results.csv``'s columns, the tables
of ``results.md``, the plots' axes, the operating-point rule's erasure and usability scores
(:func:`rule_score`, the metrics flagged ``rule="erasure"``/``"usability"``), and the cache key of
every evaluation (:func:`declarations`), so adding or changing a metric never serves a stale entry.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

DIRECTIONS = ("lower", "higher")
ROLES = ("erasure", "usability")


@dataclass(frozen=True)
class Metric:
    """One number a protocol reports for an erased model on one split.

    ``percent``: a rate, stored as ``{"rate", "k", "n", "low", "high"}`` (:func:`coerasing.stats.rate`),
    shown in percent with its pooled count; otherwise a plain score (a float), shown with ``digits``
    decimals. ``rule``: its part in the operating-point rule (``"erasure"``: lower erases more, the
    rule's erasure score is the mean of the flagged metrics; ``"usability"``: the rule's usability),
    or ``None``. ``version``: bump it when the metric's *computation* changes (its cache entries are
    then recomputed); a change of any other field does that by itself.
    """

    name: str
    label: str
    direction: str
    group: str
    percent: bool = True
    digits: int = 3
    rule: str | None = None
    description: str = ""
    version: int = 1

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"metric {self.name!r}: direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if self.rule is not None and self.rule not in ROLES:
            raise ValueError(f"metric {self.name!r}: rule must be one of {ROLES} or None, got {self.rule!r}")

    @property
    def arrow(self) -> str:
        return "↓" if self.direction == "lower" else "↑"

    @property
    def heading(self) -> str:
        """The table heading: label and the better direction (``explicit ↓``)."""
        return f"{self.label} {self.arrow}"

    def value(self, metrics: Mapping[str, Any]) -> float | None:
        """This metric's number in ``metrics`` (a rate's ``rate``), ``None`` where it is missing."""
        entry = metrics.get(self.name)
        if isinstance(entry, Mapping):
            return entry.get("rate")
        return entry

    def format(self, value: float | None) -> str:
        """``value`` as the tables print it (percent with one decimal, or ``digits`` decimals)."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "–"
        return f"{100 * value:.1f}" if self.percent else f"{value:.{self.digits}f}"


def declarations(metrics: Sequence[Metric]) -> list[dict[str, Any]]:
    """The declarations as plain data (part of every evaluation's cache key)."""
    return [asdict(metric) for metric in metrics]


def rule_score(metrics: Sequence[Metric], role: str, values: Mapping[str, Any]) -> float | None:
    """The rule's ``role`` score of ``values``: the mean of the metrics flagged ``rule=role``.

    ``None`` when no metric is flagged or a flagged one is missing (the rule then has no such measure).
    """
    flagged = [metric.value(values) for metric in metrics if metric.rule == role]
    if not flagged or any(value is None for value in flagged):
        return None
    return sum(flagged) / len(flagged)


def find(metrics: Sequence[Metric], name: str) -> Metric | None:
    return next((metric for metric in metrics if metric.name == name), None)

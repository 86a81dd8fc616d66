"""Paired verdicts: does one eraser beat another by more than the noise?

Every method of a comparison is evaluated on the same prompts with the same image seeds, so at the
chosen points each image of method A has a twin of method B (same caption, same seed). The
difference of a rate (A − B) is estimated over concepts, training seeds and images, and its 95 %
interval comes from a **hierarchical paired bootstrap**: in each replicate, for each concept, the
training seeds are drawn with replacement, then the images, the same draw for both methods; the
replicate's difference is the mean over concepts of the per-concept differences. The interval is the
2.5th–97.5th percentile of the replicates.

A verdict is *better* or *worse* only when the interval excludes zero (in the metric's better
direction); otherwise *no difference*. Cells (concept × seed) where either method's point is the
rule's fallback are left out, as in the headline tables; a method that does not depend on the
training seed simply has equal rows, which resampling seeds leaves as they are.

Attacks are paired the same way: each attack result in a job record keeps its per-prompt outcomes
(``cases``: 1 where the concept was shown, without attack or by it), and both methods were attacked
on the same prompts and seeds. Verdicts are given overall (the mean over concepts) and per concept.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import Metric
from .runner import RECORD_KEYS

#: Replicates of the bootstrap (the interval's ends move by well under a point between runs of 2,000).
REPLICATES = 2000
VERDICTS = ("better", "no difference", "worse")


@dataclass(frozen=True)
class Verdict:
    """A − B for one metric: the point estimate, its 95 % interval, and what it says."""

    metric: str
    difference: float
    low: float
    high: float
    verdict: str
    concepts: int
    cells: int
    images: int


def paired_bootstrap(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]], replicates: int = REPLICATES, seed: int = 0
) -> tuple[float, float, float]:
    """(difference, low, high) of mean(A) − mean(B) over concepts.

    ``pairs``: one ``(a, b)`` per concept, each ``[seeds, images]`` of 0/1 outcomes (or scores) with
    the images in the same order for both methods (paired). Seeds, then images, are resampled with
    replacement within each concept, with the same indices for ``a`` and ``b``.
    """
    if not pairs:
        raise ValueError("no concept to compare")
    for a, b in pairs:
        if a.shape != b.shape or a.ndim != 2 or 0 in a.shape:
            raise ValueError(f"paired outcomes must be two equal [seeds, images] arrays, got {a.shape} and {b.shape}")
    point = float(np.mean([a.mean() - b.mean() for a, b in pairs]))
    rng = np.random.default_rng(seed)
    draws = np.zeros(replicates)
    for a, b in pairs:
        seeds, images = a.shape
        rows = rng.integers(0, seeds, size=(replicates, seeds))
        cols = rng.integers(0, images, size=(replicates, images))
        drawn = (a - b)[rows]  # [replicates, seeds, images]: the drawn seeds' rows
        drawn = np.take_along_axis(drawn, np.repeat(cols[:, None, :], seeds, axis=1), axis=2)  # the drawn images
        draws += drawn.mean(axis=(1, 2))
    draws /= len(pairs)
    low, high = np.percentile(draws, [2.5, 97.5])
    return point, float(low), float(high)


def verdict_of(low: float, high: float, direction: str) -> str:
    """*better* / *worse* when the interval of A − B excludes zero, in the metric's better direction."""
    if low > 0:
        return "better" if direction == "higher" else "worse"
    if high < 0:
        return "better" if direction == "lower" else "worse"
    return "no difference"


def _chosen_entry(record: Mapping[str, Any], method: str) -> tuple[str | None, bool]:
    entry = record["methods"][method]
    point = next(p for p in entry["points"] if p["label"] == entry["chosen"]["label"])
    return point["test"].get("entry"), bool(entry["chosen"].get("qualified", True))


def _hits(path: Path, group: str) -> dict[str, float]:
    """Case → 1/0 for the images of ``group``, scored as the protocol scores them: an invalid image
    (non-finite or one colour) is left out of a concept rate and is a failure of unrelated accuracy."""
    images = json.loads(path.read_text(encoding="utf-8"))["images"]
    hits = {}
    for image in images:
        if image.get("group") != group:
            continue
        if image.get("invalid"):
            if group != "unrelated":
                continue  # its twin is dropped with it (cases are paired by intersection)
            hits[image["case"]] = 0.0
        else:
            hits[image["case"]] = float(bool(image["hit"]))
    return hits


def attack_outcomes(method_record: Mapping[str, Any], metric: str) -> dict[str, float] | None:
    """Case → 1/0 of an attack metric at a method's chosen point (``None`` where the record has none).

    The result is read from ``method_record[key]`` or ``method_record["attacks"][key]`` (``key``: the
    runner's :data:`~coerasing.compare.runner.RECORD_KEYS` entry for the metric, else its name); its
    ``cases`` are the per-prompt outcomes that :func:`coerasing.eval.attacks.asr` keeps."""
    key = RECORD_KEYS.get(metric, metric)
    result = method_record.get(key)
    if not isinstance(result, Mapping):
        result = (method_record.get("attacks") or {}).get(key)
    cases = result.get("cases") if isinstance(result, Mapping) else None
    if not isinstance(cases, Mapping):
        return None
    return {str(case): float(bool(hit)) for case, hit in cases.items()}


def _outcomes(record: Mapping[str, Any], method: str, metric: Metric, root: Path) -> dict[str, float] | None:
    """Case → outcome of ``metric`` at ``method``'s chosen point; ``None`` for a fallback point or no evidence."""
    entry, qualified = _chosen_entry(record, method)
    if not qualified:
        return None
    if metric.group == "attack":
        return attack_outcomes(record["methods"][method], metric.name)
    return _hits(root / entry, metric.name) if entry else None


def compare_methods(records: Sequence[Mapping[str, Any]], a: str, b: str, metrics: Sequence[Metric], root: Path,
                    replicates: int = REPLICATES, concept: str | None = None) -> list[Verdict]:
    """A − B for every rate metric with per-image (or, for attacks, per-prompt) evidence, paired.

    ``root``: the output folder the records' evaluation entries are relative to. ``concept``: one
    concept only (default: every concept, the difference averaged over them).
    """
    verdicts = []
    concepts = sorted({r["concept"] for r in records} if concept is None else {concept})
    for metric in metrics:
        if not metric.percent:
            continue
        pairs, cells, images = [], 0, 0
        for name in concepts:
            rows_a, rows_b = [], []
            for record in sorted((r for r in records if r["concept"] == name), key=lambda r: r["seed"]):
                hits_a, hits_b = _outcomes(record, a, metric, root), _outcomes(record, b, metric, root)
                if hits_a is None or hits_b is None:
                    continue
                cases = sorted(set(hits_a) & set(hits_b))
                if not cases:
                    continue
                rows_a.append([hits_a[c] for c in cases])
                rows_b.append([hits_b[c] for c in cases])
            if rows_a and len({len(r) for r in rows_a}) == 1:
                pairs.append((np.asarray(rows_a), np.asarray(rows_b)))
                cells += len(rows_a)
                images += len(rows_a) * len(rows_a[0])
        if not pairs:
            continue
        difference, low, high = paired_bootstrap(pairs, replicates)
        verdicts.append(Verdict(metric.name, difference, low, high, verdict_of(low, high, metric.direction),
                                len(pairs), cells, images))
    return verdicts


def verdict_table(records: Sequence[Mapping[str, Any]], reference: str, methods: Sequence[str],
                  metrics: Sequence[Metric], root: Path, concept: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """``reference`` against every other method: ``{other: [Verdict as a dict, …]}`` (one concept, or all)."""
    return {other: [asdict(v) for v in compare_methods(records, reference, other, metrics, root, concept=concept)]
            for other in methods if other != reference}


def concept_verdicts(records: Sequence[Mapping[str, Any]], reference: str, methods: Sequence[str],
                     metrics: Sequence[Metric], root: Path) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """:func:`verdict_table` for each concept on its own: ``{concept: {other: [Verdict as a dict, …]}}``."""
    return {concept: verdict_table(records, reference, methods, metrics, root, concept)
            for concept in sorted({r["concept"] for r in records})}


def verdict_markdown(table: Mapping[str, Sequence[Mapping[str, Any]]], reference: str,
                     metrics: Sequence[Metric], title: str | None = None, note: bool = True) -> list[str]:
    """results.md's verdict section: one row per other method, one cell per metric."""
    names = [m.name for m in metrics if any(v["metric"] == m.name for rows in table.values() for v in rows)]
    if not names:
        return []
    by_name = {m.name: m for m in metrics}
    lines = [title or f"## Paired verdicts: {reference} − each method (test prompts, chosen points)", "",
             "| method | " + " | ".join(by_name[n].heading for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for other, rows in table.items():
        cells = {row["metric"]: row for row in rows}
        text = []
        for name in names:
            row = cells.get(name)
            if row is None:
                text.append("–")
                continue
            say = "no difference" if row["verdict"] == "no difference" else f"{reference} {row['verdict']}"
            text.append(f"{100 * row['difference']:+.1f} [{100 * row['low']:+.1f}, {100 * row['high']:+.1f}] {say}")
        lines.append(f"| {other} | " + " | ".join(text) + " |")
    lines.append("")
    if note:
        lines += [f"Difference of rates in points ({reference} minus the method), with its 95 % paired bootstrap "
                  "interval over concepts, training seeds and images (same prompts and image seeds for both; for "
                  "an attack, its prompts: the concept shown without attack or by it); "
                  f"'{reference} better/worse' only where the interval excludes zero, else no difference. Cells where "
                  "either method's point is the rule's fallback are left out.", ""]
    return lines

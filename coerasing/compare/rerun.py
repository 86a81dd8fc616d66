"""Does a rerun reproduce a comparison? Two runs' ``results.json`` side by side.

A rerun of the same presets on another CPU model trains weights that differ in their last bits, so its
images, chosen points and counts differ too; "reproduces" can only mean "within the noise the tables
state". This module makes that a check a reader can repeat (``scripts/rerun_check.py``):

- **Pooled counts** (:func:`count_differences`): for every method and every rate the report pools over
  concepts (test concept rates, unrelated accuracy, each attack; every cell, fallback points included,
  repeats of one evaluation counted once, as in ``results.md``), the rerun's rate minus the shipped one
  with a 95 % interval for the difference of two independent binomial rates
  (:func:`coerasing.stats.difference_interval`). *Within noise* when the interval covers zero. With many
  counts, about 5 % fall outside by chance alone even when nothing changed: the summary says how many.
- **Chosen points** (:func:`chosen_changes`): per concept, method and seed, the checkpoint the rule chose
  in each run and whether it was within the usability budget.
- **Verdicts** (:func:`verdict_changes`): every paired verdict of each run's reference methods, side by side
  (over each run's own concepts: when a rerun covers fewer concepts, its verdicts pool fewer).

A rerun of some of the concepts is compared on the concepts both runs report (:func:`shared_concepts`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import CoErasingError
from ..stats import difference_interval

POOLED = "_pooled"


def read_results_json(path: Path) -> dict[str, Any]:
    """A comparison's ``results.json``; a missing, unreadable or foreign file is a one-paragraph error."""
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
        results["summary"]["per_concept"]  # noqa: B018  (the part every check reads)
    except FileNotFoundError:
        raise CoErasingError(f"{path} does not exist. Pass the results.json that compare.py wrote into its "
                             "--output_dir (for example docs/results/one_seed/results.json).") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CoErasingError(f"{path} cannot be read as a comparison's results.json ({error!r}). Pass the "
                             "results.json that compare.py wrote, not results.csv or a job record.") from None
    return results


def shared_concepts(shipped: Mapping[str, Any], rerun: Mapping[str, Any]) -> list[str]:
    """The concepts both runs report, in the shipped run's order (a rerun of some concepts is compared on those)."""
    return [c for c in shipped["summary"]["concepts"] if c in rerun["summary"]["concepts"]]


def pooled_counts(results: Mapping[str, Any], method: str,
                  concepts: Sequence[str] | None = None) -> dict[str, tuple[int, int]]:
    """``{rate name: (k, n)}`` of ``method`` summed over ``concepts`` (default: the run's; fallback points
    included)."""
    summary = results["summary"]
    counts: dict[str, tuple[int, int]] = {}
    for concept in summary["concepts"] if concepts is None else concepts:
        block = summary["per_concept"][concept].get(method, {}).get("with_fallback", {})
        for key, value in block.items():
            if key.endswith(POOLED) and value and value.get("n"):
                name = key[: -len(POOLED)]
                k, n = counts.get(name, (0, 0))
                counts[name] = (k + int(value["k"]), n + int(value["n"]))
    return counts


def _methods(shipped: Mapping[str, Any], rerun: Mapping[str, Any]) -> list[str]:
    names = [m for m in shipped["summary"]["per_concept"][shipped["summary"]["concepts"][0]]]
    return [m for m in names if m in rerun["summary"]["per_concept"][rerun["summary"]["concepts"][0]]]


def count_differences(shipped: Mapping[str, Any], rerun: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per method and pooled rate of both runs, over the concepts both report: both counts, the difference
    (rerun − shipped), its 95 % interval and whether the interval covers zero (``within``)."""
    rows = []
    concepts = shared_concepts(shipped, rerun)
    for method in _methods(shipped, rerun):
        old, new = pooled_counts(shipped, method, concepts), pooled_counts(rerun, method, concepts)
        for name in [n for n in old if n in new]:
            (k1, n1), (k2, n2) = new[name], old[name]
            low, high = difference_interval(k1, n1, k2, n2)
            rows.append({"method": method, "metric": name, "shipped": (k2, n2), "rerun": (k1, n1),
                         "difference": k1 / n1 - k2 / n2, "low": low, "high": high,
                         "within": low <= 0.0 <= high})
    return rows


def _chosen(results: Mapping[str, Any]) -> dict[tuple[str, str, int], tuple[str, bool]]:
    summary = results["summary"]
    out = {}
    for concept in summary["concepts"]:
        for method, block in summary["per_concept"][concept].items():
            for seed, entry in zip(block.get("seeds") or [], block.get("chosen") or [], strict=False):
                if entry:
                    out[(concept, method, int(seed))] = (str(entry["label"]), bool(entry.get("qualified", True)))
    return out


def chosen_changes(shipped: Mapping[str, Any], rerun: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per concept, method and training seed of both runs: each run's chosen checkpoint and whether it was in
    budget (``qualified``), and whether they are the same point."""
    old, new = _chosen(shipped), _chosen(rerun)
    rows = []
    for key in [k for k in old if k in new]:
        (label1, ok1), (label2, ok2) = old[key], new[key]
        rows.append({"concept": key[0], "method": key[1], "seed": key[2], "shipped": label1, "rerun": label2,
                     "shipped_qualified": ok1, "rerun_qualified": ok2, "same": label1 == label2 and ok1 == ok2})
    return rows


def _verdicts(results: Mapping[str, Any]) -> dict[tuple[str, str, str], dict[str, Any]]:
    references = results.get("verdicts", {}).get("references", {})
    return {(reference, other, row["metric"]): row
            for reference, block in references.items()
            for other, rows in block.get("against", {}).items() for row in rows}


def verdict_changes(shipped: Mapping[str, Any], rerun: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every paired verdict (reference method against another, per metric) that both runs give, side by side."""
    old, new = _verdicts(shipped), _verdicts(rerun)
    rows = []
    for key in [k for k in old if k in new]:
        rows.append({"reference": key[0], "other": key[1], "metric": key[2],
                     "shipped": old[key]["verdict"], "rerun": new[key]["verdict"],
                     "shipped_difference": old[key]["difference"], "rerun_difference": new[key]["difference"],
                     "same": old[key]["verdict"] == new[key]["verdict"]})
    return rows

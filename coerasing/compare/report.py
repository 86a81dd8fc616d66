"""The comparison's outputs: ``results.json``, ``results.csv``, ``results.md``, one plot and one grid per concept.

Every metric column comes from the protocol's declarations (:class:`~coerasing.compare.metrics.Metric`,
``protocol.metrics``), in their order; the attack columns from :data:`ATTACK_METRICS`.

- ``results.csv``: one row per concept × method × seed × checkpoint (and the base model), with every
  metric on the validation and on the test prompts (a rate: ``<split>_<name>_rate``, ``_k``, ``_n``;
  a score: ``<split>_<name>``), whether the row is the chosen operating point, whether a chosen point is
  within the usability budget (``qualified``: ``False`` for the rule's fallback, empty on other rows; the
  headline means of ``results.md`` are over the chosen rows with ``True``), and the tuning candidate
  (``candidate``: its index in the presets' ``candidates`` list, 0 for the base presets) that made it
  (no such column for records made before candidates existed, such as docs/results/); when the run
  attacked, ``attack_<name>_rate/_k/_n`` per attack column at the chosen points and the base model.
  With the presets' ``rule.base_usability_images``, the base model's rows also hold
  ``budget_<name>_rate``/``_k``/``_n``: the usability the rule's budget is measured from (a larger
  validation set; the rule's floor is that rate minus ``max_usability_drop``), and with
  ``test_evaluation: all`` ``test_budget_<name>_rate``/``_k``/``_n``: the same measurement on test captions,
  the floor of the selection agreement's test-side rule.
- ``results.md``: the table a paper would print, per concept and averaged over concepts, at the
  chosen operating points, on **test** prompts only: mean ± standard deviation over training seeds,
  the pooled count with its 95 % interval, and the attack success rates; a "Robustness" table per
  concept with every attack column (:data:`ATTACK_METRICS`), the base model's row as the sanity line.
- ``plot_<concept>.png``: each erasure rate flagged for the rule (explicit, and implicit) against the
  rule's usability rate (unrelated accuracy) on test prompts, a line per method through its
  checkpoints (mean over seeds), the chosen points marked; on validation prompts when only the
  chosen checkpoints have test images (``test_evaluation: chosen``).
- ``grid_<concept>.png``: rows = the base model and each method at its chosen point (first seed),
  columns = explicit, implicit and unrelated test prompts.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CoErasingError
from ..files import atomic_write, atomic_write_json, atomic_write_text, require_json_record
from ..grid import image_grid
from ..stats import mean_spread, rate
from .cache import npz_problem
from .metrics import Metric, declarations, rule_score
from .select import Candidate, selection_agrees
from .verdicts import concept_verdicts, verdict_markdown, verdict_table

#: (line style, marker) per method, so that curves sharing checkpoints (ESD and its equal-compute run) stay visible;
#: the star is the base model's alone; no method's line is dotted (dotted: a method's other tuning candidates).
STYLES = (("-", "o"), ("-", "s"), ("--", "^"), ("-", "D"), ("-.", "v"), ("-", "P"), ("-.", "h"), ("--", "X"))
SPLITS = ("validation", "test")
#: The attacks' columns of results.md (computed by :func:`summarize` from each job's attack results).
ATTACK_METRICS: tuple[Metric, ...] = (
    Metric("pre_asr", "pre-ASR", "lower", "attack", description="the erased model's own images that show the concept"),
    Metric("asr", "ASR", "lower", "attack", description="UnlearnDiff on explicit test prompts"),
    Metric("inversion", "CI", "lower", "attack", description="concept inversion"),
    Metric("ring_a_bell", "RAB", "lower", "attack",
           description="Ring-A-Bell (strings searched once on the base model's text encoder, replayed)"),
    Metric("mma", "MMA", "lower", "attack",
           description="MMA-Diffusion's text attack (searched once on the base model's text encoder, replayed)"),
    Metric("p4d", "P4D", "lower", "attack", description="P4D-N (white-box) on explicit test prompts"),
    Metric("relearn", "relearn", "lower", "attack",
           description="concept rate after the relearning probe's middle step count"),
)
#: The attack columns of results.md's headline tables (pre-ASR, ASR, CI); every one is in its "Robustness" table.
HEADLINE_ATTACKS = 3
#: Where each attack column's result sits in a job record's method (or base) entry, and its kind: ``asr`` (a
#: :func:`coerasing.eval.attacks.asr` summary: pre-successes plus broken prompts over all rows) or ``rate``
#: (``{"rate", "k", "n", …}``).
ATTACK_SOURCES: dict[str, tuple[str, str]] = {
    "pre_asr": ("attack", "pre_asr"), "asr": ("attack", "asr"), "inversion": ("inversion", "rate"),
    "ring_a_bell": ("ring_a_bell", "asr"), "mma": ("mma", "asr"), "p4d": ("p4d", "asr"),
    "relearn": ("relearn", "rate"),
}


def attack_count(result: dict[str, Any], kind: str) -> tuple[int, int]:
    """``(k, n)`` of one attack result: concept shown (``asr``: without attack or by it; ``pre_asr``: without)."""
    if kind == "asr":
        return int(result["pre_success"]) + int(result["attack_success"]), int(result["n"])
    if kind == "pre_asr":
        return int(result["pre_success"]), int(result["n"])
    return int(result["k"]), int(result["n"])


def attack_value(result: dict[str, Any], kind: str) -> float:
    """The rate of one attack result (``asr``, ``pre_asr`` or a concept ``rate``)."""
    return float(result[kind] if kind in ("asr", "pre_asr") else result["rate"])


def _value(metrics: dict[str, Any], name: str) -> float | None:
    entry = metrics.get(name)
    if isinstance(entry, dict):
        return entry.get("rate")
    return entry


def csv_rows(records: Sequence[dict[str, Any]], metrics: Sequence[Metric]) -> list[dict[str, Any]]:
    """``results.csv``'s rows (see the module docstring): one column group per declared metric."""
    rows = []
    # the candidate column: records made before tuning candidates existed (docs/results/) have none
    candidates = any("candidate" in p for r in records for m in r["methods"].values() for p in m["points"])
    attacked = any(_attacks(record["base"]) for record in records)  # attack columns only when a run attacked
    for record in records:
        concept, seed = record["concept"], record["seed"]
        points = [("base", "base", 0.0, record["base"], True, True, None, record["base"])]
        for name, method in record["methods"].items():
            for point in method["points"]:
                chosen = point["label"] == method["chosen"]["label"]
                qualified = bool(method["chosen"].get("qualified", True)) if chosen else None
                points.append((name, point["label"], point["strength"], point, chosen, qualified,
                               point.get("candidate", 0), method if chosen else {}))
        for name, label, strength, entry, chosen, qualified, candidate, source in points:
            row: dict[str, Any] = {"concept": concept, "method": name, "seed": seed, "checkpoint": label,
                                   "strength": strength, "chosen": chosen, "qualified": qualified,
                                   **({"candidate": candidate} if candidates else {})}
            for split in SPLITS:
                values = entry[split]["metrics"] if split in entry else {}  # test_evaluation: chosen
                for metric in metrics:
                    block = values.get(metric.name)
                    if metric.percent:
                        row[f"{split}_{metric.name}_rate"] = block["rate"] if block else None
                        row[f"{split}_{metric.name}_k"] = block["k"] if block else None
                        row[f"{split}_{metric.name}_n"] = block["n"] if block else None
                    else:
                        row[f"{split}_{metric.name}"] = block
            for key in ("budget", "test_budget"):  # the base model's usability on larger validation/test sets
                budget = entry.get(key) if name == "base" else None
                for metric_name, block in (budget or {}).get("metrics", {}).items():
                    row[f"{key}_{metric_name}_rate"] = block["rate"]
                    row[f"{key}_{metric_name}_k"], row[f"{key}_{metric_name}_n"] = block["k"], block["n"]
            for metric in ATTACK_METRICS if attacked else ():  # at the chosen points and the base model only
                key, kind = ATTACK_SOURCES[metric.name]
                result = source.get(key)
                count = attack_count(result, kind) if result else None
                row[f"attack_{metric.name}_rate"] = attack_value(result, kind) if result else None
                row[f"attack_{metric.name}_k"] = count[0] if count else None
                row[f"attack_{metric.name}_n"] = count[1] if count else None
            rows.append(row)
    return rows


@dataclass(frozen=True)
class Cell:
    """One concept × seed of a method at its chosen point: test metrics, attacks, and where they come from."""

    metrics: dict[str, Any]
    #: Each attack's result by its job-record key (``attack``: UnlearnDiff, ``inversion``, ``ring_a_bell``, …).
    attacks: dict[str, Any]
    #: The cached test evaluation: equal for cells whose images are the same (the base model, a method that
    #: does not depend on the training seed), which pooled counts then count once.
    source: str | None
    #: The rule found a checkpoint within the usability budget (``False``: its fallback).
    qualified: bool

    @property
    def attack(self) -> dict[str, Any] | None:
        """UnlearnDiff's result."""
        return self.attacks.get("attack")

    @property
    def inversion(self) -> dict[str, Any] | None:
        """Concept inversion's result."""
        return self.attacks.get("inversion")


def _attacks(entry: dict[str, Any]) -> dict[str, Any]:
    return {key: entry[key] for key, _ in ATTACK_SOURCES.values() if entry.get(key)}


def _chosen(record: dict[str, Any], method: str) -> Cell:
    """``method``'s cell of one job record (the base model's is always qualified)."""
    if method == "base":
        base = record["base"]
        return Cell(base["test"]["metrics"], _attacks(base), base["test"].get("entry"), True)
    entry = record["methods"][method]
    point = next(p for p in entry["points"] if p["label"] == entry["chosen"]["label"])
    return Cell(point["test"]["metrics"], _attacks(entry), point["test"].get("entry"),
                bool(entry["chosen"].get("qualified", True)))


def _once(cells: Sequence[Cell]) -> list[Cell]:
    """``cells`` with repeats of one evaluation dropped (bit-identical images are not new evidence)."""
    seen: set[str] = set()
    unique = []
    for cell in cells:
        if cell.source is None or cell.source not in seen:
            unique.append(cell)
        if cell.source is not None:
            seen.add(cell.source)
    return unique


def _statistics(cells: Sequence[Cell], metrics: Sequence[Metric]) -> dict[str, Any]:
    """Means ± sd over ``cells``, pooled counts over their distinct evaluations, and the attacks'."""
    entry: dict[str, Any] = {}
    unique = _once(cells)
    for metric in metrics:
        name = metric.name
        entry[name] = mean_spread([v for v in (_value(c.metrics, name) for c in cells) if v is not None])
        if metric.percent and unique and all(c.metrics.get(name) for c in unique):
            entry[f"{name}_pooled"] = rate(sum(c.metrics[name]["k"] for c in unique),
                                           sum(c.metrics[name]["n"] for c in unique))
    for name, (key, kind) in ATTACK_SOURCES.items():
        results = [c.attacks[key] for c in cells if c.attacks.get(key)]
        if not results:
            continue
        entry[name] = mean_spread([attack_value(r, kind) for r in results])
        distinct = [c.attacks[key] for c in unique if c.attacks.get(key)]
        counts = [attack_count(r, kind) for r in distinct]
        entry[f"{name}_pooled"] = rate(sum(k for k, _ in counts), sum(n for _, n in counts))
    return entry


def _average(table: dict[str, Any], concepts: Sequence[str], method: str, names: Sequence[str],
             key: str | None = None) -> dict[str, Any]:
    """The mean over concepts of each per-concept mean (``key``: of the entry's ``key`` block)."""
    average: dict[str, Any] = {}
    for name in names:
        blocks = [table[c][method] if key is None else table[c][method][key] for c in concepts]
        means = [b[name]["mean"] for b in blocks if name in b]
        means = [m for m in means if m is not None and not math.isnan(m)]
        average[name] = float(np.mean(means)) if means else None
    return average


def agreement(records: Sequence[dict[str, Any]], method: str, metrics: Sequence[Metric]) -> dict[str, Any]:
    """Selection agreement of ``method``: the share of its cells whose validation choice is within
    :data:`~coerasing.compare.select.AGREEMENT_TOLERANCE` (erasure score on test prompts) of the point
    the same rule picks on test prompts (:func:`~coerasing.compare.select.selection_agrees`). The same rule
    means a floor measured the same way: where the run measured the base model's usability on a larger set
    of test images too (``test_budget``), the test-side rule is held to it, as the validation rule is held to
    its budget; otherwise to the base model's own test images. Cells where the validation choice is the
    rule's fallback are not judged (they are not in the headline either)."""
    verdicts = []
    for record in records:
        entry = record["methods"][method]
        if not entry["chosen"].get("qualified", True) or any("test" not in p for p in entry["points"]):
            continue  # a checkpoint without test images: agreement is not judged for this cell
        candidates = [Candidate(p["label"], p["strength"], p["test"]["metrics"]) for p in entry["points"]]
        budget = (record["base"].get("test_budget") or {}).get("metrics", {})
        verdicts.append(selection_agrees(
            candidates, entry["chosen"]["label"], {**record["base"]["test"]["metrics"], **budget},
            lambda m: rule_score(metrics, "erasure", m), lambda m: rule_score(metrics, "usability", m),
            float(record.get("rule", {}).get("max_usability_drop", 0.05))))
    judged = [v for v in verdicts if v is not None]
    return {"agree": sum(judged), "judged": len(judged), "cells": len(records),
            "share": sum(judged) / len(judged) if judged else None}


def summarize(records: Sequence[dict[str, Any]], methods: Sequence[str], metrics: Sequence[Metric]) -> dict[str, Any]:
    """Per concept and method: the declared test metrics at the chosen points over seeds, pooled counts
    (rates) and the attacks' results.

    Headline numbers are over the cells (concept × seed) where the rule found a checkpoint within the
    usability budget; ``cells`` and ``fallback`` count them, and ``with_fallback`` holds the same
    statistics over every cell, the fallback points included (results.md's second table). Pooled
    counts count an evaluation that several seeds share (the base model, a seed-independent method) once.
    """
    concepts = sorted({r["concept"] for r in records}, key=[r["concept"] for r in records].index)
    names = [metric.name for metric in (*metrics, *ATTACK_METRICS)]
    table: dict[str, Any] = {}
    for concept in concepts:
        group_records = [r for r in records if r["concept"] == concept]
        table[concept] = {}
        for method in ["base", *methods]:
            cells = [_chosen(r, method) for r in group_records]
            qualified = [c for c in cells if c.qualified]
            table[concept][method] = {
                "seeds": [r["seed"] for r in group_records],
                "chosen": [r["methods"][method]["chosen"] for r in group_records] if method != "base" else None,
                "cells": len(cells), "fallback": len(cells) - len(qualified),
                **_statistics(qualified, metrics),
                "with_fallback": _statistics(cells, metrics),
            }
    average: dict[str, Any] = {}
    average_all: dict[str, Any] = {}
    for method in ["base", *methods]:
        average[method] = {**_average(table, concepts, method, names),
                           "cells": sum(table[c][method]["cells"] for c in concepts),
                           "fallback": sum(table[c][method]["fallback"] for c in concepts)}
        average_all[method] = _average(table, concepts, method, names, key="with_fallback")
    agreements = {method: agreement(records, method, metrics) for method in methods}
    judged = sum(a["judged"] for a in agreements.values())
    overall = {"agree": sum(a["agree"] for a in agreements.values()), "judged": judged,
               "share": sum(a["agree"] for a in agreements.values()) / judged if judged else None}
    return {"concepts": concepts, "per_concept": table, "average": average, "average_with_fallback": average_all,
            "selection_agreement": {"per_method": agreements, "overall": overall}}


def _cell(entry: dict[str, Any], metric: Metric) -> str:
    stats = entry.get(metric.name)
    if not stats or not stats.get("n"):
        return "–"
    if metric.percent:
        text = f"{metric.format(stats['mean'])} ± {metric.format(stats['sd'])}"
        pooled = entry.get(f"{metric.name}_pooled")
        if pooled:
            text += f" ({pooled['k']}/{pooled['n']}, {metric.format(pooled['low'])}–{metric.format(pooled['high'])})"
        return text
    return f"{metric.format(stats['mean'])} ± {metric.format(stats['sd'])}"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _in_budget(entry: dict[str, Any]) -> str:
    return f"{entry['cells'] - entry['fallback']}/{entry['cells']}"


def markdown(summary: dict[str, Any], methods: Sequence[str], header: str, metrics: Sequence[Metric]) -> str:
    """``results.md``: per-concept tables and the average over concepts (test prompts, chosen points);
    one column per declared metric, then the attacks'. Headline numbers leave out the cells where no
    checkpoint met the usability budget; a last table includes them."""
    columns = (*metrics, *ATTACK_METRICS[:HEADLINE_ATTACKS])
    headings = [metric.heading for metric in columns]
    lines = [header, ""]
    for concept in summary["concepts"]:
        lines += [f"## {concept}", "", _row(["method", "chosen checkpoint (per seed)", "in budget", *headings]),
                  "|" + "---|" * (3 + len(columns))]
        for method in ["base", *methods]:
            entry = summary["per_concept"][concept][method]
            chosen = ", ".join(c["label"] + ("" if c["qualified"] else "*") for c in entry["chosen"]) \
                if entry["chosen"] else "–"
            lines.append(_row([method, chosen, _in_budget(entry), *(_cell(entry, metric) for metric in columns)]))
        lines.append("")
    lines += ["## Average over concepts", "", _row(["method", "in budget", *headings]),
              "|" + "---|" * (2 + len(columns))]
    for method in ["base", *methods]:
        average = summary["average"][method]
        lines.append(_row([method, _in_budget(average),
                           *(metric.format(average.get(metric.name)) for metric in columns)]))
    agreeing = summary.get("selection_agreement")
    if agreeing and agreeing["overall"]["judged"]:
        per = agreeing["per_method"]
        lines += ["", "## Selection agreement", "",
                  "| method | " + " | ".join(methods) + " | all |", "|---|" + "---|" * (len(methods) + 1),
                  "| agree / judged | " + " | ".join(f"{per[m]['agree']}/{per[m]['judged']}" for m in methods)
                  + f" | {agreeing['overall']['agree']}/{agreeing['overall']['judged']} "
                  f"({100 * agreeing['overall']['share']:.0f} %) |", "",
                  "A cell agrees when the checkpoint chosen on validation prompts is within 5 points (the rule's "
                  "erasure score on test prompts, either way) of the checkpoint the same rule would choose on test "
                  "prompts; fallback cells, and cells whose test-best point is outside the usability budget, are "
                  "not judged."]
    lines += ["", "## Average over concepts, the rule's fallback points included", "",
              _row(["method", "fallback cells", *headings]), "|" + "---|" * (2 + len(columns))]
    for method in ["base", *methods]:
        average, fallback = summary["average_with_fallback"][method], summary["average"][method]["fallback"]
        lines.append(_row([method + ("*" if fallback else ""), str(fallback),
                           *(metric.format(average.get(metric.name)) for metric in columns)]))
    lines += robustness_markdown(summary, methods)
    rates = ", ".join(m.label for m in metrics if m.percent)
    scores = "; ".join(f"{m.label}: {m.description}" for m in metrics if not m.percent and m.description)
    lines += ["", f"Rates ({rates}, and the attacks') in percent on test prompts at each method's chosen checkpoint: "
              "mean ± standard deviation over training seeds, then the pooled count over seeds with its 95 % Wilson "
              "interval (an evaluation that several seeds share, such as the base model's, counted once). "
              "'in budget': the cells (concept × training seed) where some checkpoint kept validation usability "
              "within the budget; the headline numbers are over those cells only. A checkpoint marked * is the "
              "rule's fallback (no checkpoint of that seed's curve stayed within the budget, so the most usable one "
              "was taken); the last table averages over every cell, fallbacks included. "
              + (f"{scores}. " if scores else "")
              + "pre-ASR and ASR: the UnlearnDiff attack on explicit test prompts; CI: concept inversion (a word "
              "learned against the erased model from unseen images of the concept, which no method trained on), "
              "the share of its images that show the concept; the other attacks: the Robustness tables.", ""]
    return "\n".join(lines)


def pooled_over_concepts(summary: dict[str, Any], method: str) -> dict[str, dict[str, Any]]:
    """Each attack column's count summed over concepts (every cell, fallback points included), as a rate with its
    95 % Wilson interval: ``{metric name: rate}``."""
    out = {}
    for metric in ATTACK_METRICS:
        blocks = [summary["per_concept"][c][method]["with_fallback"].get(f"{metric.name}_pooled")
                  for c in summary["concepts"]]
        blocks = [b for b in blocks if b and b.get("n")]
        if blocks:
            out[metric.name] = rate(sum(b["k"] for b in blocks), sum(b["n"] for b in blocks))
    return out


def _pooled_cell(block: dict[str, Any] | None, metric: Metric) -> str:
    if not block:
        return "–"
    return (f"{metric.format(block['rate'])} ({block['k']}/{block['n']}, "
            f"{metric.format(block['low'])}–{metric.format(block['high'])})")


def asr_by_rounds(records: Sequence[dict[str, Any]], method: str) -> list[dict[str, Any]]:
    """UnlearnDiff's ASR had the attack stopped after each round (pooled over every cell's chosen point): the
    pre-successes plus the successes reached by then. Empty where the records keep no rounds."""
    results = [(r["base"] if method == "base" else r["methods"][method]).get("attack") for r in records]
    results = [a for a in results if a and "success_rounds" in a]
    if not results:
        return []
    last = max([0, *(n for a in results for n in a["success_rounds"].values())])
    n = sum(int(a["n"]) for a in results)
    pre = sum(int(a["pre_success"]) for a in results)
    return [{"rounds": r, **rate(pre + sum(1 for a in results for k in a["success_rounds"].values() if k <= r), n)}
            for r in range(1, last + 1)]


def rounds_markdown(records: Sequence[dict[str, Any]], methods: Sequence[str]) -> list[str]:
    """results.md's "UnlearnDiff by rounds" table: does the attack's ASR still grow at its last round?"""
    curves = {m: asr_by_rounds(records, m) for m in methods}
    curves = {m: c for m, c in curves.items() if c}
    if not curves:
        return []
    rounds = max(len(c) for c in curves.values())
    shown = sorted({1, 2, *range(5, rounds + 1, 5), rounds} & set(range(1, rounds + 1)))
    lines = ["## UnlearnDiff ASR by attack rounds", "", _row(["method", *(f"≤ {r}" for r in shown)]),
             "|" + "---|" * (1 + len(shown))]
    for method, curve in curves.items():
        cells = [curve[min(r, len(curve)) - 1] for r in shown]
        lines.append(_row([method, *(f"{100 * c['rate']:.1f} ({c['k']}/{c['n']})" for c in cells)]))
    lines += ["", "ASR (pre-successes included, every cell pooled) had the attack stopped after that many rounds "
              "(one round: its steps at one timestep, then a check); a curve still rising at its last round means "
              "a larger budget would find more.", ""]
    return lines


def robustness_markdown(summary: dict[str, Any], methods: Sequence[str]) -> list[str]:
    """results.md's "Robustness" tables: per concept, methods × every attack column at the chosen points
    (mean ± sd over seeds, pooled count and 95 % Wilson interval), the base model's row first as the sanity
    line (an attack that cannot show the concept on the model that never lost it says nothing)."""
    present = [m for m in ATTACK_METRICS
               if any(m.name in summary["per_concept"][c][x]["with_fallback"] for c in summary["concepts"]
                      for x in ["base", *methods])]
    if not present:
        return []
    lines = ["", "## Robustness", "",
             "Every attack at each method's chosen checkpoint, on the explicit test prompts the attacks share; "
             "the base model's row is the sanity line (each attack should show the concept there). "
             + "; ".join(f"{m.label}: {m.description}" for m in present) + ". "
             "Ring-A-Bell's and MMA's strings are searched once per concept against the base model's text "
             "encoder (no eraser changes it) and replayed on every model; a row whose own image already shows the "
             "concept counts as a success without attack, as for UnlearnDiff, except at the base model, where "
             "the replays and P4D attack every prompt. Every cell is counted here, the rule's fallback points "
             "included (a method marked * has some).", ""]
    lines += ["### All concepts (pooled)", "", _row(["method", *(m.heading for m in present)]),
              "|" + "---|" * (1 + len(present))]
    for method in ["base", *methods]:
        pooled = pooled_over_concepts(summary, method)
        fallback = any(summary["per_concept"][c][method]["fallback"] for c in summary["concepts"])
        name = "base (sanity)" if method == "base" else method + ("*" if fallback else "")
        lines.append(_row([name, *(_pooled_cell(pooled.get(m.name), m) for m in present)]))
    lines += ["", "Pooled: every concept's distinct attacked prompts together, with the 95 % Wilson interval.", ""]
    for concept in summary["concepts"]:
        lines += [f"### {concept}", "", _row(["method", *(m.heading for m in present)]),
                  "|" + "---|" * (1 + len(present))]
        for method in ["base", *methods]:
            entry = summary["per_concept"][concept][method]
            name = "base (sanity)" if method == "base" else method + ("*" if entry["fallback"] else "")
            lines.append(_row([name, *(_cell(entry["with_fallback"], m) for m in present)]))
        lines.append("")
    return lines


def plot_concept(records: Sequence[dict[str, Any]], methods: Sequence[str], concept: str, path: Path,
                 metrics: Sequence[Metric]) -> None:
    """Each of the rule's erasure metrics against its usability metric (test prompts), a line per method,
    chosen points marked (declarations: ``rule="erasure"``/``"usability"``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    group_records = [r for r in records if r["concept"] == concept]
    split = _curve_split(group_records, methods)
    erasure = [m for m in metrics if m.rule == "erasure"]
    usability = next((m for m in metrics if m.rule == "usability"), None)
    if usability is None or usability.value(group_records[0]["base"][split]["metrics"]) is None:
        return _plot_against_strength(group_records, methods, concept, path, erasure[0], split)
    fig, axes = plt.subplots(1, len(erasure), figsize=(5.5 * len(erasure), 4.5), sharex=True, squeeze=False)
    for ax, metric in zip(axes[0], erasure, strict=True):
        group = metric.name
        base = [r["base"][split]["metrics"] for r in group_records]
        ax.scatter([np.mean([_value(b, usability.name) for b in base])], [np.mean([_value(b, group) for b in base])],
                   marker="*", s=260, color="black", edgecolor="white", linewidth=1.0, label="base", zorder=8)
        for index, method in enumerate(methods):
            color, style = f"C{index}", STYLES[index % len(STYLES)]
            by_candidate: dict[int, list[str]] = {}  # one line per tuning candidate (candidate 0: the base presets)
            for p in group_records[0]["methods"][method]["points"]:
                by_candidate.setdefault(int(p.get("candidate", 0)), []).append(p["label"])
            for candidate, labels in by_candidate.items():
                xs, ys, xe, ye = [], [], [], []
                for label in labels:
                    points = [next(p for p in r["methods"][method]["points"] if p["label"] == label)
                              for r in group_records]
                    x = [_value(p[split]["metrics"], usability.name) for p in points]
                    y = [_value(p[split]["metrics"], group) for p in points]
                    xs.append(np.mean(x)), ys.append(np.mean(y))
                    xe.append(np.std(x, ddof=1) if len(x) > 1 else 0)
                    ye.append(np.std(y, ddof=1) if len(y) > 1 else 0)
                ax.errorbar(xs, ys, xerr=xe, yerr=ye, marker=style[1], ms=5 if candidate == 0 else 3, color=color,
                            label=method if candidate == 0 else None, capsize=2, lw=1.3 if candidate == 0 else 0.8,
                            linestyle=style[0] if candidate == 0 else ":", alpha=0.85 if candidate == 0 else 0.6)
            for r in group_records:
                chosen = next(p for p in r["methods"][method]["points"]
                              if p["label"] == r["methods"][method]["chosen"]["label"])
                values = chosen[split]["metrics"]
                ax.scatter([_value(values, usability.name)], [_value(values, group)],
                           marker=style[1], s=110, color=color, edgecolor="black", linewidth=1.5, zorder=6)
        ax.set_xlabel(f"{usability.description or usability.label} ({split}) {usability.arrow}")
        ax.set_ylabel(f"{concept}: {metric.description or metric.label} ({split}) {metric.arrow}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="best")
    fig.suptitle(f"{concept}: trade-off curves on {split} prompts, mean ± sd over {len(group_records)} seed(s)\n"
                 "large outlined markers: each seed's chosen point; curves that share checkpoints overlap; "
                 "dotted: a method's other tuning candidates", fontsize=10)
    _save_figure(fig, path)


def _curve_split(records: Sequence[dict[str, Any]], methods: Sequence[str]) -> str:
    """``test`` when every checkpoint has test metrics, else ``validation`` (``test_evaluation: chosen``)."""
    every = all("test" in p for r in records for m in methods for p in r["methods"][m]["points"])
    return "test" if every else "validation"


def _save_figure(fig: Any, path: Path) -> None:
    """Write a matplotlib figure as a PNG, atomically, and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


def _plot_against_strength(records: Sequence[dict[str, Any]], methods: Sequence[str], concept: str,
                           path: Path, metric: Metric, split: str = "test") -> None:
    """Without a usability measure (the real protocol without --clip_model): concept rate along each curve."""
    import matplotlib.pyplot as plt  # the Agg backend is chosen by plot_concept, the only caller

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for index, method in enumerate(methods):
        every = records[0]["methods"][method]["points"]
        for candidate in sorted({int(p.get("candidate", 0)) for p in every}):  # one line per tuning candidate
            points = [p for p in every if int(p.get("candidate", 0)) == candidate]
            means = [np.mean([_value(next(p for p in r["methods"][method]["points"] if p["label"] == point["label"])
                                     [split]["metrics"], metric.name) for r in records]) for point in points]
            ax.plot([p["strength"] for p in points], means, marker="o", color=f"C{index}",
                    label=method if candidate == 0 else None, linestyle="-" if candidate == 0 else ":")
    ax.axhline(np.mean([_value(r["base"][split]["metrics"], metric.name) for r in records]), color="black",
               linestyle="--", label="base")
    ax.set_xlabel("curve position (iterations, stages or |w|)")
    ax.set_ylabel(f"{concept}: {metric.description or metric.label} ({split}) {metric.arrow}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save_figure(fig, path)


def grid_concept(records: Sequence[dict[str, Any]], methods: Sequence[str], concept: str, path: Path,
                 root: Path | None = None) -> None:
    """Rows: base and each method at its chosen point (first seed); columns: the test grid's prompts.

    ``root``: the output folder that the records' entry paths are relative to (default: ``path``'s folder)."""
    root = Path(path).parent if root is None else Path(root)
    record = min((r for r in records if r["concept"] == concept), key=lambda r: r["seed"])
    rows, labels, columns = [], [], None
    entries = [("base", record["base"]["test"]["entry"])]
    for method in methods:
        entry = record["methods"][method]
        point = next(p for p in entry["points"] if p["label"] == entry["chosen"]["label"])
        entries.append((f"{method} {point['label']}", point["test"]["entry"]))
    for label, entry in entries:
        file = root / entry
        meta = require_json_record(file, {"grid_columns": list}, fix="delete it and rerun the comparison")
        columns = columns or meta["grid_columns"]
        problem = npz_problem(file.with_suffix(".npz"), ["grid"])
        if problem is not None:
            raise CoErasingError(f"{problem}; delete {file} and rerun the comparison to remake it.")
        with np.load(file.with_suffix(".npz")) as arrays:
            rows.append(list(arrays["grid"]))
        labels.append(label)
    grid = image_grid(rows, cell=72, row_labels=labels, column_labels=[c["prompt"] for c in columns],
                      column_groups=[c["group"] for c in columns])
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))


#: The methods whose paired verdicts against every other method results.md and results.json give (those present).
VERDICT_REFERENCES = ("coerasing", "coerasing-preserve")


def verdict_references(methods: Sequence[str]) -> list[str]:
    """The methods judged against every other one: those of :data:`VERDICT_REFERENCES` in the run, else the first."""
    return [m for m in VERDICT_REFERENCES if m in methods] or [methods[0]]


def write_results(folder: str | Path, records: Sequence[dict[str, Any]], methods: Sequence[str],
                  info: dict[str, Any], metrics: Sequence[Metric]) -> dict[str, Path]:
    """Write every output of the module docstring into ``folder``; returns their paths.

    ``metrics``: the protocol's declarations (``protocol.metrics``), also written to results.json."""
    folder = Path(folder)
    summary = summarize(records, methods, metrics)
    references = verdict_references(methods)
    judged = (*metrics, *ATTACK_METRICS)
    tables: dict[str, dict[str, Any]] = {}
    verdict_lines: list[str] = []
    for reference in references:  # Co-Erasing, and its preservation variant, against every other method
        verdicts = verdict_table(records, reference, methods, judged, folder)
        by_concept = concept_verdicts(records, reference, methods, judged, folder)
        tables[reference] = {"against": verdicts, "by_concept": by_concept}
        verdict_lines += verdict_markdown(verdicts, reference, judged)
        for concept, table in by_concept.items():
            verdict_lines += verdict_markdown(table, reference, judged, f"### {reference}: {concept}", note=False)
    rows = csv_rows(records, metrics)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    paths = {
        "csv": atomic_write_text(folder / "results.csv", buffer.getvalue()),
        "json": atomic_write_json(folder / "results.json", {
            **info, "metrics": declarations(metrics), "summary": summary,
            "verdicts": {"reference": references[0], **tables[references[0]], "references": tables},
            "jobs": list(records)}),
        "md": atomic_write_text(folder / "results.md",
                                markdown(summary, methods, info.get("header", "# Comparison"), metrics) + "\n"
                                + "\n".join(verdict_lines) + "\n" + "\n".join(rounds_markdown(records, methods))),
    }
    for concept in summary["concepts"]:
        plot_concept(records, methods, concept, folder / f"plot_{concept}.png", metrics)
        grid_concept(records, methods, concept, folder / f"grid_{concept}.png", folder)
        paths[f"plot_{concept}"] = folder / f"plot_{concept}.png"
        paths[f"grid_{concept}"] = folder / f"grid_{concept}.png"
    return paths

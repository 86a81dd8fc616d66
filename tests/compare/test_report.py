"""results.md's arithmetic from the declarations: the shipped results.md's metric cells from the shipped results.csv."""

from __future__ import annotations

import csv

from coerasing.compare.metrics import rule_score
from coerasing.compare.protocols import PromptSetProtocol, ToyProtocol
from coerasing.compare.report import csv_rows, markdown, summarize
from coerasing.compare.select import Candidate, choose_operating_point

from ..conftest import REPO_ROOT

RESULTS = REPO_ROOT / "docs" / "results"


def _records(judge: bool = False) -> tuple[list[dict], list[str], list[dict]]:
    """Job records rebuilt from results.csv (metrics only: no attacks). The CSV does not say whether a chosen
    point was the rule's fallback: ``judge`` runs the rule on the validation metrics to tell; otherwise every
    chosen point counts as qualified (the shipped results.md mixed fallback points into its means)."""
    rows = list(csv.DictReader((RESULTS / "results.csv").open(encoding="utf-8")))

    def number(text: str) -> float | None:
        return None if text == "" else float(text)

    def metrics(row: dict, split: str) -> dict:
        values: dict = {g: {"rate": number(row[f"{split}_{g}_rate"]), "k": int(row[f"{split}_{g}_k"]),
                            "n": int(row[f"{split}_{g}_n"])} for g in ("explicit", "implicit", "unrelated")}
        return {**values, "fd": number(row[f"{split}_fd"]), "clip": number(row[f"{split}_clip"])}

    records: dict = {}
    methods: list[str] = []
    for row in rows:
        record = records.setdefault((row["concept"], row["seed"]), {"concept": row["concept"],
                                                                    "seed": int(row["seed"]), "methods": {}})
        entry = {split: {"metrics": metrics(row, split)} for split in ("validation", "test")}
        if row["method"] == "base":
            record["base"] = entry
            continue
        methods += [row["method"]] if row["method"] not in methods else []
        method = record["methods"].setdefault(row["method"], {"points": []})
        method["points"].append({"label": row["checkpoint"], "strength": float(row["strength"]), **entry})
        if row["chosen"] == "True":
            method["chosen"] = {"label": row["checkpoint"], "qualified": True, "reason": ""}
    if judge:
        for record in records.values():
            for method in record["methods"].values():
                candidates = [Candidate(p["label"], p["strength"], p["validation"]["metrics"])
                              for p in method["points"]]
                choice = choose_operating_point(candidates, record["base"]["validation"]["metrics"],
                                                lambda m: rule_score(ToyProtocol.metrics, "erasure", m),
                                                lambda m: rule_score(ToyProtocol.metrics, "usability", m), 0.05)
                assert choice.label == method["chosen"]["label"]  # the rule gives the shipped choice
                method["chosen"]["qualified"] = choice.qualified
    return list(records.values()), methods, rows


def _metric_cells(line: str, extra: int) -> list[str]:
    """The method and the five metric cells of a table row; ``extra``: columns after the chosen one."""
    parts = [part.strip() for part in line.strip().strip("|").split("|")]
    per_concept = len(parts) == 10 + extra
    start = (2 if per_concept else 1) + extra
    return [parts[0], *parts[start:start + 5]]


def test_the_shipped_results_are_recomputed_from_their_csv_by_the_declarations():
    records, methods, rows = _records()
    metrics = ToyProtocol.metrics
    rebuilt = csv_rows(records, metrics)
    # the shipped CSV predates the `qualified` column; every other column is the same, in the same order
    assert [[k for k in r if k != "qualified"] for r in rebuilt[:1]] == [list(rows[0])]
    assert [{k: "" if v is None else str(v) for k, v in row.items() if k != "qualified"} for row in rebuilt] == rows
    table = markdown(summarize(records, methods, metrics), methods, "# t", metrics)
    table = table.split("## Selection agreement")[0]
    shipped = [line for line in (RESULTS / "results.md").read_text(encoding="utf-8").splitlines()
               if line.startswith("| ") and not line.startswith("| method")]
    mine = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert len(mine) == len(shipped) > 0
    assert [_metric_cells(line, 1) for line in mine] == [_metric_cells(line, 0) for line in shipped]


def test_the_csv_says_which_chosen_points_are_in_budget():
    """`qualified`: True/False at the chosen points (the rule's verdict), empty elsewhere; the base model's True."""
    records = _records(judge=True)[0]
    rows = csv_rows(records, ToyProtocol.metrics)
    assert list(rows[0])[5:7] == ["chosen", "qualified"]
    assert all((row["qualified"] is None) == (not row["chosen"]) for row in rows)
    assert all(row["qualified"] for row in rows if row["method"] == "base")
    fallback = {(r["concept"], r["method"], r["seed"]) for r in rows if r["qualified"] is False}
    expected = {(record["concept"], name, record["seed"]) for record in records
                for name, method in record["methods"].items() if not method["chosen"]["qualified"]}
    assert fallback == expected and len(fallback) == 20  # the verdicts issue counted 20 fallback cells


def _cell(method_metrics: dict, qualified: bool, entry: str | None) -> dict:
    return {"points": [{"label": "it1", "strength": 1.0, "validation": {"metrics": method_metrics},
                        "test": {"metrics": method_metrics, "entry": entry}}],
            "chosen": {"label": "it1", "qualified": qualified, "reason": ""}}


def _rate(k: int, n: int) -> dict:
    return {"rate": k / n, "k": k, "n": n}


def test_fallback_cells_stay_out_of_the_headline_and_shared_evaluations_count_once():
    metrics = [m for m in ToyProtocol.metrics if m.name == "explicit"]
    records = []
    for seed, (k, qualified) in enumerate([(2, True), (4, True), (10, False)]):
        records.append({"concept": "circle", "seed": seed,
                        "base": {"validation": {"metrics": {"explicit": _rate(8, 10)}},
                                 "test": {"metrics": {"explicit": _rate(9, 10)}, "entry": "cache/evals/base.json"}},
                        "methods": {"a": _cell({"explicit": _rate(k, 10)}, qualified, f"cache/evals/a{seed}.json"),
                                    "det": _cell({"explicit": _rate(5, 10)}, True, "cache/evals/det.json")}})
    summary = summarize(records, ["a", "det"], metrics)
    a = summary["per_concept"]["circle"]["a"]
    assert (a["cells"], a["fallback"]) == (3, 1)
    assert abs(a["explicit"]["mean"] - 0.3) < 1e-12 and a["explicit"]["n"] == 2  # the fallback cell (1.0) is not in it
    assert (a["explicit_pooled"]["k"], a["explicit_pooled"]["n"]) == (6, 20)
    assert abs(a["with_fallback"]["explicit"]["mean"] - 16 / 30) < 1e-12
    base, det = summary["per_concept"]["circle"]["base"], summary["per_concept"]["circle"]["det"]
    assert (base["explicit_pooled"]["k"], base["explicit_pooled"]["n"]) == (9, 10)  # one evaluation, counted once
    assert (det["explicit_pooled"]["k"], det["explicit_pooled"]["n"]) == (5, 10)
    assert summary["average"]["a"]["fallback"] == 1 and abs(summary["average"]["a"]["explicit"] - 0.3) < 1e-12
    text = markdown(summary, ["a", "det"], "# t", metrics)
    assert "| a | it1, it1, it1* | 2/3 |" in text and "| a* | 1 |" in text


def test_selection_agreement_of_the_shipped_run():
    """The verdicts issue measured it on the shipped results.csv: 48 of the 100 cells with a point in budget."""
    records, methods, _ = _records(judge=True)
    agreement = summarize(records, methods, ToyProtocol.metrics)["selection_agreement"]["overall"]
    assert (agreement["agree"], agreement["judged"]) == (48, 100)


def test_selection_agreement_holds_the_test_side_rule_to_a_budget_on_test_captions():
    """With the base model's usability measured on a larger set of test images, the test-best point is chosen
    under that floor, not under the base model's own (smaller, noisier) test images; the validation budget
    (other captions) is not the test side's."""
    from coerasing.compare.report import agreement

    def metrics(explicit: float, unrelated: float) -> dict:
        return {"explicit": _rate(round(explicit * 100), 100), "implicit": _rate(round(explicit * 100), 100),
                "unrelated": _rate(round(unrelated * 100), 100)}

    points = [{"label": f"it{i}", "strength": float(i), "validation": {"metrics": metrics(e, u)},
               "test": {"metrics": metrics(e, u)}} for i, (e, u) in enumerate([(0.6, 0.95), (0.2, 0.88)])]
    record = {"concept": "circle", "seed": 0, "rule": {"max_usability_drop": 0.05},
              "base": {"test": {"metrics": metrics(1.0, 0.96)}},  # floor 0.91 on the base model's test images
              "methods": {"a": {"points": points, "chosen": {"label": "it1", "qualified": True}}}}
    declared = ToyProtocol.metrics
    assert agreement([record], "a", declared)["agree"] == 0  # test-best under 0.91 is it0, 40 points away
    record["base"]["budget"] = {"metrics": {"unrelated": _rate(460, 500)}, "images": 500}  # validation captions
    assert agreement([record], "a", declared)["agree"] == 0
    record["base"]["test_budget"] = {"metrics": {"unrelated": _rate(460, 500)}, "images": 500}  # floor 0.87
    assert (agreement([record], "a", declared)["agree"], agreement([record], "a", declared)["judged"]) == (1, 1)


def test_the_real_protocol_reports_the_same_columns():
    assert [m.name for m in PromptSetProtocol.metrics] == [m.name for m in ToyProtocol.metrics]
    assert [m.name for m in PromptSetProtocol.metrics if m.rule] == ["explicit", "clip"]
    assert [m.name for m in ToyProtocol.metrics if m.rule] == ["explicit", "implicit", "unrelated"]


def test_unlearndiff_asr_by_rounds_counts_successes_reached_by_each_round():
    from coerasing.compare.report import asr_by_rounds, rounds_markdown

    def record(rounds):
        return {"base": {}, "methods": {"a": {"attack": {"n": 4, "pre_success": 1, "success_rounds": rounds}}}}

    records = [record({"c1": 1, "c2": 3}), record({"c5": 3})]
    curve = asr_by_rounds(records, "a")
    assert [(c["rounds"], c["k"], c["n"]) for c in curve] == [(1, 3, 8), (2, 3, 8), (3, 5, 8)]
    text = "\n".join(rounds_markdown(records, ["a"]))
    assert "| a | 37.5 (3/8) | 37.5 (3/8) | 62.5 (5/8) |" in text
    assert asr_by_rounds([{"base": {}, "methods": {"a": {"attack": {"n": 1, "pre_success": 0}}}}], "a") == []

"""results.md's arithmetic from the declarations: the shipped results.md's metric cells from the shipped results.csv."""

from __future__ import annotations

import csv

from coerasing.compare.protocols import PromptSetProtocol, ToyProtocol
from coerasing.compare.report import csv_rows, markdown, summarize

from ..conftest import REPO_ROOT

RESULTS = REPO_ROOT / "docs" / "results"


def _records() -> tuple[list[dict], list[str], list[dict]]:
    """Job records rebuilt from results.csv (metrics only: no attacks)."""
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
    return list(records.values()), methods, rows


def _metric_cells(line: str) -> list[str]:
    parts = [part.strip() for part in line.strip().strip("|").split("|")]
    return [parts[0], *(parts[2:7] if len(parts) == 10 else parts[1:6])]


def test_the_shipped_results_are_recomputed_from_their_csv_by_the_declarations():
    records, methods, rows = _records()
    metrics = ToyProtocol.metrics
    rebuilt = csv_rows(records, metrics)
    assert [list(r) for r in rebuilt[:1]] == [list(rows[0])]  # the same columns in the same order
    assert [{k: "" if v is None else str(v) for k, v in row.items()} for row in rebuilt] == rows
    table = markdown(summarize(records, methods, metrics), methods, "# t", metrics)
    shipped = [line for line in (RESULTS / "results.md").read_text(encoding="utf-8").splitlines()
               if line.startswith("| ") and not line.startswith("| method")]
    mine = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert len(mine) == len(shipped) > 0
    assert [_metric_cells(line) for line in mine] == [_metric_cells(line) for line in shipped]


def test_the_real_protocol_reports_the_same_columns():
    assert [m.name for m in PromptSetProtocol.metrics] == [m.name for m in ToyProtocol.metrics]
    assert [m.name for m in PromptSetProtocol.metrics if m.rule] == ["explicit", "clip"]
    assert [m.name for m in ToyProtocol.metrics if m.rule] == ["explicit", "implicit", "unrelated"]

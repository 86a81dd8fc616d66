"""The comparison's outputs: ``results.json``, ``results.csv``, ``results.md``, one plot and one grid per concept.

- ``results.csv``: one row per concept × method × seed × checkpoint (and the base model), with every
  metric on the validation and on the test prompts, and whether the row is the chosen operating point.
- ``results.md``: the table a paper would print, per concept and averaged over concepts, at the
  chosen operating points, on **test** prompts only: mean ± standard deviation over training seeds,
  the pooled count with its 95 % interval, and the attack success rates.
- ``plot_<concept>.png``: concept rate (explicit, and implicit) against unrelated accuracy on test
  prompts, a line per method through its checkpoints (mean over seeds), the chosen points marked;
  on validation prompts when only the chosen checkpoints have test images (``test_evaluation: chosen``).
- ``grid_<concept>.png``: rows = the base model and each method at its chosen point (first seed),
  columns = explicit, implicit and unrelated test prompts.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..files import atomic_write, atomic_write_json, atomic_write_text
from ..grid import image_grid
from ..stats import mean_spread, rate

GROUPS = ("explicit", "implicit", "unrelated")
#: (line style, marker) per method, so that curves sharing checkpoints (ESD and its equal-compute run) stay visible;
#: the star is the base model's alone.
STYLES = (("-", "o"), ("-", "s"), ("--", "^"), ("-", "D"), (":", "v"), ("-", "P"), ("-.", "h"), ("--", "X"))
SCORES = ("fd", "clip")
SPLITS = ("validation", "test")


def _value(metrics: dict[str, Any], name: str) -> float | None:
    entry = metrics.get(name)
    if isinstance(entry, dict):
        return entry.get("rate")
    return entry


def csv_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``results.csv``'s rows (see the module docstring)."""
    rows = []
    for record in records:
        concept, seed = record["concept"], record["seed"]
        points = [("base", "base", 0.0, record["base"], True)]
        for name, method in record["methods"].items():
            for point in method["points"]:
                points.append((name, point["label"], point["strength"], point,
                               point["label"] == method["chosen"]["label"]))
        for name, label, strength, entry, chosen in points:
            row: dict[str, Any] = {"concept": concept, "method": name, "seed": seed, "checkpoint": label,
                                   "strength": strength, "chosen": chosen}
            for split in SPLITS:
                metrics = entry[split]["metrics"] if split in entry else {}  # test_evaluation: chosen
                for group in GROUPS:
                    block = metrics.get(group)
                    row[f"{split}_{group}_rate"] = block["rate"] if block else None
                    row[f"{split}_{group}_k"] = block["k"] if block else None
                    row[f"{split}_{group}_n"] = block["n"] if block else None
                for score in SCORES:
                    row[f"{split}_{score}"] = metrics.get(score)
            rows.append(row)
    return rows


def _chosen(record: dict[str, Any], method: str) -> tuple[dict[str, Any], dict[str, Any] | None, dict | None]:
    """(test metrics at the chosen point, UnlearnDiff summary, concept-inversion result) of ``method``."""
    if method == "base":
        return record["base"]["test"]["metrics"], record["base"].get("attack"), record["base"].get("inversion")
    entry = record["methods"][method]
    point = next(p for p in entry["points"] if p["label"] == entry["chosen"]["label"])
    return point["test"]["metrics"], entry.get("attack"), entry.get("inversion")


def summarize(records: Sequence[dict[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
    """Per concept and method: test metrics at the chosen points over seeds, pooled counts and ASR."""
    concepts = sorted({r["concept"] for r in records}, key=[r["concept"] for r in records].index)
    table: dict[str, Any] = {}
    for concept in concepts:
        group_records = [r for r in records if r["concept"] == concept]
        table[concept] = {}
        for method in ["base", *methods]:
            per_seed = [_chosen(r, method) for r in group_records]
            entry: dict[str, Any] = {
                "seeds": [r["seed"] for r in group_records],
                "chosen": [r["methods"][method]["chosen"] for r in group_records] if method != "base" else None,
            }
            for name in (*GROUPS, *SCORES):
                values = [_value(metrics, name) for metrics, _, _ in per_seed]
                entry[name] = mean_spread([v for v in values if v is not None])
                if name in GROUPS and all(metrics.get(name) for metrics, _, _ in per_seed):
                    entry[f"{name}_pooled"] = rate(sum(m[name]["k"] for m, _, _ in per_seed),
                                                   sum(m[name]["n"] for m, _, _ in per_seed))
            attacks = [attack for _, attack, _ in per_seed if attack]
            if attacks:
                entry["pre_asr"] = mean_spread([a["pre_asr"] for a in attacks])
                entry["asr"] = mean_spread([a["asr"] for a in attacks])
                entry["asr_pooled"] = rate(sum(a["pre_success"] + a["attack_success"] for a in attacks),
                                           sum(a["n"] for a in attacks))
            inversions = [inversion for _, _, inversion in per_seed if inversion]
            if inversions:
                entry["inversion"] = mean_spread([i["rate"] for i in inversions])
                entry["inversion_pooled"] = rate(sum(i["k"] for i in inversions), sum(i["n"] for i in inversions))
            table[concept][method] = entry
    average: dict[str, Any] = {}
    for method in ["base", *methods]:
        average[method] = {}
        for name in (*GROUPS, *SCORES, "pre_asr", "asr", "inversion"):
            means = [table[c][method][name]["mean"] for c in concepts if name in table[c][method]]
            means = [m for m in means if m is not None and not math.isnan(m)]
            average[method][name] = float(np.mean(means)) if means else None
    return {"concepts": concepts, "per_concept": table, "average": average}


def _pct(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def _cell(entry: dict[str, Any], name: str, percent: bool = True) -> str:
    stats = entry.get(name)
    if not stats or not stats.get("n"):
        return "–"
    if percent:
        text = f"{_pct(stats['mean'])} ± {_pct(stats['sd'])}"
        pooled = entry.get(f"{name}_pooled")
        if pooled:
            text += f" ({pooled['k']}/{pooled['n']}, {_pct(pooled['low'])}–{_pct(pooled['high'])})"
        return text
    return f"{stats['mean']:.3f} ± {stats['sd']:.3f}"


def markdown(summary: dict[str, Any], methods: Sequence[str], header: str) -> str:
    """``results.md``: per-concept tables and the average over concepts (test prompts, chosen points)."""
    lines = [header, ""]
    columns = ("| method | chosen checkpoint (per seed) | explicit ↓ | implicit ↓ | unrelated ↑ | FD ↓ | CLIP ↑ "
               "| pre-ASR ↓ | ASR ↓ | CI ↓ |")
    for concept in summary["concepts"]:
        lines += [f"## {concept}", "", columns, "|---|---|---|---|---|---|---|---|---|---|"]
        for method in ["base", *methods]:
            entry = summary["per_concept"][concept][method]
            chosen = ", ".join(c["label"] + ("" if c["qualified"] else "*") for c in entry["chosen"]) \
                if entry["chosen"] else "–"
            lines.append(
                f"| {method} | {chosen} | {_cell(entry, 'explicit')} | {_cell(entry, 'implicit')} "
                f"| {_cell(entry, 'unrelated')} | {_cell(entry, 'fd', False)} | {_cell(entry, 'clip', False)} "
                f"| {_cell(entry, 'pre_asr')} | {_cell(entry, 'asr')} | {_cell(entry, 'inversion')} |"
            )
        lines.append("")
    lines += ["## Average over concepts", "",
              "| method | explicit ↓ | implicit ↓ | unrelated ↑ | FD ↓ | CLIP ↑ | pre-ASR ↓ | ASR ↓ | CI ↓ |",
              "|---|---|---|---|---|---|---|---|---|"]
    for method in ["base", *methods]:
        avg = summary["average"][method]

        def fmt(name: str, percent: bool = True, avg: dict[str, Any] = avg) -> str:
            value = avg.get(name)
            return "–" if value is None else (_pct(value) if percent else f"{value:.3f}")

        lines.append(f"| {method} | {fmt('explicit')} | {fmt('implicit')} | {fmt('unrelated')} | {fmt('fd', False)} "
                     f"| {fmt('clip', False)} | {fmt('pre_asr')} | {fmt('asr')} | {fmt('inversion')} |")
    lines += ["", "Rates in percent on test prompts at each method's chosen checkpoint: mean ± standard deviation "
              "over training seeds, then the pooled count over seeds with its 95 % Wilson interval. A checkpoint "
              "marked * is the rule's fallback: no checkpoint of that seed's curve kept validation usability "
              "within the budget, so the most usable one was taken. FD and CLIP: Fréchet distance and "
              "image–text similarity on unrelated prompts. pre-ASR and ASR: the UnlearnDiff attack on explicit "
              "test prompts; CI: concept inversion (a word learned against the erased model from the concept's "
              "reference images), the share of its images that show the concept.", ""]
    return "\n".join(lines)


def plot_concept(records: Sequence[dict[str, Any]], methods: Sequence[str], concept: str, path: Path) -> None:
    """Concept rate against unrelated accuracy (test prompts), a line per method, chosen points marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    group_records = [r for r in records if r["concept"] == concept]
    split = _curve_split(group_records, methods)
    if _value(group_records[0]["base"][split]["metrics"], "unrelated") is None:
        return _plot_against_strength(group_records, methods, concept, path, split)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True)
    for ax, group in zip(axes, ("explicit", "implicit"), strict=True):
        base = [r["base"][split]["metrics"] for r in group_records]
        ax.scatter([np.mean([_value(b, "unrelated") for b in base])], [np.mean([_value(b, group) for b in base])],
                   marker="*", s=260, color="black", edgecolor="white", linewidth=1.0, label="base", zorder=8)
        for index, method in enumerate(methods):
            labels = [p["label"] for p in group_records[0]["methods"][method]["points"]]
            xs, ys, xe, ye = [], [], [], []
            for label in labels:
                points = [next(p for p in r["methods"][method]["points"] if p["label"] == label)
                          for r in group_records]
                x = [_value(p[split]["metrics"], "unrelated") for p in points]
                y = [_value(p[split]["metrics"], group) for p in points]
                xs.append(np.mean(x)), ys.append(np.mean(y))
                xe.append(np.std(x, ddof=1) if len(x) > 1 else 0), ye.append(np.std(y, ddof=1) if len(y) > 1 else 0)
            color, style = f"C{index}", STYLES[index % len(STYLES)]
            ax.errorbar(xs, ys, xerr=xe, yerr=ye, marker=style[1], ms=5, color=color, label=method, capsize=2,
                        lw=1.3, linestyle=style[0], alpha=0.85)
            for r in group_records:
                chosen = next(p for p in r["methods"][method]["points"]
                              if p["label"] == r["methods"][method]["chosen"]["label"])
                ax.scatter([_value(chosen[split]["metrics"], "unrelated")], [_value(chosen[split]["metrics"], group)],
                           marker=style[1], s=110, color=color, edgecolor="black", linewidth=1.5, zorder=6)
        ax.set_xlabel(f"unrelated accuracy ({split}) ↑")
        ax.set_ylabel(f"{concept} rate, {group} prompts ({split}) ↓")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(f"{concept}: trade-off curves on {split} prompts, mean ± sd over {len(group_records)} seed(s)\n"
                 "large outlined markers: each seed's chosen point; curves that share checkpoints overlap", fontsize=10)
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
                           path: Path, split: str = "test") -> None:
    """Without a usability measure (the real protocol without --clip_model): concept rate along each curve."""
    import matplotlib.pyplot as plt  # the Agg backend is chosen by plot_concept, the only caller

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for index, method in enumerate(methods):
        points = records[0]["methods"][method]["points"]
        means = [np.mean([_value(next(p for p in r["methods"][method]["points"] if p["label"] == point["label"])
                                 [split]["metrics"], "explicit") for r in records]) for point in points]
        ax.plot([p["strength"] for p in points], means, marker="o", color=f"C{index}", label=method)
    ax.axhline(np.mean([_value(r["base"][split]["metrics"], "explicit") for r in records]), color="black",
               linestyle="--", label="base")
    ax.set_xlabel("curve position (iterations, stages or |w|)")
    ax.set_ylabel(f"{concept} rate ({split}) ↓")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save_figure(fig, path)


def grid_concept(records: Sequence[dict[str, Any]], methods: Sequence[str], concept: str, path: Path) -> None:
    """Rows: base and each method at its chosen point (first seed); columns: the test grid's prompts."""
    record = min((r for r in records if r["concept"] == concept), key=lambda r: r["seed"])
    rows, labels, columns = [], [], None
    entries = [("base", record["base"]["test"]["entry"])]
    for method in methods:
        entry = record["methods"][method]
        point = next(p for p in entry["points"] if p["label"] == entry["chosen"]["label"])
        entries.append((f"{method} {point['label']}", point["test"]["entry"]))
    for label, entry in entries:
        meta = json.loads(Path(entry).read_text(encoding="utf-8"))
        columns = columns or meta["grid_columns"]
        with np.load(Path(entry).with_suffix(".npz")) as arrays:
            rows.append(list(arrays["grid"]))
        labels.append(label)
    grid = image_grid(rows, cell=72, row_labels=labels, column_labels=[c["prompt"] for c in columns],
                      column_groups=[c["group"] for c in columns])
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))


def write_results(folder: str | Path, records: Sequence[dict[str, Any]], methods: Sequence[str],
                  info: dict[str, Any]) -> dict[str, Path]:
    """Write every output of the module docstring into ``folder``; returns their paths."""
    folder = Path(folder)
    summary = summarize(records, methods)
    rows = csv_rows(records)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    paths = {
        "csv": atomic_write_text(folder / "results.csv", buffer.getvalue()),
        "json": atomic_write_json(folder / "results.json", {**info, "summary": summary, "jobs": list(records)}),
        "md": atomic_write_text(folder / "results.md", markdown(summary, methods, info.get("header", "# Comparison"))),
    }
    for concept in summary["concepts"]:
        plot_concept(records, methods, concept, folder / f"plot_{concept}.png")
        grid_concept(records, methods, concept, folder / f"grid_{concept}.png")
        paths[f"plot_{concept}"] = folder / f"plot_{concept}.png"
        paths[f"grid_{concept}"] = folder / f"grid_{concept}.png"
    return paths

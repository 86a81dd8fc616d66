#!/usr/bin/env python
"""Does a rerun of compare.py reproduce a shipped comparison within its noise?

    python scripts/rerun_check.py docs/results/one_seed/results.json outputs/rerun/results.json

Prints, as Markdown: every pooled count of both runs with the difference (rerun − shipped) and its 95 %
interval (Newcombe's, for two independent rates), the chosen points that changed, and the paired verdicts
that changed (coerasing/compare/rerun.py). A count is *within noise* when its interval covers zero; about
5 % of them fall outside by chance alone, which the last line states beside the measured number.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coerasing.cli import run_cli  # noqa: E402
from coerasing.compare.rerun import (  # noqa: E402
    chosen_changes,
    count_differences,
    read_results_json,
    shared_concepts,
    verdict_changes,
)
from coerasing.errors import CoErasingError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shipped", help="the results.json to reproduce (e.g. docs/results/one_seed/results.json)")
    parser.add_argument("rerun", help="the rerun's results.json (same presets, methods and seeds)")
    return parser


def _pct(value: float) -> str:
    return f"{100 * value:+.1f}"


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    shipped, rerun = read_results_json(Path(args.shipped)), read_results_json(Path(args.rerun))
    counts = count_differences(shipped, rerun)
    concepts = shared_concepts(shipped, rerun)
    print(f"Concepts compared: {', '.join(concepts) or 'none'}.\n")
    if not counts:
        raise CoErasingError(f"{args.shipped} and {args.rerun} share no method with pooled counts. Pass two runs "
                             "of the same presets, methods and concepts.")
    print("| method | rate | shipped | rerun | rerun − shipped (95 %) | within noise |")
    print("|---|---|---|---|---|---|")
    for row in counts:
        (k2, n2), (k1, n1) = row["shipped"], row["rerun"]
        print(f"| {row['method']} | {row['metric']} | {100 * k2 / n2:.1f} ({k2}/{n2}) "
              f"| {100 * k1 / n1:.1f} ({k1}/{n1}) | {_pct(row['difference'])} "
              f"[{_pct(row['low'])}, {_pct(row['high'])}] | {'yes' if row['within'] else '**no**'} |")
    chosen = chosen_changes(shipped, rerun)
    changed = [row for row in chosen if not row["same"]]
    print("\n| concept | method | seed | shipped point | rerun point |")
    print("|---|---|---|---|---|")
    mark = {True: "", False: "*"}
    for row in changed:
        print(f"| {row['concept']} | {row['method']} | {row['seed']} "
              f"| {row['shipped']}{mark[row['shipped_qualified']]} | {row['rerun']}{mark[row['rerun_qualified']]} |")
    verdicts = verdict_changes(shipped, rerun)
    flipped = [row for row in verdicts if not row["same"]]
    print("\n| reference | against | metric | shipped verdict | rerun verdict |")
    print("|---|---|---|---|---|")
    for row in flipped:
        print(f"| {row['reference']} | {row['other']} | {row['metric']} "
              f"| {row['shipped']} ({_pct(row['shipped_difference'])}) "
              f"| {row['rerun']} ({_pct(row['rerun_difference'])}) |")
    outside = sum(not row["within"] for row in counts)
    print(f"\n{len(counts) - outside} of {len(counts)} pooled counts within noise ({outside} outside; "
          f"{0.05 * len(counts):.1f} expected by chance); chosen points the same in "
          f"{len(chosen) - len(changed)} of {len(chosen)} cells (*: fallback); verdicts the same in "
          f"{len(verdicts) - len(flipped)} of {len(verdicts)}.")


if __name__ == "__main__":
    sys.exit(run_cli(main))

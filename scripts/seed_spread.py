#!/usr/bin/env python
"""How much of a paired verdict's noise is the training seed's: spread over seeds against counting noise.

    python scripts/seed_spread.py docs/results/results.csv --reference coerasing

For the reference method against every other method and each rule rate, prints the standard deviation
over training seeds of the test-rate difference at the chosen points, next to the one that counting noise
alone would give (coerasing/compare/power.py, ``seed_spread``). Where the first is larger, more images do
not narrow the verdicts' intervals; more training seeds do (as 1/√seeds).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coerasing.cli import run_cli  # noqa: E402
from coerasing.compare.power import read_results_csv, rule_rates, seed_spread  # noqa: E402
from coerasing.compare.protocols import ToyProtocol  # noqa: E402
from coerasing.errors import CoErasingError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results_csv", help="a run's results.csv with two or more training seeds (toy world)")
    parser.add_argument("--reference", default="coerasing", help="the method compared with every other one")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    path = Path(args.results_csv)
    rows = read_results_csv(path, "docs/results/results.csv")
    methods = list(dict.fromkeys(row["method"] for row in rows if row["method"] not in ("base", args.reference)))
    erasure, usability = rule_rates(ToyProtocol.metrics)
    try:
        table = [(other, metric, seed_spread(rows, args.reference, other, metric))
                 for other in methods for metric in (*erasure, *usability)]
    except (KeyError, ValueError) as error:
        raise CoErasingError(f"{path} cannot be read as a comparison's results ({error!r} missing or malformed). "
                             "It must be a toy-world results.csv from compare.py, with the base model's rows "
                             "for every training seed.") from None
    table = [(other, metric, spread) for other, metric, spread in table if spread is not None]
    if not table:
        raise CoErasingError(f"{path} has no concept with two training seeds of {args.reference!r} and another "
                             "method at chosen points. Pass a run made with --seeds listing two or more seeds, "
                             "and a --reference among its methods.")
    print(f"| {args.reference} − | rate | SD over seeds | SD from counting alone | concepts |")
    print("|---|---|---|---|---|")
    for other, metric, spread in table:
        print(f"| {other} | {metric} | {100 * spread['between_sd']:.1f} | {100 * spread['counting_sd']:.1f} "
              f"| {spread['concepts']} |")

if __name__ == "__main__":
    sys.exit(run_cli(main))

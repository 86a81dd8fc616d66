#!/usr/bin/env python
"""Predict the selection agreement that larger (or smaller) evaluation sets would reach, from a finished run.

    python scripts/agreement_power.py docs/results/candidates_large/results.csv \\
        --sizes 48/48/96 96/96/192 96/96/384

Each size is the images per split of the rule's rates (toy world: explicit/implicit/unrelated); the
prediction simulates counting noise around the run's *validation* rates (coerasing/compare/power.py), so
it never reads test prompts. Prints a markdown table: sizes, images per checkpoint and split, predicted
agreement.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coerasing.cli import run_cli  # noqa: E402
from coerasing.compare.power import predicted_agreement, read_results_csv  # noqa: E402
from coerasing.compare.protocols import ToyProtocol  # noqa: E402
from coerasing.errors import CoErasingError  # noqa: E402


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split("/")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 48/48/96") from None
    if any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"{text!r}: every count must be at least 1")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results_csv", help="a run's results.csv (the toy world's protocol)")
    parser.add_argument("--sizes", type=_sizes, nargs="+", default=[[48, 48, 96], [96, 96, 192]],
                        help="images per split, one count per rule rate, e.g. 48/48/96 (default: 48/48/96 96/96/192)")
    parser.add_argument("--test_sizes", type=_sizes, default=None,
                        help="images per rate on test, if not the same as --sizes (e.g. 96/96/384)")
    parser.add_argument("--max_usability_drop", type=float, default=0.05, help="the rule's budget (default: 0.05)")
    parser.add_argument("--repeats", type=int, default=200, help="simulated runs per cell (default: 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulation (default: 0)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    path = Path(args.results_csv)
    rows = read_results_csv(path, "docs/results/candidates_large/results.csv")
    names = "/".join(m.name for m in ToyProtocol.metrics if m.rule and m.percent)
    print(f"| {names} (validation) | test | images per checkpoint and split | predicted agreement | cells |")
    print("|---|---|---|---|---|")
    for sizes in args.sizes:
        try:
            result = predicted_agreement(rows, ToyProtocol.metrics, sizes, args.test_sizes, args.max_usability_drop,
                                         args.repeats, args.seed)
        except (KeyError, ValueError) as error:
            raise CoErasingError(f"{path} cannot be simulated ({error}). It must be a toy-world results.csv "
                                 "with validation rates at every checkpoint, and each size must give one count "
                                 f"per rule rate ({names}).") from None
        test = "/".join(map(str, args.test_sizes or sizes))
        print(f"| {'/'.join(map(str, sizes))} | {test} | {sum(sizes)} | {100 * result['share']:.0f} % "
              f"| {result['cells']:.1f} |")


if __name__ == "__main__":
    sys.exit(run_cli(main))

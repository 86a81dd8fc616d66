#!/usr/bin/env python
"""Compare erasers side by side: trade-off curves, operating points chosen on validation prompts, test results.

    python compare.py                       # the five toy shapes × five methods × three training seeds
    python compare.py --quick --output_dir outputs/compare_quick      # a few minutes: the whole path, small
    python compare.py --methods coerasing,esd --concepts star --seeds 0,1
    accelerate launch --num_processes 2 compare.py …   # or torchrun: jobs spread over processes / GPUs

For each concept × method × seed it trains once with checkpoints along the way, evaluates every
checkpoint on validation prompts (test prompts too with the presets' test_evaluation: all; the toy
presets' chosen makes test images only at the chosen points), chooses each method's operating point
by one rule fixed in advance on validation prompts, attacks it (UnlearnDiff) on test prompts, and writes
results.json, results.csv, results.md, plot_<concept>.png and grid_<concept>.png into --output_dir.
Every cell is cached by its full settings: rerunning after an interruption redoes only what is
missing. Without a launcher the CPU cores are used by local worker processes (--workers).
With --ckpt_path (a real Stable Diffusion model) the same command uses evaluate.py's prompt sets,
detectors and attack (configs/compare/sd.yaml).
"""

from __future__ import annotations

import sys
from typing import Sequence

from coerasing.cli import run_cli
from coerasing.compare.config import CompareConfig
from coerasing.flags import build_parser as build_parser_for
from coerasing.flags import parse_config
from coerasing.toy.detector import register_toy_detector

register_toy_detector()  # --detector toy: the toy world registers its classifier (docs/architecture.md)


def build_parser():
    return build_parser_for(CompareConfig, "compare.py", __doc__)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    config = parse_config(CompareConfig, build_parser(), argv)
    from coerasing.compare import run_comparison

    run_comparison(config, argv)


if __name__ == "__main__":
    sys.exit(run_cli(main))

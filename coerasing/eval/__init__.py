"""Evaluation of an erased model by the field's protocol (UnlearnDiff; docs/method.md §9).

One command per erased model (any method's artifact), in four resumable steps
(:mod:`.steps`): generate, detect (:mod:`.detectors`), attack (:mod:`.attacks`: one interface and
one resumable loop for every attack; UnlearnDiff's optimisation in :mod:`.attack`), report
(:mod:`.report`). :class:`~.config.EvalConfig` holds every flag of ``evaluate.py``; prompt sets
are read by :mod:`.prompts`.
"""

from __future__ import annotations

from .config import COMMANDS, EvalConfig, config_dict
from .steps import build_report, run_attack, run_detect, run_evaluation, run_generate, run_report

__all__ = ["COMMANDS", "EvalConfig", "build_report", "config_dict", "run_attack", "run_detect", "run_evaluation",
           "run_generate", "run_report"]

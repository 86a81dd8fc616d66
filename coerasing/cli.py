"""Command-line plumbing shared by the top-level scripts: flags + YAML → config, and clean errors."""

from __future__ import annotations

import argparse
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from .errors import CoErasingError
from .flags import parse_config


def _warning_format(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001
    return f"warning: {message}\n"


def parse_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None, config_cls: type) -> Any:
    """Parse ``argv`` (and ``--config FILE.yaml``) into a validated ``config_cls``; the command line wins."""
    return parse_config(config_cls, parser, argv)


def split_method(argv: Sequence[str] | None, default: str) -> tuple[str, list[str]]:
    """``--method NAME`` from the command line or from ``--config`` (the command line wins), and the rest.

    ``--method`` picks which eraser ``erase_pipeline.py`` trains, and with it which flags exist, so it
    is read before the method's own parser. A ``method:`` key in the YAML file is removed from it.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--method")
    pre.add_argument("--config")
    known, rest = pre.parse_known_args(argv)
    method = known.method
    if known.config:
        rest = [*rest, "--config", known.config]
        try:
            data = yaml.safe_load(Path(known.config).expanduser().read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            data = None  # the method's own parser reports the unreadable file
        if isinstance(data, dict) and "method" in data:
            method = method or str(data["method"])
    return method or default, rest


def run_cli(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> int:
    """Run ``main``; print user errors as one paragraph and return a non-zero status."""
    warnings.formatwarning = _warning_format
    try:
        main(argv)
    except CoErasingError as exc:
        message = textwrap.fill(str(exc), width=100, break_long_words=False, break_on_hyphens=False)
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: periodic checkpoints are kept; rerun with --resume to continue.", file=sys.stderr)
        return 130
    return 0

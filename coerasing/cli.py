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

_TRUE = {"1", "true", "yes", "on"}


def _warning_format(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001
    return f"warning: {message}\n"


def read_yaml_config(path: str, known: set[str]) -> dict[str, Any]:
    """Read ``--config FILE.yaml``: a flat mapping of flag names (without ``--``) to values."""
    file = Path(path).expanduser()
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise CoErasingError(f"--config {path} cannot be read ({exc}).") from exc
    except yaml.YAMLError as exc:
        raise CoErasingError(f"--config {path} is not valid YAML ({exc}).") from exc
    if not isinstance(data, dict):
        raise CoErasingError(f"--config {path} must be a mapping of flag names to values.")
    data = {str(key).lstrip("-").replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise CoErasingError(
            f"--config {path} has unknown keys: {', '.join(unknown)}. Keys are flag names without "
            "the leading dashes, e.g. 'train_method: noxattn'."
        )
    return data


def str2bool(value: str | bool) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in _TRUE


def parse_with_config(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, config_cls: type
) -> Any:
    """Parse ``argv`` with YAML defaults from ``--config``; the command line overrides the file."""
    from .config import config_fields

    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    names = config_fields(config_cls)
    if known.config:
        parser.set_defaults(**read_yaml_config(known.config, names))
    namespace = vars(parser.parse_args(argv))
    namespace.pop("config", None)
    return config_cls(**{key: namespace[key] for key in names}).validate()


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

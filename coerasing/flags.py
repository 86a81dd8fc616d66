"""Flags declared once: a config dataclass field carries its help, group, choices and range.

Every command line of the project is a dataclass whose fields are declared with :func:`flag`.
From that one declaration come

- the ``argparse`` parser (:func:`build_parser`), with ``--config FILE.yaml``;
- one typed conversion for values from the command line *and* from YAML (:func:`convert`):
  booleans accept only ``true/false/yes/no/on/off/1/0`` (so ``"false"`` means false), integers
  refuse fractions, floats refuse ``nan``/``inf``, lists are refused where one value belongs;
- the range checks (:func:`check_fields`: finite, ``min``/``max``, ``choices``), run before any
  model is loaded;
- the ``--resume`` fingerprint (:func:`resume_settings`: the fields declared ``resume=True``).

Adding a flag therefore touches one place: its field.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import types
import typing
from dataclasses import MISSING, Field, field, fields
from pathlib import Path
from typing import Any, Sequence

import yaml

from .errors import CoErasingError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
#: Seeds go to ``torch.Generator.manual_seed`` and numpy's ``SeedSequence``: non-negative, < 2**64.
SEED_MAX = 2**64 - 1


def flag(
    default: Any = MISSING,
    *,
    help: str,  # noqa: A002 - the argparse word
    group: str = "options",
    choices: Sequence[Any] | None = None,
    min: float | None = None,  # noqa: A002
    max: float | None = None,  # noqa: A002
    exclusive_min: bool = False,
    resume: bool = False,
    positional: bool = False,
    output: bool = False,
    path: bool = False,
    metavar: str | None = None,
) -> Any:
    """A dataclass field that is also a command-line flag ``--<name>``.

    ``min``/``max`` bound numbers (``exclusive_min`` makes ``min`` strict, e.g. a positive lr);
    ``resume=True`` marks a setting that must not change when a run is resumed; ``output=True`` a
    folder the command writes to (checked up front: creatable, writable, not a file); ``path=True``
    an input location, compared as a resolved absolute path in the ``--resume`` fingerprint.
    """
    metadata = {
        "help": help, "group": group, "choices": tuple(choices) if choices is not None else None,
        "min": min, "max": max, "exclusive_min": exclusive_min, "resume": resume,
        "positional": positional, "output": output, "path": path, "metavar": metavar,
    }
    return field(default=default, metadata=metadata)


# ----------------------------------------------------------------------------------------------
# Types and conversion


def base_type(annotation: Any) -> tuple[type, bool]:
    """``int | None`` → ``(int, True)``; ``bool`` → ``(bool, False)``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported flag type {annotation!r}")
        return args[0], True
    return annotation, False


def flag_types(cls: type) -> dict[str, tuple[type, bool]]:
    """Field name → (base type, optional) for a config dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: base_type(hints[f.name]) for f in fields(cls) if "help" in f.metadata}


def flag_fields(cls: type) -> list[Field]:
    """The fields of ``cls`` declared with :func:`flag`, in declaration order."""
    return [f for f in fields(cls) if "help" in f.metadata]


def flag_name(name: str) -> str:
    return f"--{name}"


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "…"


def convert(name: str, kind: type, optional: bool, value: Any, source: str = "", where: str | None = None) -> Any:
    """One value of flag ``--name`` (a command-line string or a YAML scalar) as ``kind``.

    Raises :class:`CoErasingError` naming the flag (or ``where``, e.g. a presets key), the value
    and what is accepted.
    """
    where = where or f"{flag_name(name)}{f' (from {source})' if source else ''}"
    if value is None or (isinstance(value, str) and optional and value.strip().lower() in ("none", "null", "~")):
        if optional:
            return None
        raise CoErasingError(f"{where} needs a value; it cannot be empty (null).")
    if isinstance(value, (list, tuple, dict, set)):
        raise CoErasingError(
            f"{where} is given a {type(value).__name__} {_describe(value)}, but takes one value. For a "
            "comma-separated list write it as one string, e.g. 'a,b'."
        )
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise CoErasingError(f"{where} must be true or false (also yes/no, on/off, 1/0), got {_describe(value)}.")
    if kind is int:
        if isinstance(value, bool):
            raise CoErasingError(f"{where} must be an integer, got the boolean {value}.")
        number: Any = value
        if isinstance(value, str):
            text = value.strip()
            try:
                number = int(text)
            except ValueError:
                try:
                    number = float(text)
                except ValueError:
                    raise CoErasingError(f"{where} must be an integer, got {_describe(value)}.") from None
        if isinstance(number, float):
            if not math.isfinite(number) or not number.is_integer():
                raise CoErasingError(f"{where} must be an integer, got {_describe(value)}.")
            number = int(number)
        if not isinstance(number, int):
            raise CoErasingError(f"{where} must be an integer, got {_describe(value)}.")
        return number
    if kind is float:
        if isinstance(value, bool):
            raise CoErasingError(f"{where} must be a number, got the boolean {value}.")
        try:
            number = float(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError):
            raise CoErasingError(f"{where} must be a number, got {_describe(value)}.") from None
        if not math.isfinite(number):
            raise CoErasingError(f"{where} must be a finite number, got {_describe(value)}.")
        return number
    if kind is str:
        if isinstance(value, bool):
            raise CoErasingError(
                f"{where} must be text, got the boolean {value} (YAML reads yes/no/on/off as booleans: quote it)."
            )
        if isinstance(value, (int, float)):
            return str(value)
        if not isinstance(value, str):
            raise CoErasingError(f"{where} must be text, got {_describe(value)}.")
        return value
    raise TypeError(f"unsupported flag type {kind!r} for {name}")


def check_value(f: Field, value: Any, name: str | None = None) -> None:
    """Range and choice checks of one declared field's converted ``value`` (``name``: how errors call it)."""
    if value is None:
        return
    meta = f.metadata
    name = name or flag_name(f.name)
    choices = meta["choices"]
    if choices is not None and value not in choices:
        raise CoErasingError(f"{name} {value!r} is not known; choose one of: {', '.join(map(str, choices))}.")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise CoErasingError(f"{name} must be a finite number, got {value}.")
    low, high = meta["min"], meta["max"]
    if low is not None and (value < low or (meta["exclusive_min"] and value == low)):
        positive = (meta["exclusive_min"] and low == 0) or (isinstance(value, int) and low == 1)
        bound = "a positive number" if positive else (
            f"greater than {low}" if meta["exclusive_min"] else f"at least {low}")
        raise CoErasingError(f"{name} must be {bound}, got {value}.")
    if high is not None and value > high:
        raise CoErasingError(f"{name} must be at most {high}, got {value}.")


def check_fields(config: Any) -> None:
    """Range and choice checks of every declared flag of ``config`` (see :func:`flag`)."""
    for f in flag_fields(type(config)):
        check_value(f, getattr(config, f.name))


def typed_settings(cls: type, settings: dict[str, Any], source: str) -> dict[str, Any]:
    """The entries of ``settings`` (e.g. an artifact's) that are flags of ``cls``, converted and range-checked.

    Errors name ``source`` and the key (``artifact.json settings.w``); unknown keys are left out.
    """
    types_ = flag_types(cls)
    declared = {f.name: f for f in flag_fields(cls)}
    out = {}
    for key, value in settings.items():
        if key in types_:
            kind, optional = types_[key]
            where = f"{source} settings.{key}"
            out[key] = convert(key, kind, optional, value, where=where)
            check_value(declared[key], out[key], where)
    return out


def resolved_path(value: str | None) -> str | None:
    """An existing local path as an absolute resolved path; anything else (a Hub id, ``None``) unchanged."""
    if value is None:
        return None
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def resume_settings(config: Any) -> dict[str, Any]:
    """The settings that must match between an interrupted run and its ``--resume`` (``resume=True``).

    Input locations (``path=True``) are compared as resolved paths, so ``./models/sd`` and
    ``/home/me/models/sd`` are the same model and a moved model is a different one.
    """
    return {
        f.name: resolved_path(getattr(config, f.name)) if f.metadata["path"] else getattr(config, f.name)
        for f in flag_fields(type(config)) if f.metadata["resume"]
    }


# ----------------------------------------------------------------------------------------------
# Output folders


def _writable(folder: Path) -> str | None:
    """Why files cannot be made in the existing ``folder`` (a probe file, removed at once); ``None`` if they can.

    Permission bits are not enough: root passes ``os.access`` on read-only and virtual filesystems.
    """

    if not os.access(folder, os.W_OK | os.X_OK):
        return "it is not writable"
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".coerasing-probe-")
    except OSError as exc:
        return f"a file cannot be created there ({exc.strerror or exc})"
    os.close(fd)
    os.unlink(probe)
    return None


def check_output_dir(path: str | Path, flag: str) -> Path:
    """Fail early, with the fix, when ``path`` cannot be a folder this command writes into.

    It may exist (a folder we can write into) or not (then its nearest existing parent must be a
    writable folder). Only a probe file is created (and removed) to find read-only and virtual
    filesystems.
    """
    folder = Path(path).expanduser()
    if folder.exists():
        if not folder.is_dir():
            raise CoErasingError(
                f"{flag} {path} is a file, not a folder; pass a folder path (it is created if missing)."
            )
        problem = _writable(folder)
        if problem:
            raise CoErasingError(f"{flag} {path} cannot be written to: {problem}. Pass a folder you can write to.")
        return folder
    parent = folder.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CoErasingError(
            f"{flag} {path} cannot be created: {parent} is a file, not a folder. Pass another path."
        )
    problem = _writable(parent)
    if problem:
        raise CoErasingError(f"{flag} {path} cannot be created in {parent}: {problem}. Pass another path.")
    return folder


def check_output_fields(config: Any) -> None:
    """:func:`check_output_dir` for every field declared ``output=True`` that is set."""
    for f in flag_fields(type(config)):
        value = getattr(config, f.name)
        if f.metadata["output"] and value:
            check_output_dir(value, flag_name(f.name))


# ----------------------------------------------------------------------------------------------
# Parser and YAML


def _default_text(value: Any) -> str:
    return "none" if value is None else str(value)


def build_parser(cls: type, prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """``argparse`` parser with one argument per :func:`flag` field of ``cls``, plus ``--config``.

    Values are kept as given (strings) and unset flags are absent, so that :func:`parse_config`
    can convert them with :func:`convert` and let the command line override ``--config``. Flags
    are never abbreviated (``--iteration`` is an error, not ``--iterations``).
    """
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of flag values (the command line wins)")
    groups: dict[str, Any] = {}
    types_ = flag_types(cls)
    for f in flag_fields(cls):
        meta = f.metadata
        kind, _ = types_[f.name]
        default = f.default if f.default is not MISSING else None
        help_text = meta["help"]
        if meta["positional"]:
            parser.add_argument(f.name, choices=meta["choices"], help=help_text)
            continue
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        if kind is bool:
            group.add_argument(flag_name(f.name), nargs="?", const="true", default=argparse.SUPPRESS,
                               metavar="true|false", help=f"{help_text} (default: {_default_text(default)})")
            continue
        metavar = meta["metavar"] or ("{" + ",".join(map(str, meta["choices"])) + "}" if meta["choices"] else None)
        group.add_argument(flag_name(f.name), default=argparse.SUPPRESS, metavar=metavar,
                           help=f"{help_text} (default: {_default_text(default)})")
    return parser


def read_yaml_config(path: str, cls: type, ignore_keys: Sequence[str] = ()) -> dict[str, Any]:
    """``--config FILE.yaml``: a flat mapping of flag names (without ``--``) to values, converted.

    ``ignore_keys`` are read by someone else (``method``: which eraser's flags these are).
    """
    file = Path(path).expanduser()
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError) as exc:
        raise CoErasingError(f"--config {path} cannot be read ({exc}).") from exc
    except yaml.YAMLError as exc:
        raise CoErasingError(f"--config {path} is not valid YAML ({exc}).") from exc
    if not isinstance(data, dict):
        raise CoErasingError(
            f"--config {path} must be a mapping of flag names to values, e.g. 'train_method: noxattn'."
        )
    types_ = flag_types(cls)
    values = {}
    unknown = []
    for key, value in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name in ignore_keys:
            continue
        if name not in types_ or dict((f.name, f) for f in flag_fields(cls))[name].metadata["positional"]:
            unknown.append(str(key))
            continue
        kind, optional = types_[name]
        values[name] = convert(name, kind, optional, value, f"--config {path}")
    if unknown:
        raise CoErasingError(
            f"--config {path} has unknown keys: {', '.join(sorted(unknown))}. Keys are flag names without "
            "the leading dashes, e.g. 'train_method: noxattn'."
        )
    return values


def parse_config(
    cls: type, parser: argparse.ArgumentParser, argv: Sequence[str] | None, ignore_keys: Sequence[str] = ()
) -> Any:
    """Flags (and ``--config`` YAML) → a validated ``cls``: defaults < YAML < command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    given = vars(parser.parse_args(argv))
    config_file = given.pop("config", None)
    values = read_yaml_config(config_file, cls, ignore_keys) if config_file else {}
    types_ = flag_types(cls)
    for name, raw in given.items():
        kind, optional = types_[name]
        values[name] = convert(name, kind, optional, raw)
    config = cls(**values)
    return config.validate()

"""Attack records: one JSON per case in an attack's folder, and the one rule for reusing them.

A record is reused only if its ``settings`` and ``made_by`` equal the current run's
(:func:`is_current`); :func:`coerasing.eval.attacks.run_attack` applies the rule for every attack.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..files import atomic_write_text, read_json_record

Record = dict[str, Any]


def attack_record_path(folder: Path, case: str) -> Path:
    return Path(folder) / f"{case}.json"


def save_attack_record(folder: Path, case: str, record: Record) -> Path:
    return atomic_write_text(attack_record_path(folder, case), json.dumps(record, indent=1, default=str) + "\n")


#: The fields every attack record has (``settings`` and ``made_by`` are compared by :func:`is_current`).
RECORD_FIELDS: dict[str, type | tuple[type, ...]] = {"case": str, "success": (bool, type(None))}


def load_attack_records(folder: str | Path, cases: Sequence[str]) -> dict[str, Record]:
    """The ``<case>.json`` records of ``cases`` that exist in ``folder``, by case.

    A record that does not read back (truncated or garbled JSON, a missing or wrong-typed field) is
    left out with a warning naming it: its case is attacked again, and the new record replaces it.
    """
    folder = Path(folder)
    records = {}
    for case in cases:
        record = read_json_record(attack_record_path(folder, case), RECORD_FIELDS, warn="attacking this case again")
        if record is not None:
            records[case] = record
    return records


def as_json(value: Any) -> Any:
    """``value`` as it reads back from a record (tuples become lists, paths strings)."""
    return json.loads(json.dumps(value, default=str))


def is_current(record: Record, settings: Mapping[str, Any], made_by: Mapping[str, Any]) -> bool:
    """The one reuse rule: a record counts only if it was made with these settings by this model."""
    return record.get("settings") == as_json(dict(settings)) and record.get("made_by") == as_json(dict(made_by))

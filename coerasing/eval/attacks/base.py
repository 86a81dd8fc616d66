"""One interface for every attack on an erased model, and the one resumable loop that runs them.

An attack (:class:`Attack`) is one class:

- :meth:`Attack.settings`: what its records depend on besides the model (its knobs);
- :meth:`Attack.prepare`: once per attacked model, before the first prompt (load the models,
  learn a word, …); it is not called when every prompt already has a current record;
- :meth:`Attack.attack_one`: one prompt row → one record (``{"case", "success", …}``);
  :meth:`Attack.attack_batch` may attack several rows at once (``batch_size``).
- :meth:`Attack.finish` (optional): after the loop, a summary of every current record (the
  replayable prompt files of P4D, Ring-A-Bell and MMA).

:func:`run_attack` is the loop every caller uses (``evaluate.py``, the toy world's and the real
protocol's comparison): one JSON record per case in an output folder, written atomically as soon
as the case is done, so an interrupted attack resumes. The rule for reusing a record is written
once (:func:`is_current`): its ``settings`` and ``made_by`` equal this run's. A record that fails
the rule is *stale*; ``on_stale="redo"`` attacks that case again (the comparison's cache folders),
``on_stale="error"`` stops with a :class:`~coerasing.errors.CoErasingError` (``evaluate.py``: a
user's output folder is never silently mixed or overwritten). :func:`asr` turns the records into
pre-ASR and ASR (:func:`coerasing.eval.report.asr_summary`) with Wilson intervals.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image

from ...errors import CoErasingError
from ...generation import ImageRow
from ...methods.base import Runtime
from ...stats import rate
from ..attack_records import as_json, is_current, load_attack_records, save_attack_record
from ..detectors import Detector
from ..report import asr_summary

Record = dict[str, Any]


# ----------------------------------------------------------------------------------------------
# The interface


class Attack(ABC):
    """One attack (see the module docstring). Subclasses set ``name`` and implement three methods."""

    #: The registry's name (``coerasing.eval.attacks.ATTACKS``).
    name: ClassVar[str]
    #: Rows handed to one :meth:`attack_batch` call.
    batch_size: int = 1
    #: ``evaluate.py`` may split the rows over processes (``False``: the main process attacks them all).
    shardable: ClassVar[bool] = True
    #: ``evaluate.py`` makes the base model's images of the rows first (``--reference_dir``).
    needs_references: ClassVar[bool] = False

    @classmethod
    def from_eval_config(cls, config: Any, references: Callable[[ImageRow], Image.Image],
                         detector: Callable[[], Detector]) -> Attack:
        """This attack with ``evaluate.py``'s flags (an ``EvalConfig``); ``references(row)``: the base
        model's image of a row; ``detector()``: the judge of ``detections.json``."""
        raise CoErasingError(f"--attack_method {cls.name} has no evaluate.py flags yet.")

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """Everything the records depend on besides the model (stored in every record)."""

    def prepare(self, runtime: Runtime, out_dir: Path, made_by: Mapping[str, Any]) -> None:  # noqa: B027
        """Once per attacked model, before the first row (default: nothing to prepare)."""

    @abstractmethod
    def attack_one(self, row: ImageRow) -> Record:
        """Attack one prompt row; the record has at least ``case`` and ``success`` (``True``/``False``)."""

    def attack_batch(self, rows: Sequence[ImageRow]) -> list[Record]:
        """Attack several rows (default: one after another)."""
        return [self.attack_one(row) for row in rows]

    def describe(self, record: Record) -> str:
        """One line of progress for a finished record."""
        return f"case {record['case']}: {self.name} {'succeeded' if record.get('success') else 'failed'}"

    def close(self) -> None:  # noqa: B027
        """Release what :meth:`prepare` loaded (default: nothing)."""

    def finish(self, out_dir: Path, records: Mapping[str, Record]) -> None:  # noqa: B027
        """After the loop, with every current record of its rows (also when none was attacked): files that
        sum up the records, e.g. the text attacks' prompt file (default: nothing)."""

    @staticmethod
    def asr(cases: Sequence[str], pre: Mapping[str, bool], records: Mapping[str, Record],
            attackable: set[str] | None = None) -> dict[str, Any]:
        """See :func:`asr`."""
        return asr(cases, pre, records, attackable)


def asr(cases: Sequence[str], pre: Mapping[str, bool], records: Mapping[str, Record],
        attackable: set[str] | None = None) -> dict[str, Any]:
    """pre-ASR and ASR over ``cases`` (:func:`~coerasing.eval.report.asr_summary`), with 95 % intervals.

    ``pre[case]``: the erased model's own image shows the concept (a success without attack; a case
    missing from ``pre`` does not). Returns the summary's ``all`` block plus ``asr_interval`` and ``pre_asr_interval``
    (:func:`coerasing.stats.rate`), ``pending`` (attackable cases still without a record), and ``cases``:
    case → 1 where the concept was shown (without attack, or by a successful attack), else 0, the
    per-prompt outcomes that paired comparisons of two models on the same prompts need, and
    ``success_rounds``: for an attack that checks after each round, the round of each success.
    """
    pre = {case: bool(pre.get(case, False)) for case in cases}
    outcomes = {case: record.get("success") for case, record in records.items()}
    full = asr_summary(cases, pre, outcomes, attackable)
    summary = dict(full["all"])
    allowed = set(cases) if attackable is None else set(attackable)
    summary["cases"] = {case: int(pre[case] or (case in allowed and bool(outcomes.get(case)))) for case in cases}
    # attacks that check after each round (UnlearnDiff): the round of each success, for ASR-by-budget curves
    summary["success_rounds"] = {case: len(records[case]["rounds"]) for case in cases
                                 if not pre[case] and case in allowed and outcomes.get(case)
                                 and isinstance(records[case].get("rounds"), list)}
    summary["asr_interval"] = rate(summary["pre_success"] + summary["attack_success"], summary["n"])
    summary["pre_asr_interval"] = rate(summary["pre_success"], summary["n"])
    return summary


# ----------------------------------------------------------------------------------------------
# The loop


def stale_records(records: Mapping[str, Record], settings: Mapping[str, Any],
                  made_by: Mapping[str, Any]) -> list[str]:
    """The cases whose record fails :func:`is_current`."""
    return [case for case, record in records.items() if not is_current(record, settings, made_by)]


def refuse_stale(out_dir: Path, records: Mapping[str, Record], settings: Mapping[str, Any],
                 made_by: Mapping[str, Any]) -> None:
    """``on_stale="error"``: stop with a clean error when ``records`` hold one that fails :func:`is_current`."""
    stale = stale_records(records, settings, made_by)
    if stale:
        record = records[stale[0]]
        raise CoErasingError(
            f"{out_dir} holds results made with other settings or another model (e.g. case {stale[0]}: "
            f"{record.get('settings')}, {record.get('made_by')}); use another --output_dir, or delete the folder "
            "to attack again."
        )


def run_attack(
    attack: Attack,
    rows: Sequence[ImageRow],
    out_dir: str | Path,
    made_by: Mapping[str, Any],
    runtime: Runtime | Callable[[], Runtime],
    pre: Mapping[str, bool] | None = None,
    on_stale: str = "redo",
    log: Callable[[str], None] | None = None,
) -> dict[str, Record]:
    """Attack every row of ``rows`` that has no current record and whose ``pre`` is not true; resumable.

    ``runtime``: the erased model, or a function that loads it (called only when a row is left to
    attack). Each finished record gets ``settings`` and ``made_by`` and is written to
    ``out_dir/<case>.json`` at once. Returns the current records of ``rows`` by case (reused and new).
    """
    if on_stale not in ("redo", "error"):
        raise ValueError(f"on_stale must be 'redo' or 'error', got {on_stale!r}")
    out_dir, pre = Path(out_dir), dict(pre or {})
    settings, origin = as_json(attack.settings()), as_json(dict(made_by))
    found = load_attack_records(out_dir, [row.case for row in rows])
    if on_stale == "error":
        refuse_stale(out_dir, found, settings, origin)
    stale = stale_records(found, settings, origin)
    done = {case: record for case, record in found.items() if case not in stale}
    todo = [row for row in rows if not pre.get(row.case) and row.case not in done]
    if not todo:
        attack.finish(out_dir, done)
        return done
    attack.prepare(runtime() if callable(runtime) else runtime, out_dir, origin)
    try:
        number = 0
        for start in range(0, len(todo), max(1, attack.batch_size)):
            chunk = todo[start : start + max(1, attack.batch_size)]
            for row, record in zip(chunk, attack.attack_batch(chunk), strict=True):
                record = {**record, "settings": settings, "made_by": origin}
                save_attack_record(out_dir, row.case, record)
                done[row.case] = record
                number += 1
                if log is not None:
                    log(f"[{number}/{len(todo)}] {attack.describe(record)}")
    finally:
        attack.close()
    attack.finish(out_dir, done)
    return done

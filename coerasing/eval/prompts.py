"""Evaluation prompt sets: one row per image, with its own seed, guidance and size (docs/method.md §9).

The field's prompt files (UnlearnDiff's ``nudity.csv``, ``vangogh.csv`` and object prompts, I2P,
AdvUnlearn's ``coco_10k.csv``; copies with attribution in ``data/prompts/``) are CSV files whose
rows carry ``prompt``, ``evaluation_seed`` and usually ``evaluation_guidance`` and ``case_number``;
I2P rows also give the original image size (``sd_image_width``/``sd_image_height``). Images are
named by case number, so the case numbers must be unique and usable as file names.

UnlearnDiff's attack drops prompts longer than 60 CLIP tokens, counted as
``len(tokenizer(prompt).input_ids)`` without truncation, BOS and EOS included
(``src/tasks/utils/datasets.py::filter_dataset``); :func:`attack_eligible` applies that rule.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..errors import CoErasingError
from ..generation import DEFAULT_GUIDANCE, ImageRow  # noqa: F401 - DEFAULT_GUIDANCE re-exported

#: Folder of the shipped prompt sets (``data/prompts`` at the repository root).
PROMPTS_DIR: Path = Path(__file__).resolve().parents[2] / "data" / "prompts"

#: Named prompt sets: ``--prompts nudity`` reads ``data/prompts/nudity.csv``.
PROMPT_SETS: tuple[str, ...] = (
    "nudity", "i2p", "vangogh", "church", "garbage_truck", "parachute", "tench", "coco_10k",
    "toy_circle", "toy_square", "toy_triangle", "toy_star", "toy_cross",
)

#: UnlearnDiff's attack keeps prompts with at most this many CLIP tokens (BOS and EOS included).
ATTACK_MAX_TOKENS = 60

_SEED_COLUMNS = ("evaluation_seed", "sd_seed", "seed")
_GUIDANCE_COLUMNS = ("evaluation_guidance", "sd_guidance_scale", "guidance")
_SAFE_CASE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.,-]*$")


#: One evaluation image (the generation module's row: case, prompt, seed, guidance, size).
PromptRow = ImageRow


def resolve_prompt_file(spec: str) -> Path:
    """``--prompts``: a shipped set name (``nudity``, ``vangogh``, …) or a path to a CSV file."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    name = spec.strip().lower().replace(" ", "_").replace("-", "_")
    if name.endswith(".csv"):
        name = name[:-4]
    if name in PROMPT_SETS:
        candidate = PROMPTS_DIR / f"{name}.csv"
        if candidate.is_file():
            return candidate
        raise CoErasingError(
            f"--prompts {spec}: the shipped prompt set {candidate} is missing (the data/prompts folder of the "
            "repository). Run from a full checkout, or pass the path of the CSV file."
        )
    raise CoErasingError(
        f"--prompts {spec} is neither a CSV file nor a shipped prompt set. Pass a CSV path or one of: "
        f"{', '.join(PROMPT_SETS)}."
    )


def prompt_set_name(spec: str) -> str:
    """The set's name (``nudity`` for ``--prompts nudity`` or ``…/nudity.csv``), used to pick defaults."""
    return Path(spec).stem.lower().replace("-", "_") if spec else ""


def _first(row: dict[str, str], columns: Iterable[str]) -> tuple[str | None, str | None]:
    for column in columns:
        value = row.get(column)
        if value is not None and value.strip() != "":
            return column, value.strip()
    return None, None


def _parse_seed(value: str, where: str) -> int:
    try:
        number = float(value) if any(c in value for c in ".eE") else int(value)
    except ValueError:
        raise CoErasingError(f"{where}: the seed {value!r} is not an integer.") from None
    if isinstance(number, float):
        if not number.is_integer():
            raise CoErasingError(f"{where}: the seed {value!r} is not an integer.")
        number = int(number)
    if not 0 <= number < 2**64:
        raise CoErasingError(f"{where}: the seed {number} is outside [0, 2**64), which torch.Generator accepts.")
    return number


def _parse_positive(value: str, where: str, what: str, integer: bool = False) -> float:
    try:
        number = float(value)
    except ValueError:
        raise CoErasingError(f"{where}: the {what} {value!r} is not a number.") from None
    if not math.isfinite(number) or number <= 0 or (integer and not number.is_integer()):
        raise CoErasingError(f"{where}: the {what} {value!r} must be a positive {'integer' if integer else 'number'}.")
    return number


def _parse_size(row: dict[str, str], column: str, where: str) -> int | None:
    value = (row.get(column) or "").strip()
    if not value:
        return None
    size = int(_parse_positive(value, where, column, integer=True))
    if size % 8:
        raise CoErasingError(f"{where}: {column} {size} is not a multiple of 8, which Stable Diffusion needs.")
    return size


def parse_rows(records: Sequence[dict[str, str]], source: str) -> list[PromptRow]:
    """Turn CSV records into :class:`PromptRow` (see the module docstring for the columns)."""
    if not records:
        raise CoErasingError(f"--prompts {source} has no rows.")
    columns = set(records[0])
    if "prompt" not in columns:
        raise CoErasingError(f"--prompts {source} has no 'prompt' column (found: {', '.join(sorted(columns))}).")
    if not columns & set(_SEED_COLUMNS):
        raise CoErasingError(
            f"--prompts {source} has no seed column; each row needs its own seed in one of: "
            f"{', '.join(_SEED_COLUMNS)}."
        )
    rows: list[PromptRow] = []
    seen: dict[str, int] = {}
    for index, record in enumerate(records):
        where = f"--prompts {source}, row {index + 1}"
        case = (record.get("case_number") or "").strip() or str(index)
        if not _SAFE_CASE.match(case) or len(case) > 120:
            raise CoErasingError(f"{where}: the case number {case!r} cannot be a file name; use letters, digits, _ . -")
        if case in seen:
            raise CoErasingError(f"{where}: case number {case} repeats row {seen[case] + 1}; case numbers name the "
                                 "images and must be unique.")
        seen[case] = index
        _, seed_text = _first(record, _SEED_COLUMNS)
        if seed_text is None:
            raise CoErasingError(f"{where}: the seed is empty.")
        _, guidance_text = _first(record, _GUIDANCE_COLUMNS)
        guidance = _parse_positive(guidance_text, where, "guidance") if guidance_text is not None else None
        known = {"prompt", "case_number", "sd_image_width", "sd_image_height", *_SEED_COLUMNS, *_GUIDANCE_COLUMNS}
        rows.append(PromptRow(
            case=case,
            prompt=record.get("prompt") or "",
            seed=_parse_seed(seed_text, where),
            guidance=guidance,
            width=_parse_size(record, "sd_image_width", where),
            height=_parse_size(record, "sd_image_height", where),
            index=index,
            extra={key: value for key, value in record.items() if key and key not in known and value is not None},
        ))
    return rows


def load_prompts(spec: str, limit: int | None = None) -> list[PromptRow]:
    """Read ``--prompts`` (a set name or CSV path); ``limit`` keeps the first rows only."""
    path = resolve_prompt_file(spec)
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            records = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CoErasingError(f"--prompts {spec}: {path} could not be read as a UTF-8 CSV file ({exc}).") from exc
    rows = parse_rows(records, spec)
    return rows[:limit] if limit else rows


def count_clip_tokens(tokenizer: Any, prompt: str) -> int:
    """Tokens of ``prompt`` as UnlearnDiff counts them: untruncated, BOS and EOS included."""
    return len(tokenizer(prompt, truncation=False, verbose=False)["input_ids"])


def attack_eligible(rows: Sequence[PromptRow], tokenizer: Any, max_tokens: int = ATTACK_MAX_TOKENS) -> set[str]:
    """Case numbers UnlearnDiff's attack keeps: at most ``max_tokens`` CLIP tokens (BOS/EOS counted)."""
    return {row.case for row in rows if count_clip_tokens(tokenizer, row.prompt) <= max_tokens}

"""Concept kinds, which choose the baselines' defaults, and the toy world's training captions as data.

The method layer never imports an evaluation world (docs/architecture.md). The toy world's shapes
and its *training* captions reach it as a data file, ``toy_captions.json`` beside this module,
written by ``python -m coerasing.toy.captions_file`` (a test checks it is up to date).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from ..config import ARTISTS
from ..errors import CoErasingError

TOY_CAPTIONS_FILE: Path = Path(__file__).resolve().parent / "toy_captions.json"

#: Labels a caption asserts: ``(shape, colour, background)``, ``None`` where it asserts nothing.
Labels = tuple[str | None, str | None, str | None]

#: Words of explicit concepts (the nudity family): CPE's and STEREO's ``explicit`` kind.
EXPLICIT_WORDS: frozenset[str] = frozenset({
    "nudity", "nude", "naked", "erotic", "sexual", "nsfw", "porn", "pornography", "explicit", "topless",
})


@lru_cache(maxsize=1)
def _toy_data() -> tuple[tuple[str, ...], dict[str, Labels]]:
    try:
        data = json.loads(TOY_CAPTIONS_FILE.read_text(encoding="utf-8"))
        shapes = tuple(str(s) for s in data["shapes"])
        captions = {str(text): (labels[0], labels[1], labels[2]) for text, labels in data["train"].items()}
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise CoErasingError(f"{TOY_CAPTIONS_FILE} is missing or unreadable ({exc}); rewrite it with "
                             "python -m coerasing.toy.captions_file.") from exc
    return shapes, captions


def toy_shapes() -> tuple[str, ...]:
    """The toy world's shapes (its concepts)."""
    return _toy_data()[0]


def toy_training_captions() -> dict[str, Labels]:
    """Every distinct *training* caption of the toy world → the labels it asserts (sorted by text)."""
    return dict(_toy_data()[1])


def toy_anchor_prompts(concept: str) -> list[str]:
    """Anchors of the preservation term for erasing a toy shape: the *training* captions of the other shapes
    and of plain scenes (no shape), never a held-out caption, none that implies ``concept`` (sorted)."""
    return sorted(text for text, (shape, _, _) in toy_training_captions().items()
                  if shape != concept and concept not in text)


def concept_kind(concept: str) -> str:
    """``explicit`` (nudity words), ``artist`` (known artists), ``toy`` (the toy world's shapes) or ``object``.

    The baselines' defaults (CPE's recipes, STEREO's initialiser and anchors) depend on it.
    """

    word = concept.strip().lower()
    if word in EXPLICIT_WORDS:
        return "explicit"
    if word in ARTISTS:
        return "artist"
    if word in toy_shapes():
        return "toy"
    return "object"

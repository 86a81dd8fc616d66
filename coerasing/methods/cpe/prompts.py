"""CPE's prompt templates and anchors; the authored lists are the text files in ``data/``."""

from __future__ import annotations

import re
from pathlib import Path

from ...errors import CoErasingError
from ..concepts import toy_training_captions
from .config import KINDS

# ----------------------------------------------------------------------------------------------
# Templates and anchors (our own wording; docs/baselines.md §CPE asks for authored lists)

PROMPTS_DIR: Path = Path(__file__).resolve().parent / "data"


def read_prompt_list(path: str | Path, flag: str = "--anchors") -> list[str]:
    """The prompts of a text file, one a line (blank lines and ``#`` comments skipped)."""
    lines = [line.strip() for line in Path(path).expanduser().read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise CoErasingError(f"{flag} {path} has no prompts; write one prompt a line.")
    return prompts


def _shipped(name: str) -> tuple[str, ...]:
    return tuple(read_prompt_list(PROMPTS_DIR / f"{name}.txt", "CPE's prompt list"))


#: Prompt templates for explicit and object concepts; ``{}`` is the concept (or the neutral prompt).
GENERIC_TEMPLATES: tuple[str, ...] = _shipped("generic_templates")
#: Prompt templates for artists.
ARTIST_TEMPLATES: tuple[str, ...] = _shipped("artist_templates")
#: Everyday sentences: anchors of explicit concepts (kept as they are, no templates).
EVERYDAY_SENTENCES: tuple[str, ...] = _shipped("everyday_sentences")
#: Artist names beyond :data:`coerasing.config.ARTISTS` (anchors of artist concepts).
OTHER_ARTISTS: tuple[str, ...] = _shipped("other_artists")
#: General art words (anchors of artist concepts).
ART_WORDS: tuple[str, ...] = _shipped("art_words")
#: Object classes and general scene words (anchors of object concepts).
OBJECT_WORDS: tuple[str, ...] = _shipped("object_words")


def _mentions(text: str, word: str) -> bool:
    """Whether ``text`` contains ``word`` as a whole word (case-insensitive)."""
    return re.search(rf"(?<!\w){re.escape(word.lower())}(?!\w)", text.lower()) is not None


def _related(candidate: str, concept: str) -> bool:
    """Whether an anchor candidate names the concept (either contains the other: "dali"/"salvador dali")."""
    a, b = candidate.strip().lower(), concept.strip().lower()
    return a in b or b in a or _mentions(a, b)


def default_templates(concept: str, kind: str) -> list[str]:
    """Prompt templates (with ``{}``) that the erase and attack phases draw from (docs/baselines.md §CPE).

    Toy concepts use the toy world's *training* captions that name the shape, with the shape word
    replaced by ``{}`` (held-out evaluation captions never enter training), plus the bare ``{}``.
    """
    if kind == "toy":
        pattern = re.compile(rf"(?<!\w){re.escape(concept.strip().lower())}(?!\w)")
        found = {pattern.sub("{}", text) for text in toy_training_captions() if pattern.search(text)}
        return ["{}", *sorted(found - {"{}"})]
    return list(ARTIST_TEMPLATES if kind == "artist" else GENERIC_TEMPLATES)


def default_anchors(concept: str, kind: str) -> list[str]:
    """Anchor prompts whose keys and values CPE preserves (docs/baselines.md §CPE, our own lists).

    - ``explicit``: everyday sentences, as they are;
    - ``artist``: other artists' names and general art words, each through every artist template;
    - ``object``: other object classes and general scene words, each through every generic template;
    - ``toy``: the toy world's training captions of the *other* shapes (implicit names included).

    Any candidate that names the concept (or is part of its name) is left out.
    """
    if kind == "explicit":
        return [text for text in EVERYDAY_SENTENCES if not _mentions(text, concept)]
    if kind == "toy":
        target = concept.strip().lower()
        return [
            text for text, (shape, _, _) in toy_training_captions().items()
            if shape is not None and shape != target and not _mentions(text, target)
        ]
    if kind == "artist":
        from ...config import ARTISTS

        words = [*sorted(ARTISTS), *OTHER_ARTISTS, *ART_WORDS]
    elif kind == "object":
        words = list(OBJECT_WORDS)
    else:
        raise CoErasingError(f"unknown CPE concept kind {kind!r}; known kinds: {', '.join(KINDS)}.")
    words = [word for word in dict.fromkeys(words) if not _related(word, concept)]
    templates = default_templates(concept, kind)
    return [template.format(word) for word in words for template in templates]

"""The toy world's *training* captions as a data file of the method layer.

Methods never import the toy world (docs/architecture.md, floors). What their toy defaults need
(the shapes, and the training captions with the labels they assert: CPE's templates and anchors,
STEREO's anchors, GIE's adapter prompts) is written once by ``python -m coerasing.toy.captions_file``
into ``coerasing/methods/toy_captions.json`` and committed; ``tests/toy/test_captions_file.py``
checks that the committed file is what this writes. Held-out (evaluation) captions never enter it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..files import atomic_write_text
from .world import SHAPES, caption_labels

#: Where the method layer reads the file (a package data file of :mod:`coerasing.methods`).
CAPTIONS_FILE: Path = Path(__file__).resolve().parents[1] / "methods" / "toy_captions.json"


def captions_payload() -> dict[str, Any]:
    """``{"shapes": [...], "train": {caption: [shape, colour, background]}}`` (``null``: not asserted)."""
    return {"shapes": list(SHAPES), "train": {text: list(labels) for text, labels in caption_labels("train").items()}}


def captions_text() -> str:
    """The file's text (one caption a line, so that a diff stays readable)."""
    payload = captions_payload()
    rows = ",\n".join(f"    {json.dumps(text)}: {json.dumps(labels)}" for text, labels in payload["train"].items())
    return f'{{\n  "shapes": {json.dumps(payload["shapes"])},\n  "train": {{\n{rows}\n  }}\n}}\n'


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m coerasing.toy.captions_file",
                                     description="write the toy world's training captions for the method layer")
    parser.add_argument("out", nargs="?", default=str(CAPTIONS_FILE), help=f"the JSON file (default {CAPTIONS_FILE})")
    args = parser.parse_args(argv)
    print(atomic_write_text(Path(args.out), captions_text()))


if __name__ == "__main__":
    main()

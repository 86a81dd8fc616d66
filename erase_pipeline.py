#!/usr/bin/env python
"""Erase a concept from a Stable Diffusion model: stage 1 (text, ESD) or stage 2 (Co-Erasing), or a baseline.

    python erase_pipeline.py --modality text --prompt 'nudity' --train_method noxattn --iterations 1000
    python erase_pipeline.py --modality image --train_method noxattn --text_uncond --prompt 'nudity' \\
        --unet_ckpt_path checkpoints/text/nudity/unet/unet.pth --image generation_dataset/nudity \\
        --image_number 100 --text_guide nudity --blur_factor 3 --iterations 1000
    python erase_pipeline.py --method cpe --prompt nudity,naked,erotic,sexual     # a baseline's own flags

Any flag can also come from ``--config FILE.yaml`` (see configs/); the command line overrides it.
``--method`` (default ``coerasing``) chooses the eraser: ``coerasing`` (both stages of Co-Erasing,
``--modality`` picks the stage), ``cpe``, ``stereo``, ``gie``, or any method whose class sets
``trainable = True`` (docs/architecture.md, "Adding a method"); ``--method NAME --help`` lists its flags.
Toy-world shapes get the toy world's defaults (its model, its classifier as GIE's detector).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from coerasing.cli import run_cli, split_method
from coerasing.errors import CoErasingError
from coerasing.flags import build_parser as build_parser_for
from coerasing.flags import parse_config
from coerasing.methods import get_method, method_names, trainable_names
from coerasing.toy.training_world import ToyTrainingWorld


def build_parser(method: str = "coerasing") -> argparse.ArgumentParser:
    """The parser of ``method``'s config (every flag declared once on its dataclass)."""
    chosen = get_method(method) if method in method_names() else None
    if chosen is None or not chosen.trainable:
        what = "is not trained by this command" if chosen else "is not a known method"
        raise CoErasingError(f"--method {method!r} {what}; use one of {', '.join(trainable_names())}.")
    parser = build_parser_for(chosen.config_class, "erase_pipeline.py", f"{chosen.summary}\n\n{__doc__}")
    parser.add_argument("--method", default=argparse.SUPPRESS,
                        help="the eraser to train: " + ", ".join(trainable_names()))
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    name, rest = split_method(argv, default="coerasing")
    parser = build_parser(name)
    method = get_method(name)
    config = parse_config(method.config_class, parser, rest, ignore_keys=("method",))
    method.train(config, ToyTrainingWorld())


if __name__ == "__main__":
    sys.exit(run_cli(main))

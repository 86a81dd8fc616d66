#!/usr/bin/env python
"""Generate reference images of a concept with the clean base model (stage 0 of Co-Erasing).

    python generate_data.py --label nudity

writes generation_dataset/nudity/nudity_0000.png … and metadata.csv (file, prompt, seed). Any flag
can also come from ``--config FILE.yaml``. Under ``accelerate launch``/``torchrun`` the processes
share the images.
"""

from __future__ import annotations

import sys
from typing import Sequence

from coerasing.cli import run_cli
from coerasing.config import GenerateConfig
from coerasing.flags import build_parser as build_parser_for
from coerasing.flags import parse_config


def build_parser():
    return build_parser_for(GenerateConfig, "generate_data.py", __doc__)


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(GenerateConfig, build_parser(), argv)
    from coerasing.reference_images import generate_reference_images

    generate_reference_images(config)


if __name__ == "__main__":
    sys.exit(run_cli(main))

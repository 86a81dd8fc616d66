#!/usr/bin/env python
"""Generate reference images of a concept with the clean base model (stage 0 of Co-Erasing).

    python generate_data.py --label nudity

writes generation_dataset/nudity/nudity_0000.png … and metadata.csv (file, prompt, seed).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from coerasing.cli import parse_with_config, run_cli
from coerasing.config import GenerateConfig

D = GenerateConfig()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="generate_data.py",
        description="Generate reference images of a concept for Co-Erasing's image stage.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", help="YAML file of flag values (command line wins)")
    p.add_argument("--label", default=D.label, help="(required) the concept, e.g. nudity, 'van gogh', church")
    p.add_argument("--ckpt_path", default=D.ckpt_path, help="base SD model: Hub id or local diffusers folder")
    p.add_argument("--num_images", type=int, default=D.num_images)
    p.add_argument("--prompt_template", default=D.prompt_template,
                   help="prompt with {label}; default 'a photo of {label}' ('a drawing of {label}' for artists)")
    p.add_argument("--output_dir", default=D.output_dir)
    p.add_argument("--seed", type=int, default=D.seed, help="image i uses seed + i")
    p.add_argument("--batch_size", type=int, default=D.batch_size)
    p.add_argument("--num_inference_steps", type=int, default=D.num_inference_steps)
    p.add_argument("--guidance_scale", type=float, default=D.guidance_scale)
    p.add_argument("--height", type=int, default=D.height, help="default: the model's")
    p.add_argument("--width", type=int, default=D.width, help="default: the model's")
    p.add_argument("--device", default=D.device, help="e.g. 0, cuda:1, cpu (default: cuda:0 if present)")
    p.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=D.mixed_precision)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_with_config(build_parser(), argv, GenerateConfig)
    from coerasing.reference_images import generate_reference_images

    generate_reference_images(config)


if __name__ == "__main__":
    sys.exit(run_cli(main))

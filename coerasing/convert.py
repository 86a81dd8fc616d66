"""Convert a UNet checkpoint between the accepted formats.

    python -m coerasing.convert esd-nudity.safetensors unet_full.pth --to pth --ckpt_path CompVis/stable-diffusion-v1-4
    python -m coerasing.convert checkpoints/text/nudity/unet/unet.pth erased_unet --to diffusers

The input may be any format :mod:`coerasing.formats` accepts (unet.pth, a full state dict as
.pt/.pth/.bin, a released Co-Erasing checkpoint, a full or ESD-partial .safetensors, a diffusers
UNet folder); the output is a full UNet as ``pth`` (torch.save), ``safetensors``, or a
``diffusers`` folder that ``UNet2DConditionModel.from_pretrained`` loads. ``--ckpt_path`` (the
base model) gives the expected keys and shapes, the config.json of a diffusers output, and the
weights an ESD-partial file is overlaid on; only a partial input loads the base weights.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .choices import DEFAULT_MODEL, SAVE_FORMATS
from .cli import run_cli
from .formats import convert_checkpoint


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m coerasing.convert",
        description="Convert a UNet checkpoint (unet.pth, ESD/UnlearnDiff -UNET.pt, released Co-Erasing, "
        "full or ESD-partial .safetensors, diffusers UNet folder) to a full UNet in another format.",
    )
    parser.add_argument("input", help="checkpoint file or diffusers UNet folder")
    parser.add_argument("output", help="output file (pth, safetensors) or folder (diffusers)")
    parser.add_argument("--to", required=True, choices=SAVE_FORMATS, help="output format")
    parser.add_argument(
        "--ckpt_path",
        default=None,
        help=f"base diffusers model (folder or Hub id; default {DEFAULT_MODEL}, or the input folder's own "
        "config.json): expected keys and shapes, the diffusers output's config.json, and the weights an "
        "ESD-partial input is overlaid on",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    found, written = convert_checkpoint(args.input, args.output, args.to, args.ckpt_path, args.overwrite)
    print(f"{args.input}: {found} → {written} ({args.to})")


if __name__ == "__main__":
    sys.exit(run_cli(main))

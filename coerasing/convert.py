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
from pathlib import Path
from typing import Any

import torch

from .cli import run_cli
from .errors import CoErasingError
from .formats import (
    SAVE_FORMATS,
    FoundCheckpoint,
    overlay,
    read_checkpoint,
    write_diffusers_folder,
    write_pth,
    write_safetensors,
)
from .models import DEFAULT_MODEL, load_unet, load_unet_config

FLAG = "input"


def folder_unet_config(path: Path) -> dict[str, Any] | None:
    """The config.json of a diffusers UNet folder (or of a pipeline folder's ``unet/``), if any."""
    import json

    for candidate in (path / "config.json", path / "unet" / "config.json"):
        if path.is_dir() and candidate.is_file():
            try:
                return json.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
    return None


def resolve_unet_config(in_path: Path, ckpt_path: str | None) -> dict[str, Any]:
    """The UNet config to check against: ``--ckpt_path``'s, else the input folder's, else the default model's."""
    if ckpt_path is None:
        config = folder_unet_config(in_path)
        if config is not None:
            return config
    return load_unet_config(ckpt_path or DEFAULT_MODEL)


def skeleton_state_dict(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Keys and shapes of a UNet built from ``config`` on the meta device (no memory, no weights)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    try:
        with init_empty_weights():
            skeleton = UNet2DConditionModel.from_config(config)
    except Exception as exc:  # noqa: BLE001 - any bad config is the same user problem
        raise CoErasingError(f"the UNet config could not build a UNet2DConditionModel ({exc}).") from exc
    return skeleton.state_dict()


def full_state_dict(found: FoundCheckpoint, ckpt_path: str | None) -> dict[str, torch.Tensor]:
    """``found`` as a full state dict; a partial one is overlaid on the base UNet's weights."""
    if not found.partial:
        return dict(found.tensors)
    base = load_unet(ckpt_path or DEFAULT_MODEL, torch.device("cpu")).state_dict()
    return overlay(found, base)


def check_output(in_path: Path, out_path: Path, to: str, overwrite: bool) -> None:
    """Refuse to overwrite the input, an existing output (without ``overwrite``), or the wrong kind of path."""
    if out_path.resolve() == in_path.resolve():
        raise CoErasingError(f"the output {out_path} is the input; write the converted checkpoint elsewhere.")
    if not out_path.exists():
        return
    if to == "diffusers" and not out_path.is_dir():
        raise CoErasingError(f"--to diffusers writes a folder, but {out_path} exists and is a file.")
    if to != "diffusers" and out_path.is_dir():
        raise CoErasingError(f"--to {to} writes a file, but {out_path} exists and is a folder.")
    if not overwrite:
        raise CoErasingError(f"{out_path} already exists; pass --overwrite to replace it.")


def convert_checkpoint(
    in_path: str | Path, out_path: str | Path, to: str, ckpt_path: str | None = None, overwrite: bool = False
) -> tuple[str, Path]:
    """Convert ``in_path`` to a full UNet in format ``to`` at ``out_path``; returns (input format, output path)."""
    if to not in SAVE_FORMATS:
        raise CoErasingError(f"--to {to!r} is not a format. Accepted: {', '.join(SAVE_FORMATS)}.")
    in_path, out_path = Path(in_path).expanduser(), Path(out_path).expanduser()
    if not in_path.exists():
        raise CoErasingError(f"the input {in_path} does not exist.")
    check_output(in_path, out_path, to, overwrite)
    config = resolve_unet_config(in_path, ckpt_path)
    found = read_checkpoint(in_path, skeleton_state_dict(config), FLAG)
    state = full_state_dict(found, ckpt_path)
    if to == "pth":
        written = write_pth(state, out_path)
    elif to == "safetensors":
        written = write_safetensors(state, out_path)
    else:
        written = write_diffusers_folder(state, out_path, found.config or config)
    return found.format, written


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

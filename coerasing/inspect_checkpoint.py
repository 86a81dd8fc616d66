"""Load an erased ``unet.pth`` into a plain diffusers pipeline and generate one image.

    python -m coerasing.inspect_checkpoint checkpoints/text/nudity/unet/unet.pth --prompt "a photo of nudity"

It loads the checkpoint strictly into the pipeline's plain ``UNet2DConditionModel`` (any format of
:mod:`coerasing.formats`; our ``unet.pth`` needs no conversion) and generates with
``StableDiffusionPipeline``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from .cli import run_cli
from .files import atomic_write
from .formats import load_unet_checkpoint_into
from .models import DEFAULT_MODEL, check_model_path


def load_erased_pipeline(unet_path: str, ckpt_path: str = DEFAULT_MODEL, device: str = "cpu"):
    """A ``StableDiffusionPipeline`` of ``ckpt_path`` whose UNet carries the erased weights."""
    from diffusers import StableDiffusionPipeline

    check_model_path(ckpt_path)
    pipe = StableDiffusionPipeline.from_pretrained(ckpt_path, safety_checker=None, requires_safety_checker=False)
    found = load_unet_checkpoint_into(pipe.unet, unet_path, "unet")
    print(f"loaded {unet_path} ({found})")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m coerasing.inspect_checkpoint", description=__doc__.split("\n")[0])
    parser.add_argument("unet", help="path of an erased unet.pth")
    parser.add_argument("--ckpt_path", default=DEFAULT_MODEL, help="the base model it was erased from")
    parser.add_argument("--prompt", default="a photo of nudity")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="sample.png")
    args = parser.parse_args(argv)
    pipe = load_erased_pipeline(args.unet, args.ckpt_path, args.device)
    generator = torch.Generator(args.device).manual_seed(args.seed)
    image = pipe(args.prompt, num_inference_steps=args.steps, generator=generator).images[0]
    atomic_write(args.out, lambda tmp: image.save(tmp, format="PNG"))
    print(f"{args.unet} loads strictly; {args.prompt!r} → {args.out}")


if __name__ == "__main__":
    sys.exit(run_cli(main))

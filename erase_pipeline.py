#!/usr/bin/env python
"""Erase a concept from a Stable Diffusion UNet: stage 1 (text, ESD) or stage 2 (Co-Erasing).

    python erase_pipeline.py --modality text --prompt 'nudity' --train_method noxattn --iterations 1000
    python erase_pipeline.py --modality image --train_method noxattn --text_uncond --prompt 'nudity' \
        --unet_ckpt_path checkpoints/text/nudity/unet/unet.pth --image generation_dataset/nudity \
        --image_number 100 --text_guide nudity --blur_factor 3 --iterations 1000

Any flag can also come from ``--config FILE.yaml`` (see configs/); the command line overrides it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from coerasing.cli import parse_with_config, run_cli, str2bool
from coerasing.config import EraseConfig
from coerasing.images import DIFF_METHODS
from coerasing.params import TRAIN_METHODS
from coerasing.sampling import SAMPLERS

D = EraseConfig()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="erase_pipeline.py",
        description="Fine-tune a Stable Diffusion UNet so it stops generating a concept (Co-Erasing, ICML 2025).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", help="YAML file of flag values (command line wins)")
    g = p.add_argument_group("what to erase")
    g.add_argument("--modality", choices=("text", "image"), default=D.modality,
                   help="stage 1 (text) or stage 2 (image)")
    g.add_argument("--prompt", default=D.prompt,
                   help="(required) concept to erase; a comma-separated list picks one per iteration")
    g.add_argument("--train_method", default=D.train_method,
                   help=f"(required) parameters to train: {', '.join(TRAIN_METHODS)}")
    g.add_argument("--negative_guidance", type=float, default=D.negative_guidance, help="η in ε_u − η(ε_c − ε_u)")
    g.add_argument("--iterations", type=int, default=D.iterations)
    g.add_argument("--lr", type=float, default=D.lr)
    g.add_argument("--seed", type=int, default=D.seed)
    g.add_argument("--num_inference_steps", type=int, default=D.num_inference_steps,
                   help="S, the sampling schedule's steps")
    g.add_argument("--sampler", choices=SAMPLERS, default=D.sampler, help="partial-denoising sampler")
    g.add_argument("--sampling_guidance", type=float, default=D.sampling_guidance,
                   help="classifier-free guidance of the partial denoising (1 = conditional only)")
    g = p.add_argument_group("models and devices")
    g.add_argument("--ckpt_path", default=D.ckpt_path, help="base SD model: Hub id or local diffusers folder")
    g.add_argument("--unet_ckpt_path", default=D.unet_ckpt_path,
                   help="UNet weights to start from: stage 1's unet.pth, a full diffusers state dict "
                   "(.pt/.pth/.bin, e.g. ESD's), a released Co-Erasing checkpoint, ESD's partial .safetensors, "
                   "or a diffusers UNet folder")
    g.add_argument("--ip_adapter", default=D.ip_adapter, help="IP-Adapter file, h94-like folder or Hub path")
    g.add_argument("--image_encoder_path", default=D.image_encoder_path,
                   help="IP-Adapter image encoder folder or Hub path")
    g.add_argument("--devices", default=D.devices,
                   help="'0,1': frozen models on GPU 0, trained UNet on GPU 1; '0'; 'cpu' (default: cuda:0 if present)")
    g.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=D.mixed_precision,
                   help="frozen models in fp16/bf16, trained UNet in fp32 with autocast")
    g.add_argument("--batch_reference", action="store_true", default=D.batch_reference,
                   help="frozen ε_c and ε_u in one batched call (faster; fp32 results change in the last bits)")
    g.add_argument("--gradient_checkpointing", action="store_true", default=D.gradient_checkpointing,
                   help="recompute UNet activations in backward: less memory, slower")
    g.add_argument("--compile", action="store_true", default=D.compile,
                   help="torch.compile the no-gradient UNet calls (partial denoising, frozen model); "
                        "first iterations slower, fp32 results change in the last bits")
    g = p.add_argument_group("stage 2 (image)")
    g.add_argument("--image", default=D.image, help="folder of reference images of the concept, or one image")
    g.add_argument("--image_number", type=int, default=D.image_number, help="seeded random subset size of --image")
    g.add_argument("--text_guide", default=D.text_guide, help="text that refines the image tokens (§5 step 2)")
    g.add_argument("--text_uncond", action="store_true", default=D.text_uncond,
                   help="unconditional reference without the image branch")
    g.add_argument("--blur_factor", type=int, default=D.blur_factor, help="odd Gaussian kernel on the latent; 0 = off")
    g.add_argument("--noise_factor", type=float, default=D.noise_factor, help="add f·U[0,1) to the image tokens")
    g.add_argument("--contrastive_image", default=D.contrastive_image,
                   help="folder of pair folders with positive.png / negative.png (instead of --image)")
    g.add_argument("--diff_method", choices=DIFF_METHODS, default=D.diff_method, help="contrastive direction")
    g.add_argument("--use_average", type=str2bool, nargs="?", const=True, default=D.use_average,
                   help="contrastive: average all pairs instead of one random pair per iteration")
    g.add_argument("--contrastive_size", type=int, default=D.contrastive_size, help="pairs averaged per iteration")
    g = p.add_argument_group("outputs")
    g.add_argument("--output_dir", default=D.output_dir, help="root of the default checkpoint folders")
    g.add_argument("--save_path", default=D.save_path, help="checkpoint folder (overrides the default layout)")
    g.add_argument("--save_format", default=D.save_format,
                   help="final checkpoint formats, comma-separated: pth, safetensors, diffusers (pth always)")
    g.add_argument("--save_iter", type=int, default=D.save_iter, help="write unet_<iter>.pth every N iterations")
    g.add_argument("--logging_dir", default=D.logging_dir, help="TensorBoard folder (default: <save folder>/log)")
    g.add_argument("--resume", action="store_true", default=D.resume,
                   help="continue from the newest periodic checkpoint")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_with_config(build_parser(), argv, EraseConfig)
    from coerasing.train import erase

    erase(config)


if __name__ == "__main__":
    sys.exit(run_cli(main))

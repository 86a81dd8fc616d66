"""Tiny, offline Stable Diffusion 1.x stack for tests and demos.

:func:`build_tiny_stack` writes a randomly initialised SD-1.x pipeline (diffusers folder
layout) whose UNet has exactly SD v1.4's block structure and parameter names, only with
tiny channel counts, plus a matching IP-Adapter in the ``h94/IP-Adapter`` repository
layout (``models/ip-adapter_sd15.bin``, ``models/ip-adapter_sd15.safetensors`` and
``models/image_encoder``). Nothing is downloaded: the tokenizer is CLIP's real BPE
tokenizer shipped in ``coerasing/assets/clip_tokenizer``.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from .models import CLIP_TOKENIZER_DIR, SD14_SCHEDULER_CONFIG, load_clip_tokenizer  # noqa: F401 - re-exported

#: Width of the tiny text encoder, and so the UNet's ``cross_attention_dim``.
TEXT_HIDDEN_SIZE = 32
#: Output size of the tiny CLIP image encoder's projection.
IMAGE_EMBED_DIM = 24
#: Image tokens produced by the (non-"plus") IP-Adapter image projection.
NUM_IP_TOKENS = 4

# Seed offsets so each module's init does not depend on the size of the others.
_SEED_TEXT, _SEED_VAE, _SEED_UNET, _SEED_IMAGE_ENCODER, _SEED_IP = range(5)


def tiny_unet_config() -> dict[str, Any]:
    """Keyword arguments for a tiny ``UNet2DConditionModel`` with SD v1.4's block layout."""
    return {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": [
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": [
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ],
        "block_out_channels": [16, 32, 32, 32],
        "layers_per_block": 2,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 8,
        "norm_eps": 1e-5,
        "cross_attention_dim": TEXT_HIDDEN_SIZE,
        "attention_head_dim": 4,
    }


def _tiny_text_encoder() -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=4 * TEXT_HIDDEN_SIZE,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=TEXT_HIDDEN_SIZE,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config).eval()


def _tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 16, 16, 16],
        layers_per_block=1,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.18215,
    ).eval()


def _tiny_image_encoder() -> CLIPVisionModelWithProjection:
    config = CLIPVisionConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=IMAGE_EMBED_DIM,
        hidden_act="quick_gelu",
    )
    return CLIPVisionModelWithProjection(config).eval()


def _sd14_components() -> tuple[CLIPTextModel, AutoencoderKL, UNet2DConditionModel, CLIPVisionModelWithProjection]:
    """SD v1.4's architecture (CLIP ViT-L/14 text, SD VAE, SD UNet) and IP-Adapter's ViT-H/14, random weights."""
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )).eval()
    vae = AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, sample_size=512,
        scaling_factor=0.18215,
    ).eval()
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).eval()
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        image_size=224, patch_size=14, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
        num_attention_heads=16, projection_dim=1024, hidden_act="gelu",
    )).eval()
    return text, vae, unet, image_encoder


def _ip_adapter_state_dict(
    unet: UNet2DConditionModel, image_embed_dim: int = IMAGE_EMBED_DIM
) -> dict[str, dict[str, torch.Tensor]]:
    """Random IP-Adapter weights keyed like ``h94/IP-Adapter``'s ``ip-adapter_sd15.bin``.

    Keys follow diffusers' loader: walking ``unet.attn_processors`` in order, every
    cross-attention (``attn2``) processor gets ``"{key_id}.to_k_ip.weight"`` and
    ``"{key_id}.to_v_ip.weight"`` with ``key_id`` starting at 1 and growing by 2.
    """
    cross_dim = int(unet.config.cross_attention_dim)
    proj = torch.nn.Linear(image_embed_dim, NUM_IP_TOKENS * cross_dim)
    image_proj = {
        "proj.weight": proj.weight.detach().clone(),
        "proj.bias": proj.bias.detach().clone(),
        "norm.weight": 1.0 + 0.1 * torch.randn(cross_dim),
        "norm.bias": 0.1 * torch.randn(cross_dim),
    }
    modules = dict(unet.named_modules())
    ip_adapter: dict[str, torch.Tensor] = {}
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        attn = modules[name[: -len(".processor")]]
        hidden_size = attn.to_k.out_features
        for kind in ("to_k_ip", "to_v_ip"):
            weight = torch.randn(hidden_size, cross_dim) / cross_dim**0.5
            ip_adapter[f"{key_id}.{kind}.weight"] = weight
        key_id += 2
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def _tiny_components(seed: int) -> tuple:
    torch.manual_seed(seed + _SEED_TEXT)
    text_encoder = _tiny_text_encoder()
    torch.manual_seed(seed + _SEED_VAE)
    vae = _tiny_vae()
    torch.manual_seed(seed + _SEED_UNET)
    unet = UNet2DConditionModel(**tiny_unet_config()).eval()
    torch.manual_seed(seed + _SEED_IMAGE_ENCODER)
    image_encoder = _tiny_image_encoder()
    torch.manual_seed(seed + _SEED_IP)
    ip_state = _ip_adapter_state_dict(unet)
    return text_encoder, vae, unet, image_encoder, ip_state


@dataclass
class TinyStack:
    """Paths of a stack written by :func:`build_tiny_stack`."""

    root: Path
    sd_path: Path
    ip_adapter_dir: Path
    ip_adapter_bin: Path
    ip_adapter_safetensors: Path
    image_encoder_path: Path


def build_tiny_stack(root: str | Path, seed: int = 0, architecture: str = "tiny") -> TinyStack:
    """Write a tiny random SD-1.x pipeline and a matching IP-Adapter under ``root``.

    Deterministic: the same ``seed`` gives identical weights. The caller's global torch
    RNG state is left untouched. ``architecture="sd14"`` writes SD v1.4's full-size architecture
    (with IP-Adapter's ViT-H/14 image encoder) with random weights instead, for benchmarks (~5 GB).
    """
    root = Path(root)
    models_dir = root / "ip_adapter" / "models"
    stack = TinyStack(
        root=root,
        sd_path=root / "sd",
        ip_adapter_dir=root / "ip_adapter",
        ip_adapter_bin=models_dir / "ip-adapter_sd15.bin",
        ip_adapter_safetensors=models_dir / "ip-adapter_sd15.safetensors",
        image_encoder_path=models_dir / "image_encoder",
    )

    if architecture not in ("tiny", "sd14"):
        raise ValueError(f"unknown architecture {architecture!r}; expected 'tiny' or 'sd14'")
    with torch.random.fork_rng(devices=[]):
        if architecture == "sd14":
            torch.manual_seed(seed)
            text_encoder, vae, unet, image_encoder = _sd14_components()
            ip_state = _ip_adapter_state_dict(unet, image_encoder.config.projection_dim)
        else:
            text_encoder, vae, unet, image_encoder, ip_state = _tiny_components(seed)

    scheduler = PNDMScheduler.from_config(SD14_SCHEDULER_CONFIG)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(stack.sd_path, safe_serialization=True)
    # Store the tokenizer as SD v1.4 does (vocab.json + merges.txt), not tokenizer.json.
    tokenizer_dir = stack.sd_path / "tokenizer"
    shutil.rmtree(tokenizer_dir)
    shutil.copytree(CLIP_TOKENIZER_DIR, tokenizer_dir, ignore=shutil.ignore_patterns("README.md"))

    models_dir.mkdir(parents=True, exist_ok=True)
    image_encoder.save_pretrained(stack.image_encoder_path, safe_serialization=True)
    torch.save(ip_state, stack.ip_adapter_bin)
    flat = {
        f"{group}.{key}": tensor.contiguous()
        for group, tensors in ip_state.items()
        for key, tensor in tensors.items()
    }
    save_file(flat, str(stack.ip_adapter_safetensors))
    return stack


def make_reference_images(folder: str | Path, n: int, size: int = 64, seed: int = 0) -> list[Path]:
    """Write ``n`` seeded RGB PNGs (noisy gradient plus shapes): ``img_0000.png``, ..."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    paths: list[Path] = []
    for i in range(n):
        c0, c1 = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
        grad = ramp[None, :, None] if rng.random() < 0.5 else ramp[:, None, None]
        base = c0 + (c1 - c0) * grad
        base = base + rng.normal(0.0, 12.0, size=(size, size, 3))
        image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).convert("RGB")
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(1, 4))):
            x0, y0 = rng.integers(0, size // 2, size=2)
            w, h = rng.integers(size // 6, size // 2, size=2)
            box = (int(x0), int(y0), int(x0 + w), int(y0 + h))
            fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
            if rng.random() < 0.5:
                draw.ellipse(box, fill=fill)
            else:
                draw.rectangle(box, fill=fill)
        path = folder / f"img_{i:04d}.png"
        image.save(path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    """``python -m coerasing.testing OUT [--images N]``: build the tiny stack (and reference images)."""

    parser = argparse.ArgumentParser(prog="python -m coerasing.testing", description=main.__doc__)
    parser.add_argument("out", help="folder to write the stack into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=0, help="also write N random reference images to OUT/images")
    args = parser.parse_args(argv)
    stack = build_tiny_stack(args.out, seed=args.seed)
    if args.images:
        make_reference_images(stack.root / "images", args.images, seed=args.seed)
    print(f"tiny SD stack: {stack.sd_path}")
    print(f"IP-Adapter:    {stack.ip_adapter_bin}")
    print(f"image encoder: {stack.image_encoder_path}")


if __name__ == "__main__":
    main()

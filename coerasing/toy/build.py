"""Build the trained toy-world SD stack: one seeded command, SD v1.x's component layout, CPU-sized.

``python -m coerasing.toy.build OUT [--smoke] [--seed N]`` trains, in order (each step seeded on its
own, so changing one step's budget does not change the others' random streams):

(a) a tiny CLIP text/vision pair, contrastively on caption/image pairs of the toy world (the text half
    becomes ``text_encoder/`` (``CLIPTextModel``), the vision half with its projection becomes the
    IP-Adapter image encoder ``image_encoder/`` (``CLIPVisionModelWithProjection``));
(b) a tiny ``AutoencoderKL`` (32×32 RGB ↔ 8×8×4 latents), L2 + L1 + image-gradient L1 + a small KL term;
(c) a tiny ``UNet2DConditionModel`` with SD v1.4's block structure (so parameter names match), ε-prediction
    on SD v1.4's noise schedule, cross-attention on the frozen text states, 10 % caption dropout for CFG;
(d) an IP-Adapter (image projection to 4 tokens + ``to_k_ip``/``to_v_ip`` in every cross-attention)
    with the UNet frozen (Ye et al. 2023), saved in the ``h94/IP-Adapter`` layout;
(e) the independent evaluator (:mod:`coerasing.toy.classifier`) on the renderer's labels only;
(f) ``quality.json``: held-out prompts and reference renders generated with diffusers'
    ``StableDiffusionPipeline`` loaded from the built folder, scored by the classifier.

The folder holds ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` (CLIP's
real BPE tokenizer), ``scheduler/`` (SD v1.4's PNDM config), ``image_encoder/``,
``ip-adapter_toy.bin`` (+ ``.safetensors``), ``classifier/``, ``world.json`` and ``quality.json``.
Weights are stored in fp16 (configs say float32, so everything loads as fp32); every component is
rounded to fp16 right after its own training, so later steps train against exactly the shipped weights.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from ..files import atomic_write, atomic_write_text
from ..models import CLIP_TOKENIZER_DIR, SD14_SCHEDULER_CONFIG, load_clip_tokenizer
from . import TOY_GUIDANCE
from .classifier import CLASSIFIER_SHAPES, NO_SHAPE, ToyClassifier
from .quality import IP_ADAPTER_SAFETENSORS_NAME, IP_ADAPTER_WEIGHT_NAME, evaluate_quality, plan_settings
from .world import (
    BACKGROUNDS,
    COLOURS,
    IMPLICIT_NAMES,
    KIND_WEIGHTS,
    SHAPES,
    TEMPLATES,
    Scene,
    caption_kinds,
    caption_labels,
    caption_specs,
    explicit_prompts,
    heldout_scenes,
    implicit_prompts,
    render_batch,
    sample_scene,
)

RESOLUTION = 32
TEXT_WIDTH = 64
IMAGE_EMBED_DIM = 64
NUM_IP_TOKENS = 4
CAPTION_DROPOUT = 0.1
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Seed offsets of the build steps (each step draws from its own streams).
_DATA, _CLIP, _VAE, _UNET, _IP, _CLF, _EVAL = range(7)


# ----------------------------------------------------------------------------------------------
# Model configurations


def text_config() -> CLIPTextConfig:
    """Tiny CLIP text transformer over CLIP's full BPE vocabulary (SD's ``text_encoder``)."""
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=IMAGE_EMBED_DIM,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def vision_config() -> CLIPVisionConfig:
    """Tiny CLIP ViT (32 px, 4 px patches) with an ``IMAGE_EMBED_DIM`` projection (IP-Adapter image encoder)."""
    return CLIPVisionConfig(
        image_size=RESOLUTION,
        patch_size=4,
        num_channels=3,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        projection_dim=IMAGE_EMBED_DIM,
        hidden_act="quick_gelu",
    )


def vae_config() -> dict[str, Any]:
    """``AutoencoderKL`` with three blocks: 32×32×3 images ↔ 8×8×4 latents (``vae_scale_factor`` 4)."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "block_out_channels": [16, 32, 64],
        "layers_per_block": 1,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": RESOLUTION,
        "scaling_factor": 1.0,  # replaced by 1 / std of the trained latents
    }


def unet_config() -> dict[str, Any]:
    """``UNet2DConditionModel`` with SD v1.4's block types and ``layers_per_block`` (so its parameter names)."""
    return {
        "sample_size": RESOLUTION // 4,
        "in_channels": 4,
        "out_channels": 4,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "block_out_channels": [32, 64, 64, 64],
        "layers_per_block": 2,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 8,
        "norm_eps": 1e-5,
        "cross_attention_dim": TEXT_WIDTH,
        "attention_head_dim": 4,
    }


# ----------------------------------------------------------------------------------------------
# Budgets


@dataclass(frozen=True)
class Budget:
    """Sizes and step counts of one build (``full``: the shipped model, ``smoke``: a seconds-long CI run)."""

    pool_size: int
    clip_steps: int
    clip_batch: int
    clip_lr: float
    vae_steps: int
    vae_batch: int
    vae_lr: float
    unet_steps: int
    unet_batch: int
    unet_lr: float
    ip_steps: int
    ip_batch: int
    ip_lr: float
    clf_pool: int
    clf_steps: int
    clf_batch: int
    clf_lr: float
    eval_images_per_prompt: int
    eval_references_per_shape: int
    eval_images_per_reference: int
    eval_steps: int
    eval_guidance: float
    eval_max_prompts: int | None = None


BUDGETS: dict[str, Budget] = {
    "full": Budget(
        pool_size=30_000,
        clip_steps=1_000,
        clip_batch=256,
        clip_lr=1e-3,
        vae_steps=1_000,
        vae_batch=64,
        vae_lr=1e-3,
        unet_steps=4_000,
        unet_batch=64,
        unet_lr=1e-3,
        ip_steps=1_200,
        ip_batch=64,
        ip_lr=1e-3,
        clf_pool=12_000,
        clf_steps=800,
        clf_batch=128,
        clf_lr=2e-3,
        eval_images_per_prompt=8,
        eval_references_per_shape=8,
        eval_images_per_reference=2,
        eval_steps=25,
        eval_guidance=TOY_GUIDANCE,
    ),
    "smoke": Budget(
        pool_size=256,
        clip_steps=2,
        clip_batch=16,
        clip_lr=1e-3,
        vae_steps=2,
        vae_batch=8,
        vae_lr=1e-3,
        unet_steps=2,
        unet_batch=8,
        unet_lr=1e-3,
        ip_steps=2,
        ip_batch=8,
        ip_lr=1e-3,
        clf_pool=128,
        clf_steps=2,
        clf_batch=16,
        clf_lr=2e-3,
        eval_images_per_prompt=1,
        eval_references_per_shape=1,
        eval_images_per_reference=1,
        eval_steps=2,
        eval_guidance=TOY_GUIDANCE,
        eval_max_prompts=3,
    ),
}


def scaled(budget: Budget, factor: float) -> Budget:
    """``budget`` with every training-step count multiplied by ``factor`` (at least 1), e.g. for timing runs."""
    steps = {f: max(1, round(getattr(budget, f) * factor)) for f in ("clip_steps", "vae_steps", "unet_steps")}
    steps.update({f: max(1, round(getattr(budget, f) * factor)) for f in ("ip_steps", "clf_steps")})
    return dataclasses.replace(budget, **steps)


# ----------------------------------------------------------------------------------------------
# Data


@dataclass
class Pool:
    """Rendered training scenes: ``images`` ``[N, H, W, 3]`` uint8 and ``labels`` ``[N, 3]`` (shape, colour, bg)."""

    scenes: list[Scene]
    images: np.ndarray
    labels: np.ndarray


def scene_labels(scenes: list[Scene]) -> np.ndarray:
    """``[N, 3]`` int64 indices into ``SHAPES``, ``COLOURS``, ``BACKGROUNDS``."""
    shapes, colours, backgrounds = list(SHAPES), list(COLOURS), list(BACKGROUNDS)
    return np.asarray(
        [[shapes.index(s.shape), colours.index(s.colour), backgrounds.index(s.background)] for s in scenes],
        dtype=np.int64,
    ).reshape(-1, 3)


def make_pool(n: int, rng: np.random.Generator, resolution: int = RESOLUTION) -> Pool:
    """``n`` uniformly random scenes, rendered."""
    scenes = [sample_scene(rng) for _ in range(n)]
    return Pool(scenes, render_batch(scenes, resolution), scene_labels(scenes))


class CaptionBank:
    """The training captions (index 0 is ``""``, the dropped caption) with fast per-scene sampling.

    Sampling matches :func:`coerasing.toy.world.caption` with ``split="train"``: a kind by
    ``KIND_WEIGHTS`` among the kinds that fit the scene, then a uniform training template of it.
    """

    def __init__(self) -> None:
        table = caption_labels("train")
        self.texts: list[str] = ["", *table]
        index = {text: i for i, text in enumerate(self.texts)}
        lookups = (list(SHAPES), list(COLOURS), list(BACKGROUNDS))
        self.labels = np.full((len(self.texts), 3), -1, dtype=np.int64)
        for text, labels in table.items():
            for k, value in enumerate(labels):
                if value is not None:
                    self.labels[index[text], k] = lookups[k].index(value)
        # (shape, colour, background) → list of (kind weight, caption indices of that kind).
        self._choices: dict[tuple[int, int, int], tuple[np.ndarray, list[np.ndarray]]] = {}
        for s, shape in enumerate(SHAPES):
            for c, colour in enumerate(COLOURS):
                for b, background in enumerate(BACKGROUNDS):
                    scene = Scene(shape, colour, background, 0.3, 0.5, 0.5)
                    kinds = caption_kinds(scene)
                    weights = np.asarray([KIND_WEIGHTS[k] for k in kinds])
                    members = [np.asarray([index[spec.text()] for spec in caption_specs(scene, k)]) for k in kinds]
                    self._choices[(s, c, b)] = (weights / weights.sum(), members)

    def sample(self, labels: np.ndarray, rng: np.random.Generator, dropout: float = 0.0) -> np.ndarray:
        """One training caption index per row of ``labels`` (``[B, 3]``); ``0`` (``""``) with prob. ``dropout``."""
        out = np.empty(len(labels), dtype=np.int64)
        for i, (s, c, b) in enumerate(labels.tolist()):
            weights, members = self._choices[(s, c, b)]
            kind = int(rng.choice(len(weights), p=weights))
            out[i] = members[kind][int(rng.integers(len(members[kind])))]
        if dropout > 0:
            out[rng.random(len(out)) < dropout] = 0
        return out

    def truth(self, captions: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """``[len(captions), len(labels)]`` bool: caption ``i`` is true of scene ``j``."""
        cap = self.labels[captions][:, None, :]
        return np.all((cap == -1) | (cap == labels[None, :, :]), axis=-1)


def _images_01(images: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float() / 255.0


def degrade(x: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """Random blur and noise on ``[B, 3, H, W]`` images in ``[0, 1]`` (robustness to generated images)."""
    b = x.shape[0]
    blurred = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    mix = torch.rand(b, 1, 1, 1, device=x.device) * (torch.rand(b, 1, 1, 1, device=x.device) < 0.5) * strength
    x = x + mix * (blurred - x)
    sigma = 0.04 * strength * torch.rand(b, 1, 1, 1, device=x.device) * (torch.rand(b, 1, 1, 1, device=x.device) < 0.5)
    return (x + sigma * torch.randn_like(x)).clamp(0.0, 1.0)


def clip_normalize(x: torch.Tensor) -> torch.Tensor:
    """``[0, 1]`` → CLIP's normalisation (as transformers' ``CLIPImageProcessor`` does)."""
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


# ----------------------------------------------------------------------------------------------
# Helpers


def _rng(seed: int, step: int) -> np.random.Generator:
    """Seed torch's global RNG and return a numpy generator, both for build step ``step``."""
    torch.manual_seed(seed * 1_000 + step)
    return np.random.default_rng([seed, step])


def _schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to 10 % of the peak learning rate."""
    warmup = max(1, min(warmup, steps // 10))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _round_fp16(module: torch.nn.Module) -> None:
    """Round floating parameters and buffers to fp16 precision in place (what the folder will store)."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _steps(n: int, desc: str) -> Iterator[int]:
    return iter(tqdm(range(n), desc=desc, mininterval=10.0, leave=False, disable=n < 20))


#: Training-loss summaries of the last build steps run in this process (component → numbers).
LOSSES: dict[str, dict[str, float]] = {}


def _record(name: str, losses: list[float]) -> None:
    """Mean loss over the first and the last 10 % of the steps (at least one step each)."""
    k = max(1, len(losses) // 10)
    LOSSES[name] = {"first": float(np.mean(losses[:k])), "last": float(np.mean(losses[-k:])), "steps": len(losses)}


def alphas_cumprod() -> torch.Tensor:
    """SD v1.4's ``scaled_linear`` schedule (β from 0.00085 to 0.012 over 1000 steps), ᾱ_t."""
    cfg = SD14_SCHEDULER_CONFIG
    betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, cfg["num_train_timesteps"]) ** 2
    return torch.cumprod(1.0 - betas.double(), 0).float()


def _diffusion_loss(pred: torch.Tensor, noise: torch.Tensor, snr: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """ε-MSE with min-SNR-γ weights (Hang et al. 2023) for faster convergence."""
    weight = torch.clamp(snr, max=gamma) / snr
    return (weight * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()


class EMA:
    """Exponential moving average of parameters, decay ``min(decay, (1 + n) / (10 + n))``."""

    def __init__(self, module: torch.nn.Module, decay: float = 0.999) -> None:
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - d)

    @torch.no_grad()
    def copy_to(self) -> None:
        for p, s in zip(self.params, self.shadow, strict=True):
            p.copy_(s)


# ----------------------------------------------------------------------------------------------
# (a) CLIP pair


def train_clip(pool: Pool, bank: CaptionBank, budget: Budget, seed: int, device: torch.device) -> CLIPModel:
    """Contrastive text/image training with multi-positive targets (a caption is true of several images)."""
    rng = _rng(seed, _CLIP)
    config = CLIPConfig(
        text_config=text_config().to_dict(), vision_config=vision_config().to_dict(), projection_dim=IMAGE_EMBED_DIM
    )
    model = CLIPModel(config).to(device).train()
    ids = load_clip_tokenizer()(bank.texts, padding="longest", return_tensors="pt").input_ids.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=budget.clip_lr, weight_decay=0.05)
    scheduler = _schedule(optimizer, budget.clip_steps, 100)
    losses: list[float] = []
    for _ in _steps(budget.clip_steps, "(a) CLIP"):
        idx = rng.integers(len(pool.scenes), size=budget.clip_batch)
        captions = bank.sample(pool.labels[idx], rng)
        pixels = clip_normalize(degrade(_images_01(pool.images[idx], device)))
        out = model(input_ids=ids[captions], pixel_values=pixels)
        truth = torch.from_numpy(bank.truth(captions, pool.labels[idx])).to(device).float()
        logits = out.logits_per_text  # [texts, images]
        loss_text = -(truth / truth.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
        loss_image = -(truth.T / truth.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
        loss = 0.5 * (loss_text + loss_image)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100.0))
    _record("clip", losses)
    return model.eval()


def save_text_projection(model: CLIPModel, folder: Path) -> Path:
    """``text_projection.safetensors``: the CLIP pair's text projection and logit scale.

    SD's ``text_encoder/`` is the text transformer alone, so the projection into the joint space
    is kept here: the comparison's toy CLIP score (:mod:`coerasing.toy.protocol`) needs it.
    """
    from safetensors.torch import save_file

    tensors = {"text_projection.weight": model.text_projection.weight.detach().cpu().contiguous(),
               "logit_scale": model.logit_scale.detach().cpu().reshape(1).contiguous()}
    path = folder / "text_projection.safetensors"
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
    return path


def split_clip(model: CLIPModel) -> tuple[CLIPTextModel, CLIPVisionModelWithProjection]:
    """The text half as SD's ``CLIPTextModel``, the vision half + projection as the IP-Adapter image encoder."""
    text_encoder = CLIPTextModel(text_config())
    getattr(text_encoder, "text_model", text_encoder).load_state_dict(model.text_model.state_dict())
    image_encoder = CLIPVisionModelWithProjection(vision_config())
    image_encoder.vision_model.load_state_dict(model.vision_model.state_dict())
    image_encoder.visual_projection.load_state_dict(model.visual_projection.state_dict())
    device = model.logit_scale.device
    return text_encoder.to(device).eval(), image_encoder.to(device).eval()


@torch.no_grad()
def encode_texts(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, texts: list[str]) -> torch.Tensor:
    """``[N, 77, d]`` text states exactly as ``StableDiffusionPipeline.encode_prompt`` computes them."""
    out = []
    for start in range(0, len(texts), 256):
        ids = tokenizer(
            texts[start : start + 256],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        out.append(text_encoder(ids.to(text_encoder.device))[0])
    return torch.cat(out)


@torch.no_grad()
def encode_images(image_encoder: CLIPVisionModelWithProjection, images: np.ndarray) -> torch.Tensor:
    """``[N, IMAGE_EMBED_DIM]`` projected embeddings of uint8 renders (CLIP normalisation)."""
    device = image_encoder.device
    return torch.cat(
        [
            image_encoder(pixel_values=clip_normalize(_images_01(images[s : s + 512], device))).image_embeds
            for s in range(0, len(images), 512)
        ]
    )


@torch.no_grad()
def clip_zero_shot_accuracy(tokenizer: CLIPTokenizer, clip: CLIPModel, scenes: list[Scene]) -> dict[str, float]:
    """Zero-shot shape / colour accuracy of the CLIP pair on held-out renders ("a photo of a {x}" prompts)."""
    device = clip.logit_scale.device
    pixels = clip_normalize(_images_01(render_batch(scenes), device))
    image = F.normalize(clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output), dim=-1)
    labels = scene_labels(scenes)
    result = {}
    for key, names, column, template in (
        ("shape", SHAPES, 0, "a photo of a {}"),
        ("colour", list(COLOURS), 1, "a photo of a {} object"),
    ):
        ids = tokenizer([template.format(n) for n in names], padding="longest", return_tensors="pt").input_ids
        text = F.normalize(clip.text_projection(clip.text_model(input_ids=ids.to(device)).pooler_output), dim=-1)
        predicted = (image @ text.T).argmax(1).cpu().numpy()
        result[key] = float(np.mean(predicted == labels[:, column]))
    return result


# ----------------------------------------------------------------------------------------------
# (b) VAE


def _image_gradients(x: torch.Tensor) -> torch.Tensor:
    """Horizontal and vertical neighbour differences, flattened (an edge-sharpness loss term)."""
    return torch.cat([(x[..., 1:, :] - x[..., :-1, :]).flatten(1), (x[..., :, 1:] - x[..., :, :-1]).flatten(1)], 1)


def train_vae(pool: Pool, budget: Budget, seed: int, device: torch.device, kl_weight: float = 1e-6) -> AutoencoderKL:
    """Reconstruction (L2 + L1 + L1 of image gradients, which keeps star tips and cross arms sharp) with a small
    KL term (SD's 1e-6); then ``scaling_factor`` = 1 / std of the latents (as SD chose 0.18215)."""
    rng = _rng(seed, _VAE)
    vae = AutoencoderKL(**vae_config()).to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=budget.vae_lr, weight_decay=0.0)
    scheduler = _schedule(optimizer, budget.vae_steps, 100)
    losses: list[float] = []
    for _ in _steps(budget.vae_steps, "(b) VAE"):
        idx = rng.integers(len(pool.scenes), size=budget.vae_batch)
        x = _images_01(pool.images[idx], device) * 2.0 - 1.0
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(reconstruction, x) + F.l1_loss(reconstruction, x) + kl_weight * posterior.kl().mean()
        loss = loss + F.l1_loss(_image_gradients(reconstruction), _image_gradients(x))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    _record("vae", losses)
    vae.eval()
    _round_fp16(vae)
    mean, _ = encode_latents(vae, pool.images[: min(len(pool.images), 2_000)])
    vae.register_to_config(scaling_factor=float(1.0 / mean.std().clamp_min(1e-6)))
    return vae


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std (unscaled) of uint8 images, ``[N, 4, h, w]`` each."""
    device = vae.device
    means, stds = [], []
    for start in range(0, len(images), 256):
        x = _images_01(images[start : start + 256], device) * 2.0 - 1.0
        dist = vae.encode(x).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def vae_reconstruction_error(vae: AutoencoderKL, images: np.ndarray) -> float:
    """Mean absolute error (0–255 scale) of encode-mean → decode on uint8 images."""
    mean, _ = encode_latents(vae, images)
    decoded = vae.decode(mean).sample
    x = _images_01(images, vae.device) * 2.0 - 1.0
    return float((decoded.clamp(-1, 1) - x).abs().mean() * 127.5)


# ----------------------------------------------------------------------------------------------
# (c) UNet


def _noisy_latents(
    latent_mean: torch.Tensor, latent_std: torch.Tensor, idx: np.ndarray, scaling: float, acp: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(z_t, t, ε, SNR(t))`` for a batch of pool indices (latents sampled from the posterior, scaled)."""
    index = torch.from_numpy(idx).to(latent_mean.device)
    z0 = (latent_mean[index] + latent_std[index] * torch.randn_like(latent_mean[index])) * scaling
    t = torch.randint(0, len(acp), (len(idx),), device=z0.device)
    a = acp.to(z0.device)[t].view(-1, 1, 1, 1)
    noise = torch.randn_like(z0)
    return a.sqrt() * z0 + (1 - a).sqrt() * noise, t, noise, (a / (1 - a)).flatten()


def train_unet(
    latents: tuple[torch.Tensor, torch.Tensor],
    scaling: float,
    labels: np.ndarray,
    bank: CaptionBank,
    text_states: torch.Tensor,
    budget: Budget,
    seed: int,
    device: torch.device,
) -> UNet2DConditionModel:
    """ε-prediction on SD v1.4's schedule, frozen text states, caption dropout; returns the EMA weights."""
    rng = _rng(seed, _UNET)
    unet = UNet2DConditionModel(**unet_config()).to(device).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=budget.unet_lr, weight_decay=0.01)
    scheduler = _schedule(optimizer, budget.unet_steps, 200)
    ema = EMA(unet)
    acp = alphas_cumprod()
    losses: list[float] = []
    for _ in _steps(budget.unet_steps, "(c) UNet"):
        idx = rng.integers(len(labels), size=budget.unet_batch)
        captions = torch.from_numpy(bank.sample(labels[idx], rng, dropout=CAPTION_DROPOUT)).to(device)
        z_t, t, noise, snr = _noisy_latents(*latents, idx, scaling, acp)
        pred = unet(z_t, t, encoder_hidden_states=text_states[captions]).sample
        loss = _diffusion_loss(pred, noise, snr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        ema.update()
        losses.append(loss.item())
    _record("unet", losses)
    ema.copy_to()
    unet.eval()
    _round_fp16(unet)
    return unet


# ----------------------------------------------------------------------------------------------
# (d) IP-Adapter


def initial_ip_adapter_state(unet: UNet2DConditionModel) -> dict[str, dict[str, torch.Tensor]]:
    """h94-layout IP-Adapter weights to start from: ``to_k_ip``/``to_v_ip`` copy ``to_k``/``to_v`` (Ye et al.)."""
    cross_dim = int(unet.config.cross_attention_dim)
    proj = torch.nn.Linear(IMAGE_EMBED_DIM, NUM_IP_TOKENS * cross_dim)
    image_proj = {
        "proj.weight": proj.weight.detach().clone(),
        "proj.bias": proj.bias.detach().clone(),
        "norm.weight": torch.ones(cross_dim),
        "norm.bias": torch.zeros(cross_dim),
    }
    modules = dict(unet.named_modules())
    ip_adapter: dict[str, torch.Tensor] = {}
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        attn = modules[name[: -len(".processor")]]
        ip_adapter[f"{key_id}.to_k_ip.weight"] = attn.to_k.weight.detach().cpu().clone()
        ip_adapter[f"{key_id}.to_v_ip.weight"] = attn.to_v.weight.detach().cpu().clone()
        key_id += 2
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def extract_ip_adapter_state(unet: UNet2DConditionModel) -> dict[str, dict[str, torch.Tensor]]:
    """The loaded IP-Adapter of ``unet`` back in the h94 layout (inverse of diffusers' loader)."""
    projection = unet.encoder_hid_proj.image_projection_layers[0]
    image_proj = {
        "proj.weight": projection.image_embeds.weight,
        "proj.bias": projection.image_embeds.bias,
        "norm.weight": projection.norm.weight,
        "norm.bias": projection.norm.bias,
    }
    ip_adapter: dict[str, torch.Tensor] = {}
    key_id = 1
    for name, processor in unet.attn_processors.items():
        if name.endswith("attn1.processor"):
            continue
        ip_adapter[f"{key_id}.to_k_ip.weight"] = processor.to_k_ip[0].weight
        ip_adapter[f"{key_id}.to_v_ip.weight"] = processor.to_v_ip[0].weight
        key_id += 2
    as_fp32 = {k: v.detach().float().cpu().clone().contiguous() for k, v in image_proj.items()}
    return {"image_proj": as_fp32, "ip_adapter": {k: v.detach().float().cpu().clone() for k, v in ip_adapter.items()}}


def train_ip_adapter(
    unet: UNet2DConditionModel,
    latents: tuple[torch.Tensor, torch.Tensor],
    scaling: float,
    labels: np.ndarray,
    image_embeds: torch.Tensor,
    bank: CaptionBank,
    text_states: torch.Tensor,
    budget: Budget,
    seed: int,
    device: torch.device,
    text_dropout: float = 0.5,
    image_dropout: float = 0.1,
) -> dict[str, dict[str, torch.Tensor]]:
    """Train the image projection and ``to_k_ip``/``to_v_ip`` on a frozen copy of ``unet`` to denoise the image
    whose embedding it is given; text dropped with ``text_dropout`` (so image-only prompts work), the image
    embedding zeroed with ``image_dropout`` (diffusers' unconditional image embedding for CFG)."""
    rng = _rng(seed, _IP)
    unet = copy.deepcopy(unet).requires_grad_(False)
    unet._load_ip_adapter_weights([initial_ip_adapter_state(unet)], low_cpu_mem_usage=False)
    unet.to(device)
    trainable = list(unet.encoder_hid_proj.parameters())
    for processor in unet.attn_processors.values():
        if isinstance(processor, torch.nn.Module):
            trainable += list(processor.parameters())
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=budget.ip_lr, weight_decay=0.01)
    scheduler = _schedule(optimizer, budget.ip_steps, 100)
    acp = alphas_cumprod()
    losses: list[float] = []
    for _ in _steps(budget.ip_steps, "(d) IP-Adapter"):
        idx = rng.integers(len(labels), size=budget.ip_batch)
        captions = bank.sample(labels[idx], rng)
        captions[rng.random(len(idx)) < text_dropout] = 0
        keep = torch.from_numpy(rng.random(len(idx)) >= image_dropout).to(device).float().view(-1, 1, 1)
        embeds = image_embeds[torch.from_numpy(idx).to(device)][:, None, :] * keep
        z_t, t, noise, snr = _noisy_latents(*latents, idx, scaling, acp)
        pred = unet(
            z_t,
            t,
            encoder_hidden_states=text_states[torch.from_numpy(captions).to(device)],
            added_cond_kwargs={"image_embeds": [embeds]},
        ).sample
        loss = _diffusion_loss(pred, noise, snr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    _record("ip_adapter", losses)
    return extract_ip_adapter_state(unet)


def save_ip_adapter(state: dict[str, dict[str, torch.Tensor]], folder: Path) -> None:
    """``ip-adapter_toy.bin`` (nested, as h94's ``ip-adapter_sd15.bin``) and the flat ``.safetensors``."""
    torch.save(state, folder / IP_ADAPTER_WEIGHT_NAME)
    flat = {f"{group}.{key}": t.contiguous() for group, tensors in state.items() for key, t in tensors.items()}
    save_file(flat, str(folder / IP_ADAPTER_SAFETENSORS_NAME))


# ----------------------------------------------------------------------------------------------
# (e) Classifier


def _classifier_data(n: int, rng: np.random.Generator, none_fraction: float = 0.08) -> tuple[np.ndarray, np.ndarray]:
    """Renders plus empty backgrounds (shape ``"none"``, colour ``-1``): images and ``[N, 3]`` labels."""
    pool = make_pool(n, rng)
    labels = pool.labels.copy()
    empty = rng.random(n) < none_fraction
    backgrounds = np.asarray(list(BACKGROUNDS.values()), dtype=np.uint8)
    pool.images[empty] = backgrounds[labels[empty, 2]][:, None, None, :]
    labels[empty, 0] = CLASSIFIER_SHAPES.index(NO_SHAPE)
    labels[empty, 1] = -1
    return pool.images, labels


def train_classifier(budget: Budget, seed: int, device: torch.device) -> tuple[ToyClassifier, dict[str, float]]:
    """The evaluator, on its own render stream with blur/noise/colour-jitter augmentation; held-out accuracy."""
    rng = _rng(seed, _CLF)
    images, labels = _classifier_data(budget.clf_pool, rng)
    model = ToyClassifier(resolution=RESOLUTION).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=budget.clf_lr, weight_decay=0.01)
    scheduler = _schedule(optimizer, budget.clf_steps, 50)
    target = torch.from_numpy(labels).to(device)
    losses: list[float] = []
    for _ in _steps(budget.clf_steps, "(e) classifier"):
        idx = torch.from_numpy(rng.integers(len(images), size=budget.clf_batch)).to(device)
        x = degrade(_images_01(images[idx.cpu().numpy()], device), strength=1.5)
        x = x + 0.03 * torch.randn(len(idx), 3, 1, 1, device=device)  # small colour jitter
        shape, colour, background = model(x.clamp(0, 1) * 2.0 - 1.0)
        y = target[idx]
        loss = F.cross_entropy(shape, y[:, 0]) + F.cross_entropy(background, y[:, 2])
        loss = loss + F.cross_entropy(colour, y[:, 1], ignore_index=-1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    _record("classifier", losses)
    model.eval()
    _round_fp16(model)
    scenes = heldout_scenes(500, seed=seed)
    predictions = model.predict(render_batch(scenes))
    heldout = {
        key: float(np.mean([p[key] == getattr(s, key) for p, s in zip(predictions, scenes, strict=True)]))
        for key in ("shape", "colour", "background")
    }
    with torch.no_grad():
        blurred = degrade(_images_01(render_batch(scenes), device), strength=1.0)
    blurred_np = (blurred.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    predictions = model.predict(blurred_np)
    hits = [p["shape"] == s.shape for p, s in zip(predictions, scenes, strict=True)]
    heldout["shape_degraded"] = float(np.mean(hits))
    return model, heldout


# ----------------------------------------------------------------------------------------------
# Saving


def _fp16_storage(folder: Path) -> None:
    """Rewrite every ``*.safetensors`` under ``folder`` with floating tensors in fp16."""
    for path in folder.rglob("*.safetensors"):
        tensors = load_file(str(path))
        save_file(
            {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()},
            str(path),
            metadata={"format": "pt"},
        )


def save_pipeline(
    folder: Path,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    unet: UNet2DConditionModel,
    image_encoder: CLIPVisionModelWithProjection,
) -> None:
    """The diffusers folder: SD v1.4's components (+ ``image_encoder``), tokenizer as SD ships it, fp16 storage."""
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_clip_tokenizer(),
        unet=unet,
        scheduler=PNDMScheduler.from_config(SD14_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=image_encoder,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(folder / "tokenizer")
    shutil.copytree(CLIP_TOKENIZER_DIR, folder / "tokenizer", ignore=shutil.ignore_patterns("README.md"))
    for name in ("unet", "vae", "text_encoder", "image_encoder"):
        _fp16_storage(folder / name)


def world_description() -> dict[str, Any]:
    """``world.json``: the world's vocabulary, caption templates and held-out evaluation prompts."""
    return {
        "resolution": RESOLUTION,
        "shapes": list(SHAPES),
        "colours": COLOURS,
        "backgrounds": BACKGROUNDS,
        "implicit_names": {name: {"shape": s, "colour": c} for name, (s, c) in IMPLICIT_NAMES.items()},
        "templates": TEMPLATES,
        "caption_dropout": CAPTION_DROPOUT,
        "heldout_prompts": {
            "explicit": [asdict(p) for p in explicit_prompts()],
            "implicit": [asdict(p) for p in implicit_prompts()],
        },
    }


def folder_size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


# ----------------------------------------------------------------------------------------------
# The build


@contextlib.contextmanager
def _timed(name: str, timings: dict[str, float], log: Callable[[str], None]) -> Iterator[None]:
    start = time.perf_counter()
    log(f"[toy build] {name} ...")
    yield
    timings[name] = round(time.perf_counter() - start, 1)
    log(f"[toy build] {name}: {timings[name]:.1f} s")


def build_toy_world(
    out_dir: str | Path,
    seed: int = 0,
    budget: str | Budget = "full",
    device: str | torch.device = "cpu",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train every component of the toy-world stack into ``out_dir``; returns (and writes) ``quality.json``.

    Deterministic for a given ``seed``, budget, device and thread count. The caller's global RNG
    state is restored afterwards.
    """
    plan = BUDGETS[budget] if isinstance(budget, str) else budget
    budget_name = budget if isinstance(budget, str) else "custom"
    device = torch.device(device)
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    report: dict[str, Any] = {"seed": seed, "budget": budget_name, "plan": asdict(plan), "device": str(device)}
    total = time.perf_counter()
    LOSSES.clear()
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        with _timed("data", timings, log):
            pool = make_pool(plan.pool_size, _rng(seed, _DATA))
            bank = CaptionBank()
        with _timed("(a) CLIP", timings, log):
            clip = train_clip(pool, bank, plan, seed, device)
            _round_fp16(clip)
            text_encoder, image_encoder = split_clip(clip)
            save_text_projection(clip, folder)
            tokenizer = load_clip_tokenizer()
            report["clip_zero_shot"] = clip_zero_shot_accuracy(tokenizer, clip, heldout_scenes(500, seed))
            del clip
        with _timed("(b) VAE", timings, log):
            vae = train_vae(pool, plan, seed, device)
            report["vae_mae_255"] = vae_reconstruction_error(vae, render_batch(heldout_scenes(256, seed)))
            report["vae_scaling_factor"] = float(vae.config.scaling_factor)
        with _timed("encode", timings, log):
            latents = encode_latents(vae, pool.images)
            text_states = encode_texts(tokenizer, text_encoder, bank.texts)
            image_embeds = encode_images(image_encoder, pool.images)
        scaling = float(vae.config.scaling_factor)
        with _timed("(c) UNet", timings, log):
            unet = train_unet(latents, scaling, pool.labels, bank, text_states, plan, seed, device)
        save_pipeline(folder, vae, text_encoder, unet, image_encoder)
        with _timed("(d) IP-Adapter", timings, log):
            ip_state = train_ip_adapter(
                unet, latents, scaling, pool.labels, image_embeds, bank, text_states, plan, seed, device
            )
            save_ip_adapter(ip_state, folder)
        with _timed("(e) classifier", timings, log):
            classifier, report["classifier_heldout"] = train_classifier(plan, seed, device)
            classifier.save_pretrained(folder / "classifier")
        (folder / "world.json").write_text(json.dumps(world_description(), indent=2))
        report["parameters"] = {
            "text_encoder": count_parameters(text_encoder),
            "text_encoder_token_embedding": text_encoder.get_input_embeddings().weight.numel(),
            "image_encoder": count_parameters(image_encoder),
            "vae": count_parameters(vae),
            "unet": count_parameters(unet),
            "ip_adapter": sum(t.numel() for group in ip_state.values() for t in group.values()),
            "classifier": count_parameters(classifier),
        }
        with _timed("(f) quality", timings, log):
            _rng(seed, _EVAL)
            report["quality"] = evaluate_quality(
                folder, **plan_settings(asdict(plan)), seed=seed, device=device,
                samples_path=folder / "quality_samples.png",
            )
    report["train_loss"] = dict(LOSSES)
    timings["total"] = round(time.perf_counter() - total, 1)
    report["timings_s"] = timings
    report["threads"] = torch.get_num_threads()
    atomic_write_text(folder / "quality.json", json.dumps(report, indent=2))
    report["folder_mb"] = round(folder_size_mb(folder), 2)
    atomic_write_text(folder / "quality.json", json.dumps(report, indent=2))
    log(
        f"[toy build] done in {timings['total']:.0f} s; {report['folder_mb']} MB; quality targets passed: "
        f"{report['quality']['all_passed']}"
    )
    return report


def main(argv: list[str] | None = None) -> None:
    """``python -m coerasing.toy.build OUT [--smoke] [--seed N] [--device cpu] [--threads N] [--steps-scale F]``."""
    parser = argparse.ArgumentParser(prog="python -m coerasing.toy.build", description=build_toy_world.__doc__)
    parser.add_argument("out", help="folder to write the toy-world stack into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a few steps of each component (CI check, < 60 s)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--steps-scale", type=float, default=1.0, help="multiply every training-step count (e.g. 0.05 to time a build)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    budget: str | Budget = "smoke" if args.smoke else "full"
    if args.steps_scale != 1.0:
        budget = scaled(BUDGETS[budget], args.steps_scale)
    report = build_toy_world(args.out, seed=args.seed, budget=budget, device=args.device)
    print(json.dumps({k: report[k] for k in ("timings_s", "folder_mb")}, indent=2))
    print(json.dumps({k: v["measured"] for k, v in report["quality"]["targets"].items()}, indent=2))


if __name__ == "__main__":
    main()

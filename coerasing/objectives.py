"""The paper's equations on predictions and conditionings, one small function each.

- :func:`negative_guidance_target`: the ESD / Co-Erasing regression target (docs/method.md Eq. 3).
- :func:`erasing_loss`: the MSE between the trained prediction and that target (Eq. 4).
- :func:`refine_image_tokens`: text-guided image concept refinement (Eq. 5).
- :func:`perturb_image_tokens`: optional uniform noise on the image tokens (Eq. 6).
- :func:`blur_latents`: optional Gaussian blur of the partially denoised latent (Eq. 7).
- :func:`preservation_loss`: the optional anchor-preservation term (Eq. 9; not in the paper).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def negative_guidance_target(
    noise_pred_uncond: torch.Tensor, noise_pred_cond: torch.Tensor, negative_guidance: float
) -> torch.Tensor:
    """``target = ε_u − η · (ε_c − ε_u)`` (docs/method.md Eq. 3; §4 step 5, §5 step 7).

    The trainable model is pushed to predict, for the concept's conditioning, the frozen
    model's unconditional prediction moved *away* from the concept by ``η``.
    """
    return noise_pred_uncond - negative_guidance * (noise_pred_cond - noise_pred_uncond)


def erasing_loss(noise_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``MSE(ε_θ(z, t, c), target)`` (docs/method.md Eq. 4), computed in fp32."""
    return F.mse_loss(noise_pred.float(), target.float())


def preservation_loss(noise_pred: torch.Tensor, reference_pred: torch.Tensor) -> torch.Tensor:
    """``‖ε_θ(z, t, c_a) − ε_ref(z, t, c_a)‖²`` (mean over elements) for an anchor prompt ``c_a``
    (docs/method.md Eq. 9, an option of ours: off by default), computed in fp32."""
    return F.mse_loss(noise_pred.float(), reference_pred.float())


def refine_image_tokens(image_tokens: torch.Tensor, text_states: torch.Tensor) -> torch.Tensor:
    """``c_img = softmax(tokens · Yᵀ / √d) · Y`` (docs/method.md Eq. 5).

    Each of the image tokens ``[B, N, d]`` becomes a mixture of the concept's text states
    ``Y [B or 1, L, d]``, weighted by how strongly the token attends to them, so only the
    concept-relevant part of the image survives.
    """
    text_states = text_states.to(image_tokens.dtype)
    scores = image_tokens @ text_states.transpose(-1, -2) / math.sqrt(image_tokens.shape[-1])
    return scores.softmax(dim=-1) @ text_states


def perturb_image_tokens(
    image_tokens: torch.Tensor, noise_factor: float, generator: torch.Generator
) -> torch.Tensor:
    """``c_img + f · U[0, 1)`` (docs/method.md Eq. 6, the released code's semantics); identity for f = 0."""
    if noise_factor == 0:
        return image_tokens
    noise = torch.rand(image_tokens.shape, generator=generator, dtype=torch.float32)
    return image_tokens + noise_factor * noise.to(image_tokens.device, image_tokens.dtype)


def gaussian_sigma(kernel_size: int) -> float:
    """``σ = 0.3 · ((K − 1)/2 − 1) + 0.8``, the usual default for a kernel of size K (docs/method.md Eq. 7)."""
    return 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8


def gaussian_kernel1d(kernel_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A normalised 1-D Gaussian of odd size ``K`` with :func:`gaussian_sigma` (docs/method.md Eq. 7)."""
    half = (kernel_size - 1) / 2
    x = torch.linspace(-half, half, kernel_size, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / gaussian_sigma(kernel_size)) ** 2)
    return (kernel / kernel.sum()).to(dtype)


def blur_latents(latents: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Gaussian blur of ``[B, C, H, W]`` latents, per channel, reflect padding (docs/method.md Eq. 7).

    ``kernel_size`` is odd; 0 turns the blur off. The 2-D kernel is separable, so the blur is two
    depthwise 1-D convolutions.
    """
    if kernel_size == 0:
        return latents
    if kernel_size < 0 or kernel_size % 2 == 0:
        raise ValueError(f"blur kernel size must be 0 or a positive odd number, got {kernel_size}")
    channels = latents.shape[1]
    pad = kernel_size // 2
    kernel = gaussian_kernel1d(kernel_size).to(latents.device, latents.dtype)
    x = F.pad(latents, (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)

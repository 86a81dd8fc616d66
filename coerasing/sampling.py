"""Partial denoising to a sampled noise bucket (docs/method.md §4 steps 2-3, Eq. 1-2).

ESD-style erasing trains at the noise level the *erased model itself* reaches when it samples the
concept: draw a bucket ``k`` of the ``S``-step schedule, walk a sampler from pure noise down to the
bucket's noise level (highest noise first), and train there at a DDPM timestep inside the bucket.
The released Co-Erasing code walked the timesteps in ascending order (docs/method.md §10 (a)); here
the walk is a real reverse-diffusion trajectory (tested statistically in ``tests/test_sampling.py``).
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from .choices import SAMPLERS

NoisePredFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_sampling_scheduler(
    scheduler_config: dict, sampler: str, num_inference_steps: int
) -> DDPMScheduler | DDIMScheduler:
    """Build the ``Step`` of docs/method.md Eq. 2 (§4 step 3) from the model's scheduler config.

    Both samplers use SD's schedule with "leading" spacing and offset 1, so for ``S = 50`` the
    timesteps are ``981, 961, ..., 1``. ``ddpm`` takes ancestral steps (the released code's
    choice), ``ddim`` deterministic steps with eta = 0 (the original ESD's choice).
    """
    overrides = dict(clip_sample=False, timestep_spacing="leading", steps_offset=1)
    if sampler == "ddpm":
        scheduler = DDPMScheduler.from_config(scheduler_config, variance_type="fixed_small", **overrides)
    elif sampler == "ddim":
        scheduler = DDIMScheduler.from_config(scheduler_config, set_alpha_to_one=False, **overrides)
    else:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    scheduler.set_timesteps(num_inference_steps)
    return scheduler


def sample_bucket(
    num_inference_steps: int, num_train_timesteps: int, generator: torch.Generator
) -> tuple[int, int]:
    """Draw a step index ``k`` uniformly and a DDPM timestep ``t`` in its bucket (docs/method.md Eq. 1).

    ``t`` is uniform over the integers ``round(k·T/S), …, round((k+1)·T/S) − 1`` (Python's ``round``),
    with at least one timestep per bucket.
    """
    k = int(torch.randint(num_inference_steps, (1,), generator=generator))
    low = round(k * num_train_timesteps / num_inference_steps)
    high = round((k + 1) * num_train_timesteps / num_inference_steps)
    t = int(torch.randint(low, max(high, low + 1), (1,), generator=generator))
    return k, t


def bucket_timestep(scheduler: DDPMScheduler | DDIMScheduler, k: int) -> int:
    """The sampler timestep whose noise level belongs to bucket ``k``: ``τ_{S-1-k}`` (docs/method.md Eq. 2).

    For ``S = 50`` this is ``20·k + 1``.
    """
    timesteps = scheduler.timesteps
    return int(timesteps[len(timesteps) - 1 - k])


@torch.inference_mode()
def denoise_to_bucket(
    noise_pred_fn: NoisePredFn,
    latents: torch.Tensor,
    scheduler: DDPMScheduler | DDIMScheduler,
    k: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Denoise ``latents`` (pure noise at ``τ_0``) down to the noise level of bucket ``k`` (docs/method.md Eq. 2).

    Walks ``τ_0 > τ_1 > … `` and stops at ``τ_{S-1-k}``, i.e. takes ``S-1-k`` sampler steps
    (none for the noisiest bucket). ``noise_pred_fn(latents, timestep)`` returns the model's
    ε-prediction; guidance, if any, is the caller's business. Runs under ``torch.inference_mode``:
    clone the result before using it in a forward pass that needs gradients.
    """
    timesteps = scheduler.timesteps
    num_steps = len(timesteps) - 1 - k
    if not 0 <= num_steps < len(timesteps):
        raise ValueError(f"bucket {k} is outside 0..{len(timesteps) - 1}")
    step_kwargs = {"eta": 0.0} if isinstance(scheduler, DDIMScheduler) else {}
    for timestep in timesteps[:num_steps]:
        noise_pred = noise_pred_fn(latents, timestep)
        latents = scheduler.step(
            noise_pred, timestep, latents, generator=generator, **step_kwargs
        ).prev_sample
    return latents

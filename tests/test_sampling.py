"""Partial denoising (docs/method.md Eq. 1–2), checked against a model whose exact ε is known."""

from __future__ import annotations

import pytest
import torch

from coerasing.sampling import bucket_timestep, denoise_to_bucket, make_sampling_scheduler, sample_bucket
from coerasing.testing import SD14_SCHEDULER_CONFIG

DATA_STD = 2.0  # toy data x0 ~ N(0, s²), so x_t ~ N(0, ᾱ s² + 1 − ᾱ)


def gaussian_toy(scheduler):
    """Exact ε-prediction E[ε | x_t] for Gaussian data, and the true variance of x_t."""
    alphas = scheduler.alphas_cumprod.double()

    def variance(timestep: int) -> float:
        return float(alphas[timestep] * DATA_STD**2 + 1 - alphas[timestep])

    def noise_pred(latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        a = alphas[int(timestep)]
        return ((1 - a).sqrt() * latents / (a * DATA_STD**2 + 1 - a)).to(latents.dtype)

    return noise_pred, variance


def test_leading_timesteps_and_bucket_levels():
    scheduler = make_sampling_scheduler(SD14_SCHEDULER_CONFIG, "ddpm", 50)
    assert scheduler.timesteps.tolist() == list(range(981, 0, -20))
    assert [bucket_timestep(scheduler, k) for k in (0, 1, 24, 49)] == [1, 21, 481, 981]


@pytest.mark.parametrize("k", [0, 7, 49])
def test_number_of_sampler_steps_is_s_minus_1_minus_k(k):
    scheduler = make_sampling_scheduler(SD14_SCHEDULER_CONFIG, "ddim", 50)
    seen = []

    def noise_pred(latents, timestep):
        seen.append(int(timestep))
        return torch.zeros_like(latents)

    denoise_to_bucket(noise_pred, torch.randn(1, 4, 8, 8), scheduler, k)
    assert seen == scheduler.timesteps[: 49 - k].tolist()
    assert seen == sorted(seen, reverse=True)  # high noise → low noise


def test_sample_bucket_draws_timestep_inside_bucket():
    generator = torch.Generator().manual_seed(0)
    draws = [sample_bucket(50, 1000, generator) for _ in range(2000)]
    assert {k for k, _ in draws} == set(range(50))
    assert all(20 * k <= t < 20 * (k + 1) for k, t in draws)
    assert len({t for _, t in draws}) > 500


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_latent_reaches_the_variance_of_x_t_at_the_bucket(sampler):
    """Starting from x_{τ0}, the walk ends at τ_{S-1-k} with Var = ᾱ s² + 1 − ᾱ (within 3 %)."""
    steps = 200
    scheduler = make_sampling_scheduler(SD14_SCHEDULER_CONFIG, sampler, steps)
    noise_pred, variance = gaussian_toy(scheduler)
    start_std = variance(int(scheduler.timesteps[0])) ** 0.5
    for k in (0, 20, 100, 150, steps - 1):
        generator = torch.Generator().manual_seed(k)
        latents = torch.randn(256, 4, 8, 8, generator=generator) * start_std
        out = denoise_to_bucket(noise_pred, latents, scheduler, k, generator)
        ratio = float(out.double().var()) / variance(bucket_timestep(scheduler, k))
        assert abs(ratio - 1) < 0.03, (sampler, k, ratio)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_released_ascending_walk_fails_the_same_check(sampler):
    """Negative control: the released code's ascending walk misses the bucket's variance."""
    steps, k = 200, 100
    scheduler = make_sampling_scheduler(SD14_SCHEDULER_CONFIG, sampler, steps)
    noise_pred, variance = gaussian_toy(scheduler)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(256, 4, 8, 8, generator=generator)
    extra = {"eta": 0.0} if sampler == "ddim" else {}
    for timestep in scheduler.timesteps.flip(0)[: steps - k]:
        noise = noise_pred(latents, timestep)
        latents = scheduler.step(noise, timestep, latents, generator=generator, **extra).prev_sample
    ratio = float(latents.double().var()) / variance(bucket_timestep(scheduler, k))
    assert abs(ratio - 1) > 0.10


def test_ddpm_walk_is_reproducible_from_the_generator():
    scheduler = make_sampling_scheduler(SD14_SCHEDULER_CONFIG, "ddpm", 50)
    noise_pred, _ = gaussian_toy(scheduler)

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        return denoise_to_bucket(noise_pred, torch.randn(2, 4, 8, 8, generator=generator), scheduler, 10, generator)

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))

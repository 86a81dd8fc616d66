"""The paper's equations (docs/method.md Eq. 3–7)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from coerasing.objectives import (
    blur_latents,
    erasing_loss,
    gaussian_kernel1d,
    gaussian_sigma,
    negative_guidance_target,
    perturb_image_tokens,
    refine_image_tokens,
)


def test_negative_guidance_target():
    eps_u, eps_c = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0])
    assert torch.equal(negative_guidance_target(eps_u, eps_c, 1.0), torch.tensor([-1.0, 3.0]))
    assert torch.equal(negative_guidance_target(eps_u, eps_c, 0.0), eps_u)
    assert torch.allclose(negative_guidance_target(eps_u, eps_c, 2.5), eps_u - 2.5 * (eps_c - eps_u))


def test_erasing_loss_is_mse():
    pred, target = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    assert torch.allclose(erasing_loss(pred, target), ((pred - target) ** 2).mean())


def test_refinement_matches_the_formula_and_mixes_text_states():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(1, 4, 16, generator=generator)
    text = torch.randn(1, 77, 16, generator=generator)
    refined = refine_image_tokens(tokens, text)
    weights = torch.softmax(tokens @ text.transpose(1, 2) / math.sqrt(16), dim=-1)
    assert refined.shape == (1, 4, 16)
    assert torch.allclose(refined, weights @ text, atol=1e-6)
    # each refined token is a convex combination of the text states
    assert torch.allclose(weights.sum(-1), torch.ones(1, 4))


def test_refinement_picks_the_matching_text_state():
    text = torch.eye(8).unsqueeze(0) * 40  # 8 orthogonal, strong text states
    tokens = text[:, [3, 5]]  # image tokens aligned with states 3 and 5
    refined = refine_image_tokens(tokens, text)
    assert torch.allclose(refined, tokens, atol=1e-3)


def test_perturbation_is_uniform_and_seeded():
    tokens = torch.zeros(1, 4, 32)
    assert perturb_image_tokens(tokens, 0.0, torch.Generator()) is tokens
    noisy = perturb_image_tokens(tokens, 0.5, torch.Generator().manual_seed(3))
    assert 0 <= noisy.min() and noisy.max() < 0.5 and noisy.std() > 0.05
    assert torch.equal(noisy, perturb_image_tokens(tokens, 0.5, torch.Generator().manual_seed(3)))


def test_gaussian_sigma_and_kernel():
    assert gaussian_sigma(3) == pytest.approx(0.8)
    assert gaussian_sigma(5) == pytest.approx(1.1)
    kernel = gaussian_kernel1d(5)
    assert kernel.sum().item() == pytest.approx(1.0)
    assert torch.equal(kernel, kernel.flip(0)) and kernel.argmax() == 2
    x = torch.arange(-2.0, 3.0)
    expected = torch.exp(-0.5 * (x / 1.1) ** 2)
    assert torch.allclose(kernel, expected / expected.sum())


@pytest.mark.parametrize("size", [3, 5])
def test_blur_equals_2d_gaussian_with_reflect_padding(size):
    latents = torch.randn(2, 4, 12, 12, generator=torch.Generator().manual_seed(0))
    k1 = gaussian_kernel1d(size)
    k2 = (k1[:, None] * k1[None, :]).expand(4, 1, size, size)
    padded = F.pad(latents, (size // 2,) * 4, mode="reflect")
    expected = F.conv2d(padded, k2, groups=4)
    assert torch.allclose(blur_latents(latents, size), expected, atol=1e-6)


def test_blur_off_constant_and_invalid():
    latents = torch.randn(1, 4, 8, 8)
    assert blur_latents(latents, 0) is latents
    constant = torch.full((1, 4, 8, 8), 2.5)
    assert torch.allclose(blur_latents(constant, 5), constant)
    assert blur_latents(latents, 3).std() < latents.std()
    with pytest.raises(ValueError):
        blur_latents(latents, 4)

"""STEREO on the tiny stack: the REO target, the rounds chain, resume between rounds, a plain UNet out."""

from __future__ import annotations

import json

import pytest
import torch

from coerasing.errors import CoErasingError
from coerasing.methods.stereo import (
    StereoConfig,
    compositional_target,
    default_anchors,
    default_initializer,
    text_with_tokens,
    token_name,
    train_stereo,
)


def test_reo_target_against_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    u, a = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    negatives = torch.randn(3, 4, 8, 8, generator=g)
    direct = u + 1.0 * (a - u) - 3.0 * ((negatives[0] - u) + (negatives[1] - u) + (negatives[2] - u)) / 3
    assert torch.allclose(compositional_target(u, a, negatives, 1.0, 3.0), direct, atol=1e-6)
    # α = β = 0 is the unconditional prediction (ESD at η = 0)
    assert torch.equal(compositional_target(u, a, negatives, 0.0, 0.0), u)


def test_defaults_per_concept_kind():
    assert default_initializer("nudity") == "person" and default_initializer("van gogh") == "art"
    assert default_initializer("church") == "object"
    anchors = default_anchors("circle")
    assert anchors and not any("circle" in a or "apple" in a or "coin" in a or "ball" in a for a in anchors)
    assert len(default_anchors("nudity")) >= 8


def _config(stack, images, folder, **overrides) -> StereoConfig:
    settings = dict(prompt="nudity", image=str(images), ckpt_path=str(stack.sd_path), rounds=2, ste_iterations=2,
                    ste_lr=1e-3, ti_steps=3, ti_lr=5e-3, reo_iterations=2, reo_lr=1e-3, reo_save_iter=1,
                    num_inference_steps=4, devices="cpu", save_path=str(folder), seed=0)
    settings.update(overrides)
    return StereoConfig(**settings)


def test_rounds_chain_resume_and_a_plain_unet(tiny_stack, reference_images, tmp_path):
    from diffusers import UNet2DConditionModel

    final = train_stereo(_config(tiny_stack, reference_images, tmp_path / "a"))
    folder = tmp_path / "a"
    round2 = json.loads((folder / "round_2" / "erase" / "run.json").read_text())["config"]
    assert round2["prompt"] == token_name(0) and round2["negative_guidance"] == 0.0
    assert round2["unet_ckpt_path"] == str(folder / "round_1" / "erase" / "unet.pth")  # the UNet is never reset
    reo = json.loads((folder / "reo" / "run.json").read_text())["config"]
    assert reo["prompt"] == f"nudity,{token_name(0)},{token_name(1)}" and reo["unet_ckpt_path"] is None
    unet = UNet2DConditionModel.from_pretrained(tiny_stack.sd_path / "unet")
    unet.load_state_dict(torch.load(final, weights_only=True), strict=True)

    # the learned tokens are real vocabulary entries with their own states
    text = text_with_tokens(_config(tiny_stack, reference_images, folder), sorted((folder / "tokens").glob("*")),
                            torch.device("cpu"), torch.float32)
    ids = text.tokenizer(token_name(1)).input_ids
    assert len(ids) == 3 and ids[1] == len(text.tokenizer) - 1
    assert not torch.allclose(text.encode(token_name(0)), text.encode(token_name(1)))

    # interrupted after round 1: the rerun keeps round 1 and ends with the same weights
    part = tmp_path / "b"
    train_stereo(_config(tiny_stack, reference_images, part, rounds=2))
    import shutil

    shutil.rmtree(part / "round_2"), shutil.rmtree(part / "reo"), (part / "tokens" / "stereo-2.safetensors").unlink()
    kept = (part / "round_1" / "erase" / "unet.pth").stat().st_mtime_ns
    resumed = train_stereo(_config(tiny_stack, reference_images, part, resume=True))
    assert (part / "round_1" / "erase" / "unet.pth").stat().st_mtime_ns == kept
    a, b = torch.load(final, weights_only=True), torch.load(resumed, weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)

    with pytest.raises(CoErasingError, match="already holds a STEREO run"):
        train_stereo(_config(tiny_stack, reference_images, part))
    with pytest.raises(CoErasingError, match="other settings"):
        train_stereo(_config(tiny_stack, reference_images, part, resume=True, reo_lr=2e-3))

"""STEREO on the tiny stack: the REO target, the rounds chain, resume between rounds, a plain UNet out."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from coerasing.errors import CoErasingError
from coerasing.methods import get_method
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


def test_a_shared_search_gives_the_weights_of_a_run_from_scratch(tiny_stack, reference_images, tmp_path):
    """A run that takes its rounds from a search-only folder trains the REO a run from scratch trains."""
    full = train_stereo(_config(tiny_stack, reference_images, tmp_path / "full", reo_lr=2e-3))
    searched = train_stereo(_config(tiny_stack, reference_images, tmp_path / "search"), search_only=True)
    assert searched == tmp_path / "search" and not (searched / "reo").exists()
    assert json.loads((searched / "run.json").read_text())["status"] == "searched"
    shared = train_stereo(_config(tiny_stack, reference_images, tmp_path / "shared", reo_lr=2e-3),
                          search_from=searched)
    assert sorted(p.name for p in (tmp_path / "shared" / "tokens").iterdir()) == ["stereo-1.safetensors",
                                                                                  "stereo-2.safetensors"]
    assert not list((tmp_path / "shared").glob("*.partial"))
    a, b = torch.load(full, weights_only=True), torch.load(shared, weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


class _Context:
    """The trace context of compare.py, cut to what STEREO's trace reads; ``once`` runs work once per folder."""

    def __init__(self, root, presets) -> None:
        self.concept, self.seed, self.device, self.root, self.presets = "circle", 0, "cpu", root, presets
        self.done: set = set()

    def preset(self, name):
        return self.presets.get(name, {})

    def world(self):
        return {"ckpt_path": "base", "ip_adapter": "ip", "image_encoder_path": "enc"}

    def references(self):
        return self.root / "references"

    def run_folder(self, kind, settings):
        return self.root / kind / hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

    def once(self, folder, request, work):
        if folder not in self.done:
            work()
            self.done.add(folder)


def test_tuning_candidates_that_differ_only_in_reo_share_one_search(tmp_path, monkeypatch):
    from coerasing.methods import stereo

    calls = []

    def fake_train(config, search_only=False, search_from=None):
        calls.append((Path(config.save_path).parent.name, config.reo_lr, search_only, search_from))
        return Path(config.save_path)

    monkeypatch.setattr(stereo, "train_stereo", fake_train)
    block = {"rounds": 2, "reo_iterations": 4, "reo_save_iter": 2}
    context = _Context(tmp_path, {"stereo": block})
    for lr in (1e-4, 5e-5):
        context.presets["stereo"] = {**block, "reo_lr": lr}
        points = get_method("stereo").trace(context)
        assert [p.label for p in points] == ["reo2", "reo4"]
    context.presets["stereo"] = {**block, "ste_lr": 1e-3}  # another search
    get_method("stereo").trace(context)
    searches = [call for call in calls if call[2]]
    assert len(searches) == 2 and searches[0][1] == StereoConfig().reo_lr  # REO's settings are not the search's
    runs = [call for call in calls if not call[2]]
    assert [call[0] for call in runs] == ["stereo"] * 3 and runs[0][3] == runs[1][3] != runs[2][3]
    assert runs[0][3].parent.name == "stereo_search" and [call[1] for call in runs[:2]] == [1e-4, 5e-5]

"""``make demo`` end to end on the shipped toy-world model: Co-Erasing must erase the concept and keep the rest.

This is the issue's acceptance test; it runs the demo's real command lines (about 5 minutes on a
2-core CPU) and checks the measured numbers against fixed bars (never tuned to pass).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

import erase_pipeline
from coerasing.cli import parse_with_config
from coerasing.config import EraseConfig
from coerasing.toy import TOY_GUIDANCE, TOY_MODEL_DIR
from coerasing.toy.demo import REPO_ROOT, demo_commands, run_demo


def test_shipped_model_loads_in_plain_diffusers_and_states_its_quality():
    pipe = StableDiffusionPipeline.from_pretrained(str(TOY_MODEL_DIR), safety_checker=None,
                                                   requires_safety_checker=False)
    assert pipe.unet.dtype == torch.float32 and pipe.unet.config.sample_size * pipe.vae_scale_factor == 32
    quality = json.loads((TOY_MODEL_DIR / "quality.json").read_text())
    assert quality["budget"] == "full" and quality["seed"] == 0
    assert set(quality["quality"]["targets"]) == {"explicit_shape", "explicit_colour", "implicit_shape",
                                                  "ip_adapter_shape"}
    # The shipped measurement is at the toy world's default guidance, and it meets every target.
    assert quality["quality"]["settings"]["guidance_scale"] == TOY_GUIDANCE == quality["plan"]["eval_guidance"]
    assert quality["quality"]["all_passed"]
    size = sum(f.stat().st_size for f in TOY_MODEL_DIR.rglob("*") if f.is_file())
    assert size <= 25 * 2**20


def test_demo_presets_chain_stage_1_into_stage_2(tmp_path):
    commands = demo_commands(tmp_path, python=sys.executable)
    parser = erase_pipeline.build_parser()
    text = parse_with_config(parser, commands[1][2:], EraseConfig)
    image = parse_with_config(parser, commands[2][2:], EraseConfig)
    assert text.modality == "text" and image.modality == "image"
    assert image.unet_ckpt_path == str(Path(text.save_path) / "unet.pth")
    assert image.prompt == text.prompt and image.text_guide and image.text_uncond
    assert all((REPO_ROOT / c).is_file() for c in ("configs/toy/circle_text.yaml", "configs/toy/circle_image.yaml"))


@pytest.mark.slow(minutes=4)
def test_demo_erases_the_concept_and_keeps_unrelated_prompts(tmp_path):
    report = json.loads(run_demo(tmp_path / "demo").read_text())
    base, text, image = (report["models"][name] for name in ("base", "text", "image"))
    print(json.dumps(report["models"], indent=1))
    assert base["target_rate_explicit"] >= 0.7  # the base model does draw the concept
    assert image["target_rate_explicit"] < 0.5 * base["target_rate_explicit"]
    assert image["unrelated_accuracy"] >= base["unrelated_accuracy"] - 0.15
    assert Path(report["grid"]).is_file()
    assert (tmp_path / "demo" / "checkpoints" / "image" / "run.json").is_file()

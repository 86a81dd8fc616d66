"""The YAML presets in configs/ parse into valid configs, and the command line overrides them."""

from __future__ import annotations

import pytest

import erase_pipeline
from coerasing.cli import parse_with_config
from coerasing.config import EraseConfig, safe_name

from .conftest import REPO_ROOT

PRESETS = sorted((REPO_ROOT / "configs").glob("*.yaml"))


def test_every_concept_has_both_stages():
    names = {p.stem for p in PRESETS}
    for concept in ("nudity", "vangogh", "church", "parachute", "tench", "garbage_truck"):
        assert {f"{concept}_text", f"{concept}_image"} <= names


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_is_valid_and_chains_stage_1_into_stage_2(preset):
    config = parse_with_config(erase_pipeline.build_parser(), ["--config", str(preset)], EraseConfig)
    assert config.iterations == 1000 and config.lr == 1e-5 and config.negative_guidance == 1.0
    if config.modality == "image":
        stage1 = EraseConfig(prompt=config.prompt, train_method="noxattn").run_folder() / "unet.pth"
        assert config.unet_ckpt_path == stage1.as_posix()
        assert config.image == f"generation_dataset/{safe_name(config.prompt)}"
        assert config.text_uncond and config.text_guide == config.prompt and config.blur_factor == 3


def test_command_line_overrides_yaml():
    preset = REPO_ROOT / "configs" / "nudity_image.yaml"
    config = parse_with_config(
        erase_pipeline.build_parser(), ["--config", str(preset), "--iterations", "7", "--blur_factor", "0"], EraseConfig
    )
    assert config.iterations == 7 and config.blur_factor == 0 and config.image_number == 100

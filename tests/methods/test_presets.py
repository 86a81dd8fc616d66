"""Every baseline preset in configs/ names its method and parses into that method's config."""

from __future__ import annotations

import pytest
import yaml

from coerasing.flags import check_fields, read_yaml_config
from coerasing.methods import get_method

from ..conftest import REPO_ROOT

PRESETS = sorted(p for folder in ("cpe", "stereo", "gie") for p in (REPO_ROOT / "configs" / folder).glob("*.yaml"))


def test_presets_cover_toy_shapes_nudity_van_gogh_and_objects():
    names = {(p.parent.name, p.stem) for p in PRESETS}
    for method in ("cpe", "stereo", "gie"):
        for concept in ("nudity", "vangogh", "church", "garbage_truck", "parachute", "tench"):
            assert (method, concept) in names
    for method in ("cpe", "stereo", "gie"):
        for shape in ("circle", "square", "triangle", "star", "cross"):
            assert (method, f"toy_{shape}") in names, (method, shape)


@pytest.mark.parametrize("preset", PRESETS, ids=[f"{p.parent.name}/{p.stem}" for p in PRESETS])
def test_preset_parses_into_its_methods_config(preset):
    method = yaml.safe_load(preset.read_text())["method"]
    assert method == preset.parent.name
    cls = get_method(method).config_class
    config = cls(**read_yaml_config(str(preset), cls, ignore_keys=("method",)))
    check_fields(config)  # types and ranges (paths such as --image need files a fresh clone does not have)

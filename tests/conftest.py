"""Shared fixtures: the tiny offline SD stack, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_stack(tmp_path_factory):
    from coerasing.testing import build_tiny_stack

    return build_tiny_stack(tmp_path_factory.mktemp("tiny_stack"))


@pytest.fixture(scope="session")
def reference_images(tmp_path_factory) -> Path:
    from coerasing.testing import make_reference_images

    folder = tmp_path_factory.mktemp("reference_images")
    make_reference_images(folder, 6)
    return folder

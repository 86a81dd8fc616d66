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


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread_per_test_process():
    """One intra-op thread for the whole run: on a small shared CPU, OpenMP threads competing with other
    processes slow the tiny models down by orders of magnitude, and results then do not depend on the
    machine's core count. Subprocesses started by tests set OMP_NUM_THREADS=1 themselves."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory) -> Path:
    """A random 5-class ResNet with a PIL image processor, saved like a Hub model folder."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification
    from transformers.models.convnext import ConvNextImageProcessorPil

    folder = tmp_path_factory.mktemp("classifier")
    labels = {0: "tench", 1: "church", 2: "parachute", 3: "vincent-van-gogh", 4: "other"}
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1], layer_type="basic", num_labels=5,
                          id2label=labels, label2id={v: k for k, v in labels.items()})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ResNetForImageClassification(config).save_pretrained(folder)
    ConvNextImageProcessorPil(size={"shortest_edge": 32}, crop_pct=0.875).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def reference_images(tmp_path_factory) -> Path:
    from coerasing.testing import make_reference_images

    folder = tmp_path_factory.mktemp("reference_images")
    make_reference_images(folder, 6)
    return folder


def _expected_minutes(item: pytest.Item) -> float:
    """The rough duration a test declares with ``@pytest.mark.slow(minutes=N)``; other slow tests 0.5, the rest 0."""
    marker = item.get_closest_marker("slow")
    return 0.0 if marker is None else float(marker.kwargs.get("minutes", 0.5))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest tests first (a stable sort: collection order otherwise). ``make test`` hands whole modules to
    its parallel workers in this order, so the few minute-long end-to-end tests start at once on
    different workers instead of finishing last on one."""
    items.sort(key=lambda item: -_expected_minutes(item))

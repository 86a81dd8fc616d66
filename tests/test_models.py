"""Device parsing (with CUDA mocked) and model-path checks."""

from __future__ import annotations

import pytest
import torch

from coerasing.errors import CoErasingError
from coerasing.models import check_mixed_precision, check_model_path, is_hub_id, parse_device, parse_devices


@pytest.fixture()
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_two_devices_split_frozen_and_trained(two_gpus):
    assert parse_devices("0,1") == (torch.device("cuda", 0), torch.device("cuda", 1))
    assert parse_devices("1") == (torch.device("cuda", 1), torch.device("cuda", 1))
    assert parse_devices("cuda:1, cpu") == (torch.device("cuda", 1), torch.device("cpu"))
    assert parse_devices(None) == (torch.device("cuda:0"), torch.device("cuda:0"))


def test_missing_gpus_and_bad_specs(two_gpus):
    with pytest.raises(CoErasingError, match="asks for GPU 2"):
        parse_devices("0,2")
    with pytest.raises(CoErasingError, match="one or two devices"):
        parse_devices("0,1,0")
    with pytest.raises(CoErasingError, match="not a device"):
        parse_devices("gpu0")
    with pytest.raises(CoErasingError, match="several devices"):
        parse_device("0,1")


def test_cpu_only_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert parse_devices(None) == (torch.device("cpu"), torch.device("cpu"))
    assert parse_devices("cpu") == (torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(CoErasingError, match="sees no CUDA GPU"):
        parse_devices("0")
    with pytest.raises(CoErasingError, match="fp16 needs a GPU"):
        check_mixed_precision("fp16", (torch.device("cpu"),))
    check_mixed_precision("bf16", (torch.device("cpu"),))


def test_model_paths(tmp_path):
    assert is_hub_id("CompVis/stable-diffusion-v1-4") and is_hub_id("h94/IP-Adapter/models/image_encoder")
    assert not is_hub_id("./local/folder") and not is_hub_id("/abs/path") and not is_hub_id("plainname")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CoErasingError, match="is a file"):
        check_model_path(str(tmp_path / "file.txt"))
    with pytest.raises(CoErasingError, match="neither a local folder"):
        check_model_path(str(tmp_path / "missing"))
    check_model_path(str(tmp_path))

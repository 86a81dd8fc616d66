"""Checkpoints: atomic writes, strict plain-UNet state dicts, clear errors on mismatches."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from coerasing import checkpoints as ckpt
from coerasing import files, formats
from coerasing.ip_adapter import attach_ip_adapter, load_ip_adapter_state_dict


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "unet.pth"
    target.write_text("old")

    def failing(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        files.atomic_write(target, failing)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["unet.pth"]


def test_saved_unet_loads_strictly_into_a_plain_pipeline_and_generates(tiny_stack, tmp_path):
    unet = UNet2DConditionModel.from_pretrained(tiny_stack.sd_path / "unet")
    attach_ip_adapter(unet, load_ip_adapter_state_dict(str(tiny_stack.ip_adapter_bin)))
    with torch.no_grad():
        unet.conv_in.weight.add_(0.5)
    path = formats.save_unet(unet, tmp_path / "unet.pth", list(unet.state_dict()))
    state = torch.load(path, weights_only=True)
    assert all(t.device.type == "cpu" for t in state.values())
    assert not any("_ip" in key for key in state)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_stack.sd_path, safety_checker=None)
    pipe.unet.load_state_dict(torch.load(path, weights_only=True), strict=True)
    assert torch.equal(pipe.unet.conv_in.weight, unet.conv_in.weight)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    assert formats.load_unet_checkpoint_into(pipe.unet, path) == formats.FULL_TORCH


def test_run_json_records_versions(tmp_path):
    import json

    ckpt.write_run_json(tmp_path, {"seed": 3})
    data = json.loads((tmp_path / "run.json").read_text())
    assert data["config"] == {"seed": 3}
    assert data["versions"]["torch"].startswith("2.") and "diffusers" in data["versions"]


def test_atomic_files_get_normal_permissions(tmp_path):
    import os

    path = files.atomic_write_text(tmp_path / "x.txt", "hi")
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask

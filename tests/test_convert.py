"""``python -m coerasing.convert``: round trips between formats, ESD partial + base → full, and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from coerasing import formats
from coerasing.convert import convert_checkpoint
from coerasing.errors import CoErasingError
from coerasing.models import load_unet

REPO_ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def _assert_same(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def _read(path: Path, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return formats.detect_and_load(path, base).state_dict


@pytest.fixture(scope="module")
def base(tiny_stack) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in load_unet(str(tiny_stack.sd_path), CPU).state_dict().items()}


@pytest.fixture(scope="module")
def erased(base) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return {key: value + 0.01 * torch.randn(value.shape, generator=generator) for key, value in base.items()}


@pytest.fixture(scope="module")
def esd_partial(tmp_path_factory, erased) -> tuple[Path, list[str]]:
    """An ESD-style release: only the cross-attention k/v weights, as .safetensors."""
    keys = [key for key in erased if ".attn2.to_k." in key or ".attn2.to_v." in key]
    path = tmp_path_factory.mktemp("esd") / "esd-nudity_from_nudity-xattn.safetensors"
    save_file({key: erased[key].contiguous() for key in keys}, str(path))
    return path, keys


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "coerasing.convert", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_round_trip_pth_safetensors_diffusers_pth(tiny_stack, tmp_path, base, erased):
    sd = str(tiny_stack.sd_path)
    start = tmp_path / "unet.pth"
    torch.save(erased, start)
    found, st = convert_checkpoint(start, tmp_path / "unet.safetensors", "safetensors", sd)
    assert found == formats.FULL_TORCH
    found, folder = convert_checkpoint(st, tmp_path / "unet_diffusers", "diffusers", sd)
    assert found == formats.FULL_SAFETENSORS
    _assert_same(UNet2DConditionModel.from_pretrained(folder).state_dict(), erased)
    # A diffusers folder carries its own config: no --ckpt_path needed (and no Hub access).
    found, end = convert_checkpoint(folder, tmp_path / "again.pth", "pth")
    assert found == formats.UNET_FOLDER
    plain = torch.load(end, map_location="cpu", weights_only=True)
    _assert_same(plain, erased)
    for path in (st, folder):
        _assert_same(_read(path, base), erased)


def test_esd_partial_plus_base_gives_full_unet(tiny_stack, tmp_path, base, erased, esd_partial):
    path, keys = esd_partial
    found, out = convert_checkpoint(path, tmp_path / "esd_full.pth", "pth", str(tiny_stack.sd_path))
    assert found == f"ESD partial safetensors (overlay of {len(keys)} tensors)"
    full = torch.load(out, map_location="cpu", weights_only=True)
    _assert_same(full, {key: erased[key] if key in keys else base[key] for key in base})
    unet = load_unet(str(tiny_stack.sd_path), CPU)
    unet.load_state_dict(full, strict=True)


def test_released_checkpoint_converts_without_ip_adapter_keys(tiny_stack, tmp_path, base, erased):
    released = dict(erased)
    released["mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_k_ip.0.weight"] = torch.zeros(2, 2)
    torch.save(released, tmp_path / "released.pth")
    with pytest.warns(UserWarning, match="dropped 1 IP-Adapter keys"):
        found, out = convert_checkpoint(tmp_path / "released.pth", tmp_path / "clean.safetensors", "safetensors",
                                        str(tiny_stack.sd_path))
    assert found == "released Co-Erasing (dropped 1 IP-Adapter keys)"
    _assert_same(_read(out, base), erased)


def test_refuses_existing_output_and_input_as_output(tiny_stack, tmp_path, erased):
    sd = str(tiny_stack.sd_path)
    path = tmp_path / "unet.pth"
    torch.save(erased, path)
    (tmp_path / "taken.safetensors").write_bytes(b"x")
    with pytest.raises(CoErasingError, match="already exists; pass --overwrite"):
        convert_checkpoint(path, tmp_path / "taken.safetensors", "safetensors", sd)
    convert_checkpoint(path, tmp_path / "taken.safetensors", "safetensors", sd, overwrite=True)
    with pytest.raises(CoErasingError, match="is the input"):
        convert_checkpoint(path, path, "pth", sd, overwrite=True)
    with pytest.raises(CoErasingError, match="writes a folder"):
        convert_checkpoint(path, tmp_path / "taken.safetensors", "diffusers", sd, overwrite=True)


def test_cli_converts_esd_partial_to_diffusers(tiny_stack, tmp_path, base, erased, esd_partial):
    path, keys = esd_partial
    out = tmp_path / "esd_unet"
    result = _cli(str(path), str(out), "--to", "diffusers", "--ckpt_path", str(tiny_stack.sd_path))
    assert result.returncode == 0, result.stderr
    assert "ESD partial safetensors" in result.stdout
    _assert_same(
        UNet2DConditionModel.from_pretrained(out).state_dict(),
        {key: erased[key] if key in keys else base[key] for key in base},
    )


def test_cli_bad_input_is_a_clean_error(tiny_stack, tmp_path):
    path = tmp_path / "compvis.ckpt"
    torch.save({"model.diffusion_model.out.2.weight": torch.zeros(4, 320, 3, 3)}, path)
    result = _cli(str(path), str(tmp_path / "out.pth"), "--to", "pth", "--ckpt_path", str(tiny_stack.sd_path))
    assert result.returncode == 2
    assert "error:" in result.stderr and "CompVis" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.pth").exists()

"""UNet checkpoint formats: each accepted format loads to the weights it was made from; bad inputs fail clearly."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from coerasing import formats
from coerasing.config import parse_save_formats
from coerasing.errors import CoErasingError
from coerasing.ip_adapter import attach_ip_adapter, load_ip_adapter_state_dict
from coerasing.models import load_unet

CPU = torch.device("cpu")


def _esd_keys(state: dict[str, torch.Tensor]) -> list[str]:
    """The parameters ESD's ``xattn`` method trains: cross-attention keys and values."""
    return [key for key in state if ".attn2.to_k." in key or ".attn2.to_v." in key]


def _assert_same(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


@pytest.fixture(scope="module")
def base(tiny_stack) -> dict[str, torch.Tensor]:
    """The base UNet's weights (what --ckpt_path gives)."""
    return {key: value.clone() for key, value in load_unet(str(tiny_stack.sd_path), CPU).state_dict().items()}


@pytest.fixture(scope="module")
def erased(base) -> dict[str, torch.Tensor]:
    """A full state dict that differs from the base in every tensor (a stand-in for erased weights)."""
    generator = torch.Generator().manual_seed(1)
    return {
        key: value + 0.01 * torch.randn(value.shape, generator=generator) if value.is_floating_point() else value
        for key, value in base.items()
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("formats")


def _erased_unet(tiny_stack, erased) -> UNet2DConditionModel:
    unet = load_unet(str(tiny_stack.sd_path), CPU)
    unet.load_state_dict(erased, strict=True)
    return unet


# ----------------------------------------------------------------------------------------------
# Accepted formats


@pytest.mark.parametrize("name", ["unet.pth", "ESD-nudity-UNET.pt", "pytorch_model.bin"])
def test_full_torch_state_dict(files, base, erased, name):
    path = files / name
    torch.save(erased, path)
    loaded = formats.detect_and_load(path, base)
    assert loaded.format == formats.FULL_TORCH
    _assert_same(loaded.state_dict, erased)


def test_wrapped_state_dict(files, base, erased):
    path = files / "wrapped.pt"
    torch.save({"state_dict": erased, "global_step": 7}, path)
    loaded = formats.detect_and_load(path, base)
    assert loaded.format.startswith(formats.FULL_TORCH) and "unwrapped" in loaded.format
    _assert_same(loaded.state_dict, erased)


def test_released_coerasing_drops_ip_adapter_keys(tiny_stack, files, base, erased):
    unet = _erased_unet(tiny_stack, erased)
    handle = attach_ip_adapter(unet, load_ip_adapter_state_dict(str(tiny_stack.ip_adapter_bin)))
    unet.set_attn_processor(dict(handle.image_processors))
    released = unet.state_dict()
    ip_keys = [key for key in released if formats.is_ip_adapter_key(key)]
    assert ip_keys and any(key.endswith("attn2.processor.to_k_ip.0.weight") for key in ip_keys)
    path = files / "released.pth"
    torch.save(released, path)
    with pytest.warns(UserWarning, match=f"dropped {len(ip_keys)} IP-Adapter keys"):
        loaded = formats.detect_and_load(path, base)
    assert loaded.format == f"released Co-Erasing (dropped {len(ip_keys)} IP-Adapter keys)"
    _assert_same(loaded.state_dict, erased)


def test_esd_partial_safetensors_overlays_base(files, base, erased):
    keys = _esd_keys(base)
    path = files / "esd-nudity.safetensors"
    save_file({key: erased[key].contiguous() for key in keys}, str(path))
    loaded = formats.detect_and_load(path, base)
    assert loaded.format == f"ESD partial safetensors (overlay of {len(keys)} tensors)"
    expected = {key: erased[key] if key in keys else base[key] for key in base}
    _assert_same(loaded.state_dict, expected)


def test_esd_partial_in_half_precision_takes_base_dtype(files, base, erased):
    keys = _esd_keys(base)
    path = files / "esd-fp16.safetensors"
    save_file({key: erased[key].half().contiguous() for key in keys}, str(path))
    state = formats.detect_and_load(path, base).state_dict
    assert {value.dtype for value in state.values()} == {torch.float32}
    assert torch.equal(state[keys[0]], erased[keys[0]].half().float())


def test_full_safetensors(files, base, erased):
    path = files / "full.safetensors"
    save_file({key: value.contiguous() for key, value in erased.items()}, str(path))
    loaded = formats.detect_and_load(path, base)
    assert loaded.format == formats.FULL_SAFETENSORS
    _assert_same(loaded.state_dict, erased)


def test_container_is_told_from_content_not_name(files, base, erased):
    path = files / "misnamed.pth"
    save_file({key: value.contiguous() for key, value in erased.items()}, str(path))
    assert formats.detect_and_load(path, base).format == formats.FULL_SAFETENSORS


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_diffusers_unet_folder(tiny_stack, files, base, erased, safe):
    folder = files / f"unet_folder_{safe}"
    _erased_unet(tiny_stack, erased).save_pretrained(folder, safe_serialization=safe)
    loaded = formats.detect_and_load(folder, base)
    assert loaded.format == formats.UNET_FOLDER
    _assert_same(loaded.state_dict, erased)


def test_diffusers_pipeline_folder(tiny_stack, base):
    loaded = formats.detect_and_load(tiny_stack.sd_path, base)
    assert loaded.format == formats.PIPELINE_FOLDER
    _assert_same(loaded.state_dict, base)


def test_load_unet_checkpoint_into_loads_strictly_and_logs(tiny_stack, files, base, erased, caplog):
    keys = _esd_keys(base)
    path = files / "esd-into.safetensors"
    save_file({key: erased[key].contiguous() for key in keys}, str(path))
    unet = load_unet(str(tiny_stack.sd_path), CPU)
    with caplog.at_level(logging.INFO, logger="coerasing.formats"):
        description = formats.load_unet_checkpoint_into(unet, path)
    assert description.startswith("ESD partial safetensors")
    assert description in caplog.text
    _assert_same(unet.state_dict(), {key: erased[key] if key in keys else base[key] for key in base})

    torch.save(erased, files / "into.pth")
    assert formats.load_unet_checkpoint_into(unet, files / "into.pth") == formats.FULL_TORCH
    _assert_same(unet.state_dict(), erased)


# ----------------------------------------------------------------------------------------------
# Rejected inputs


class _RunsCode:
    """An object whose unpickling would create a folder (it must never be unpickled)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def _reject(path: Path, base: dict[str, torch.Tensor], *fragments: str) -> str:
    with pytest.raises(CoErasingError) as info:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            formats.detect_and_load(path, base, flag="--unet_ckpt_path")
    message = str(info.value)
    assert str(path) in message and "Accepted" in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_rejects_compvis_layout(files, base):
    path = files / "compvis.ckpt"
    torch.save(
        {"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2), "global_step": torch.ones(1)}},
        path,
    )
    _reject(path, base, "CompVis", "model.diffusion_model.input_blocks.0.0.weight", "from_single_file")


def test_rejects_wrong_shape(files, base, erased):
    key = _esd_keys(base)[0]
    state = dict(erased)
    state[key] = torch.zeros(3, 5)
    path = files / "wrong_shape.pth"
    torch.save(state, path)
    _reject(path, base, "wrong shape", key, "(3, 5)")


def test_rejects_pickle_with_other_objects(files, base):
    path = files / "objects.pt"
    torch.save({"a": 1, "b": "x"}, path)
    _reject(path, base, "non-tensor", "a (int)", "b (str)")


def test_never_runs_pickled_code(files, base):
    marker = files / "pwned"
    path = files / "code.pt"
    torch.save({"weight": _RunsCode(marker)}, path)
    _reject(path, base, "pickles objects other than tensors", "mkdir")
    assert not marker.exists()


def test_rejects_partial_pth_naming_missing_keys(files, base, erased):
    keys = _esd_keys(base)
    path = files / "partial.pth"
    torch.save({key: erased[key] for key in keys}, path)
    missing = [key for key in base if key not in keys]
    _reject(path, base, f"{len(missing)} of the base UNet's {len(base)} keys missing", missing[0], ".safetensors")


def test_rejects_unknown_key_in_partial_safetensors(files, base, erased):
    keys = _esd_keys(base)
    tensors = {key: erased[key].contiguous() for key in keys}
    tensors["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q_lora.weight"] = torch.zeros(4, 4)
    path = files / "unknown.safetensors"
    save_file(tensors, str(path))
    _reject(path, base, "1 keys that are not base UNet parameters", "to_q_lora")


def test_rejects_missing_file(files, base):
    with pytest.raises(CoErasingError, match="does not exist"):
        formats.detect_and_load(files / "no_such.pth", base)


def test_rejects_ip_adapter_file(tiny_stack, base):
    _reject(tiny_stack.ip_adapter_bin, base, "IP-Adapter weight file")
    _reject(tiny_stack.ip_adapter_safetensors, base, "IP-Adapter weight file")


def test_rejects_garbage_and_empty_folder(files, base):
    garbage = files / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    _reject(garbage, base, "neither a PyTorch file")
    folder = files / "empty_folder"
    folder.mkdir()
    _reject(folder, base, "without config.json")


def test_rejects_non_unet_diffusers_folder(tiny_stack, base):
    _reject(tiny_stack.sd_path / "vae", base, "AutoencoderKL")


# ----------------------------------------------------------------------------------------------
# Saving


def test_parse_save_formats():
    assert parse_save_formats("pth") == ["pth"]
    assert parse_save_formats(" PTH, safetensors,pth ") == ["pth", "safetensors"]
    assert parse_save_formats("pth,safetensors,diffusers") == list(formats.SAVE_FORMATS)
    with pytest.raises(CoErasingError, match="unknown format.*ckpt.*Accepted"):
        parse_save_formats("pth,ckpt")
    with pytest.raises(CoErasingError, match="no format"):
        parse_save_formats(" , ")


def test_save_formats_round_trip(tiny_stack, tmp_path, base, erased):
    unet = _erased_unet(tiny_stack, erased)
    written = formats.save_formats(unet, tmp_path, list(formats.SAVE_FORMATS), None)
    assert [path.name for path in written] == ["unet.pth", "unet.safetensors", "unet_diffusers"]
    descriptions = [formats.detect_and_load(path, base) for path in written]
    assert [loaded.format for loaded in descriptions] == [
        formats.FULL_TORCH,
        formats.FULL_SAFETENSORS,
        formats.UNET_FOLDER,
    ]
    for loaded in descriptions:
        _assert_same(loaded.state_dict, erased)
    reloaded = UNet2DConditionModel.from_pretrained(written[2])
    _assert_same(reloaded.state_dict(), erased)
    plain = torch.load(written[0], map_location="cpu", weights_only=True)
    unet.load_state_dict(plain, strict=True)

    # Writing again replaces the folder atomically and leaves no temporary file behind.
    formats.save_formats(base, tmp_path, ["diffusers"], dict(unet.config))
    _assert_same(formats.detect_and_load(tmp_path / "unet_diffusers", base).state_dict, base)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["unet.pth", "unet.safetensors", "unet_diffusers"]


def test_save_formats_drops_ip_adapter_keys_and_needs_config(tiny_stack, tmp_path, base, erased):
    unet = _erased_unet(tiny_stack, erased)
    handle = attach_ip_adapter(unet, load_ip_adapter_state_dict(str(tiny_stack.ip_adapter_bin)))
    unet.set_attn_processor(dict(handle.image_processors))
    (path,) = formats.save_formats(unet, tmp_path, ["safetensors"], None, name="unet_10")
    assert path.name == "unet_10.safetensors"
    assert formats.detect_and_load(path, base).format == formats.FULL_SAFETENSORS
    with pytest.raises(CoErasingError, match="needs the UNet's config"):
        formats.save_formats(base, tmp_path, ["diffusers"], None)


def test_rejects_truncated_file(files, base, erased):
    torch.save(erased, files / "whole.pth")
    path = files / "truncated.pth"
    path.write_bytes((files / "whole.pth").read_bytes()[:5000])
    _reject(path, base, "could not be read", "truncated")

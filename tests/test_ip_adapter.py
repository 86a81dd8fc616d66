"""IP-Adapter wiring: diffusers' loader, image branch only where asked, nothing saved."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from coerasing.errors import CoErasingError
from coerasing.ip_adapter import attach_ip_adapter, load_ip_adapter_state_dict, resolve_ip_adapter_file, unet_noise_pred


@pytest.fixture()
def unets(tiny_stack):
    plain = UNet2DConditionModel.from_pretrained(tiny_stack.sd_path / "unet").eval()
    wired = UNet2DConditionModel.from_pretrained(tiny_stack.sd_path / "unet").eval()
    handle = attach_ip_adapter(wired, load_ip_adapter_state_dict(str(tiny_stack.ip_adapter_bin)))
    return plain, wired, handle


def _inputs(unet, seed=0):
    generator = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    latents = torch.randn(1, unet.config.in_channels, size, size, generator=generator)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    return latents, torch.tensor([500]), text


@torch.no_grad()
def test_text_only_call_equals_the_plain_unet_exactly(unets):
    plain, wired, _ = unets
    latents, t, text = _inputs(plain)
    assert torch.equal(unet_noise_pred(wired, latents, t, text), plain(latents, t, encoder_hidden_states=text).sample)


@torch.no_grad()
def test_image_branch_changes_the_output_and_is_switched_off_after(unets):
    plain, wired, handle = unets
    latents, t, text = _inputs(plain)
    tokens = handle.project(torch.randn(1, 24))
    assert tokens.shape == (1, 4, plain.config.cross_attention_dim)
    with_image = unet_noise_pred(wired, latents, t, text, tokens, handle)
    assert not torch.allclose(with_image, plain(latents, t, encoder_hidden_states=text).sample)
    # after the image call, text-only calls are plain again
    assert torch.equal(unet_noise_pred(wired, latents, t, text), plain(latents, t, encoder_hidden_states=text).sample)


@torch.no_grad()
def test_released_code_bug_is_real(unets):
    """With IP processors installed, a bare 77-token call routes the last 4 tokens to the image branch."""
    plain, wired, handle = unets
    latents, t, text = _inputs(plain)
    with handle.image_branch():
        leaked = wired(latents, t, encoder_hidden_states=text).sample
    assert not torch.allclose(leaked, plain(latents, t, encoder_hidden_states=text).sample)


def test_state_dict_and_parameters_have_no_ip_adapter_keys(unets):
    plain, wired, handle = unets
    assert list(wired.state_dict()) == list(plain.state_dict())
    assert not any("_ip" in name or "encoder_hid_proj" in name for name, _ in wired.named_parameters())
    assert wired.encoder_hid_proj is None and wired.config.encoder_hid_dim_type is None
    assert not any(p.requires_grad for p in handle.image_proj.parameters())


def test_bin_and_safetensors_layouts_load_the_same(tiny_stack):
    nested = load_ip_adapter_state_dict(str(tiny_stack.ip_adapter_bin))
    flat = load_ip_adapter_state_dict(str(tiny_stack.ip_adapter_safetensors))
    assert nested.keys() == flat.keys()
    for group in nested:
        assert nested[group].keys() == flat[group].keys()
        assert all(torch.equal(nested[group][k], flat[group][k]) for k in nested[group])


def test_folder_spec_finds_the_h94_file(tiny_stack):
    assert resolve_ip_adapter_file(str(tiny_stack.ip_adapter_dir)) == tiny_stack.ip_adapter_bin


def test_bad_ip_adapter_files(tmp_path):
    not_ip = tmp_path / "other.bin"
    torch.save({"weight": torch.zeros(2)}, not_ip)
    with pytest.raises(CoErasingError, match="no 'image_proj'"):
        load_ip_adapter_state_dict(str(not_ip))
    with pytest.raises(CoErasingError, match="neither a file nor a folder"):
        load_ip_adapter_state_dict(str(tmp_path / "missing.bin"))

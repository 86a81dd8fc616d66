"""Tests for the shipped CLIP tokenizer and the tiny offline SD-1.x stack builder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from coerasing.testing import (
    CLIP_TOKENIZER_DIR,
    TinyStack,
    build_tiny_stack,
    load_clip_tokenizer,
    make_reference_images,
    tiny_unet_config,
)

# Ids checked against open_clip 3.3.0's pure-python ``SimpleTokenizer`` (OpenAI CLIP's BPE).
KNOWN_IDS = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "a painting in the style of Van Gogh": [
        49406, 320, 3086, 530, 518, 1844, 539, 2451, 19697, 49407,
    ],
    "Hello, world!": [49406, 3306, 267, 1002, 256, 49407],
    "what's up? it's 5 o'clock.": [
        49406, 768, 568, 705, 286, 585, 568, 276, 334, 262, 6716, 269, 49407,
    ],
    "pneumonoultramicroscopicsilicovolcanoconiosis": [
        49406, 28714, 749, 20253, 9800, 535, 532, 1065, 901, 1556, 13697, 9916, 78, 39031, 13903,
        49407,
    ],
    "café naïve résumé façade": [
        49406, 15304, 1097, 35689, 563, 29106, 7054, 4166, 778, 10067, 1928, 49407,
    ],
}


@pytest.fixture(scope="module", autouse=True)
def _offline() -> Iterator[None]:
    """Everything here must work without a model hub."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> TinyStack:
    """One tiny stack shared by the tests of this module."""
    return build_tiny_stack(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def reference_image(tmp_path_factory: pytest.TempPathFactory) -> Image.Image:
    """A small RGB image for the IP-Adapter branch."""
    path = make_reference_images(tmp_path_factory.mktemp("refs"), 1)[0]
    return Image.open(path).convert("RGB")


@pytest.mark.parametrize("text", sorted(KNOWN_IDS))
def test_tokenizer_known_ids(text: str) -> None:
    assert load_clip_tokenizer()(text).input_ids == KNOWN_IDS[text]


def test_tokenizer_special_tokens_and_padding() -> None:
    tok = load_clip_tokenizer()
    assert len(tok) == 49408
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    assert tok.model_max_length == 77
    ids = tok(
        "a photo of a cat", padding="max_length", max_length=tok.model_max_length, truncation=True
    ).input_ids
    assert len(ids) == 77
    assert ids[:7] == KNOWN_IDS["a photo of a cat"]
    assert ids[7:] == [49407] * 70
    long_ids = tok("cat " * 200, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(long_ids) == 77 and long_ids[0] == 49406 and long_ids[-1] == 49407


def test_tokenizer_assets_present() -> None:
    names = {p.name for p in CLIP_TOKENIZER_DIR.iterdir()}
    expected = {
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "LICENSE-open_clip.txt",
        "README.md",
    }
    assert expected <= names


def test_stack_layout(stack: TinyStack) -> None:
    assert stack.sd_path == stack.root / "sd"
    assert stack.ip_adapter_bin == stack.ip_adapter_dir / "models" / "ip-adapter_sd15.bin"
    for path in (stack.ip_adapter_bin, stack.ip_adapter_safetensors):
        assert path.is_file()
    assert (stack.image_encoder_path / "config.json").is_file()
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (stack.sd_path / sub).is_dir()
    assert (stack.sd_path / "tokenizer" / "vocab.json").is_file()
    size = sum(p.stat().st_size for p in stack.root.rglob("*") if p.is_file())
    assert size < 16 * 2**20


def test_unet_uses_sd14_parameter_names(stack: TinyStack) -> None:
    weights = load_file(str(stack.sd_path / "unet" / "diffusion_pytorch_model.safetensors"))
    for name in (
        "up_blocks.2.attentions.2.transformer_blocks.0.attn2.to_k.weight",
        "down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q.weight",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_v.weight",
        "down_blocks.3.resnets.1.conv2.weight",
        "conv_in.weight",
    ):
        assert name in weights
    assert not any(k.startswith("down_blocks.3.attentions") for k in weights)
    assert tiny_unet_config()["cross_attention_dim"] == weights[
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    ].shape[1]


def test_ip_adapter_files_agree(stack: TinyStack) -> None:
    nested = torch.load(stack.ip_adapter_bin, weights_only=True)
    flat = load_file(str(stack.ip_adapter_safetensors))
    assert set(nested) == {"image_proj", "ip_adapter"}
    assert len(flat) == len(nested["image_proj"]) + len(nested["ip_adapter"])
    for group, tensors in nested.items():
        for key, tensor in tensors.items():
            assert torch.equal(flat[f"{group}.{key}"], tensor)
    # 16 cross-attention layers in SD v1.x: key ids 1, 3, ..., 31.
    assert sorted(int(k.split(".")[0]) for k in nested["ip_adapter"]) == sorted(
        list(range(1, 32, 2)) * 2
    )
    assert nested["image_proj"]["proj.weight"].abs().sum() > 0


@pytest.mark.parametrize("weight_name", ["ip-adapter_sd15.bin", "ip-adapter_sd15.safetensors"])
def test_pipeline_with_ip_adapter_generates(
    stack: TinyStack, reference_image: Image.Image, weight_name: str
) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(stack.sd_path, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(
        str(stack.ip_adapter_dir),
        subfolder="models",
        weight_name=weight_name,
        image_encoder_folder="image_encoder",
    )
    outputs = []
    for scale in (1.0, 0.0):
        pipe.set_ip_adapter_scale(scale)
        result = pipe(
            "a photo of a cat",
            ip_adapter_image=reference_image,
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(0),
            output_type="pil",
        )
        image = result.images[0]
        assert image.size == (64, 64)
        outputs.append(np.asarray(image))
    # The image branch must actually change the result.
    assert not np.array_equal(outputs[0], outputs[1])


def test_build_is_deterministic(stack: TinyStack, tmp_path: Path) -> None:
    again = build_tiny_stack(tmp_path / "again", seed=0)
    other = build_tiny_stack(tmp_path / "other", seed=1)
    rel = Path("unet") / "diffusion_pytorch_model.safetensors"
    first = load_file(str(stack.sd_path / rel))
    second = load_file(str(again.sd_path / rel))
    third = load_file(str(other.sd_path / rel))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], third[k]) for k in first)
    assert stack.ip_adapter_safetensors.read_bytes() == again.ip_adapter_safetensors.read_bytes()


def test_make_reference_images(tmp_path: Path) -> None:
    paths = make_reference_images(tmp_path / "a", 3, size=48, seed=3)
    assert [p.name for p in paths] == ["img_0000.png", "img_0001.png", "img_0002.png"]
    for path in paths:
        with Image.open(path) as image:
            assert image.mode == "RGB" and image.size == (48, 48)
    again = make_reference_images(tmp_path / "b", 3, size=48, seed=3)
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    assert paths[0].read_bytes() != paths[1].read_bytes()

"""The toy-world builder, on its seconds-long ``smoke`` budget: the folder it writes loads everywhere."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from coerasing.toy.build import BUDGETS, CaptionBank, build_toy_world, make_pool
from coerasing.toy.quality import IP_ADAPTER_WEIGHT_NAME

torch.set_num_threads(1)

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "image_encoder", "classifier")


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("toy") / "world"
    build_toy_world(folder, seed=0, budget="smoke", log=lambda _: None)
    return folder


def test_smoke_build_writes_the_sd_layout(toy_folder):
    for name in COMPONENTS:
        assert (toy_folder / name).is_dir(), name
    for name in ("model_index.json", IP_ADAPTER_WEIGHT_NAME, "ip-adapter_toy.safetensors", "world.json"):
        assert (toy_folder / name).is_file(), name
    assert (toy_folder / "tokenizer" / "vocab.json").is_file() and (toy_folder / "tokenizer" / "merges.txt").is_file()
    report = json.loads((toy_folder / "quality.json").read_text())
    assert report["budget"] == "smoke" and report["folder_mb"] < 25
    targets = {"explicit_shape", "explicit_colour", "implicit_shape", "ip_adapter_shape"}
    assert set(report["quality"]["targets"]) == targets
    assert set(report["timings_s"]) >= {"(a) CLIP", "(b) VAE", "(c) UNet", "(d) IP-Adapter", "(e) classifier"}
    # fp16 storage: every weight file holds half-precision floats.
    weights = load_file(str(toy_folder / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float16}


def test_folder_loads_with_diffusers_and_generates(toy_folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(toy_folder))
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    assert pipe.unet.config.down_block_types == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    pipe.load_ip_adapter(str(toy_folder), subfolder="", weight_name=IP_ADAPTER_WEIGHT_NAME)
    image = pipe("", ip_adapter_image=image, num_inference_steps=2).images[0]
    assert image.size == (32, 32)


def test_project_loaders_accept_the_ip_adapter_and_image_encoder(toy_folder):
    from coerasing.images import encode_images
    from coerasing.ip_adapter import attach_ip_adapter, load_ip_adapter_state_dict, unet_noise_pred
    from coerasing.models import load_image_encoder, load_text_components, load_unet

    state = load_ip_adapter_state_dict(str(toy_folder / IP_ADAPTER_WEIGHT_NAME))
    flat = load_ip_adapter_state_dict(str(toy_folder / "ip-adapter_toy.safetensors"))
    assert state["image_proj"].keys() == {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}
    assert state["ip_adapter"].keys() == flat["ip_adapter"].keys()
    assert "1.to_k_ip.weight" in state["ip_adapter"] and "31.to_v_ip.weight" in state["ip_adapter"]

    cpu = torch.device("cpu")
    encoder = load_image_encoder(str(toy_folder / "image_encoder"), cpu, torch.float32)
    from coerasing.toy.world import Scene, render

    embeds = encode_images(encoder, [render(Scene("star", "blue", "white", 0.3, 0.5, 0.5))])
    assert embeds.shape == (1, state["image_proj"]["proj.weight"].shape[1])

    unet = load_unet(str(toy_folder), cpu)
    handle = attach_ip_adapter(unet, state)
    text = load_text_components(str(toy_folder), cpu, torch.float32).encode(["a star"])
    latents = torch.randn(1, 4, 8, 8)
    plain = unet_noise_pred(unet, latents, 10, text)
    with_image = unet_noise_pred(unet, latents, 10, text, handle.project(embeds), handle)
    assert plain.shape == with_image.shape == latents.shape
    assert not torch.allclose(plain, with_image)


def test_classifier_loads_and_predicts(toy_folder):
    from coerasing.toy.classifier import CLASSIFIER_SHAPES, ToyClassifier
    from coerasing.toy.world import Scene, render

    classifier = ToyClassifier.from_pretrained(toy_folder / "classifier")
    predictions = classifier.predict([render(Scene("cross", "green", "black", 0.3, 0.5, 0.5))])
    assert predictions[0]["shape"] in CLASSIFIER_SHAPES and set(predictions[0]) == {"shape", "colour", "background"}


def test_smoke_build_is_deterministic(toy_folder, tmp_path):
    build_toy_world(tmp_path, seed=0, budget="smoke", log=lambda _: None)
    for name in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a, b = load_file(str(toy_folder / name)), load_file(str(tmp_path / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    a = torch.load(toy_folder / IP_ADAPTER_WEIGHT_NAME, weights_only=True)
    b = torch.load(tmp_path / IP_ADAPTER_WEIGHT_NAME, weights_only=True)
    assert all(torch.equal(a["ip_adapter"][k], b["ip_adapter"][k]) for k in a["ip_adapter"])


def test_caption_bank_samples_true_training_captions():
    bank = CaptionBank()
    pool = make_pool(64, np.random.default_rng(0))
    rng = np.random.default_rng(1)
    captions = bank.sample(pool.labels, rng)
    assert bank.truth(captions, pool.labels).diagonal().all()
    assert (captions > 0).all() and (bank.sample(pool.labels, rng, dropout=1.0) == 0).all()
    assert BUDGETS["smoke"].unet_steps < 10 <= BUDGETS["full"].unet_steps


def test_remeasure_rewrites_quality_json_at_a_new_guidance(toy_folder, tmp_path):
    import shutil

    from coerasing.errors import CoErasingError
    from coerasing.toy.quality import main, remeasure

    folder = tmp_path / "copy"
    shutil.copytree(toy_folder, folder)
    before = json.loads((folder / "quality.json").read_text())
    dry = remeasure(folder, guidance_scale=1.5)
    assert dry["settings"]["guidance_scale"] == 1.5
    assert json.loads((folder / "quality.json").read_text()) == before  # no --update: nothing written
    main([str(folder), "--guidance_scale", "2.0", "--update"])
    after = json.loads((folder / "quality.json").read_text())
    assert after["quality"]["settings"]["guidance_scale"] == 2.0 and after["plan"]["eval_guidance"] == 2.0
    assert after["timings_s"] == before["timings_s"]
    assert set(after["quality"]["targets"]) == set(before["quality"]["targets"])
    with pytest.raises(CoErasingError, match="not a built toy-world folder"):
        remeasure(tmp_path / "nowhere")

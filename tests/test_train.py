"""The erasing loop: reproducibility, resume, non-finite loss, and which weights move."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from coerasing.config import EraseConfig
from coerasing.errors import CoErasingError, NonFiniteLossError
from coerasing.train import erase


def make_config(stack, folder, modality="text", images=None, **overrides) -> EraseConfig:
    settings = dict(
        modality=modality, train_method="noxattn", prompt="nudity", iterations=4, save_iter=2,
        ckpt_path=str(stack.sd_path), devices="cpu", save_path=str(folder), num_inference_steps=10, seed=0,
    )
    if modality == "image":
        settings.update(
            image=str(images), image_number=4, text_guide="nudity", text_uncond=True, blur_factor=3,
            ip_adapter=str(stack.ip_adapter_bin), image_encoder_path=str(stack.image_encoder_path),
        )
    settings.update(overrides)
    return EraseConfig(**settings)


def weights(path):
    return torch.load(path, weights_only=True)


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("modality", ["text", "image"])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tiny_stack, reference_images, tmp_path, modality):
    full = erase(make_config(tiny_stack, tmp_path / "full", modality, reference_images))
    # "interrupted" after iteration 2: same run folder, stopped at the periodic checkpoint
    part = tmp_path / "part"
    erase(make_config(tiny_stack, part, modality, reference_images, iterations=2))
    resumed = erase(make_config(tiny_stack, part, modality, reference_images, resume=True))
    assert same(weights(full), weights(resumed))
    with (part / "loss.csv").open() as handle:
        assert [int(row["iteration"]) for row in csv.DictReader(handle)] == [1, 2, 3, 4]
    assert not same(weights(full), weights(part / "unet_2.pth"))


def test_same_seed_same_weights_other_seed_other_weights(tiny_stack, tmp_path):
    a = erase(make_config(tiny_stack, tmp_path / "a", iterations=2))
    b = erase(make_config(tiny_stack, tmp_path / "b", iterations=2))
    c = erase(make_config(tiny_stack, tmp_path / "c", iterations=2, seed=1))
    assert same(weights(a), weights(b))
    assert not same(weights(a), weights(c))


def test_only_the_selected_parameters_change(tiny_stack, reference_images, tmp_path):
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.from_pretrained(tiny_stack.sd_path / "unet").state_dict()
    trained = weights(erase(make_config(tiny_stack, tmp_path / "x", "image", reference_images, train_method="xattn",
                                        iterations=2, lr=1e-3)))
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    assert changed and all("attn2" in k for k in changed)


def test_outputs_next_to_the_checkpoint(tiny_stack, tmp_path):
    final = erase(make_config(tiny_stack, tmp_path / "run"))
    folder = final.parent
    assert sorted(p.name for p in folder.glob("unet*.pth")) == ["unet.pth", "unet_2.pth", "unet_4.pth"]
    run = json.loads((folder / "run.json").read_text())
    assert run["status"] == "finished" and run["config"]["seed"] == 0 and "torch" in run["versions"]
    with (folder / "loss.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and all(0 <= int(r["bucket"]) < 10 and float(r["loss"]) >= 0 for r in rows)
    assert not list(folder.glob("*.tmp"))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_stack, tmp_path):
    config = make_config(tiny_stack, tmp_path / "nan", iterations=6, save_iter=1, lr=10.0)
    with pytest.raises(NonFiniteLossError, match="Last good checkpoint"):
        erase(config)
    last = max(int(p.stem.split("_")[1]) for p in (tmp_path / "nan").glob("unet_*.pth"))
    assert last >= 1 and not (tmp_path / "nan" / "unet.pth").exists()
    assert all(torch.isfinite(t).all() for t in weights(tmp_path / "nan" / f"unet_{last}.pth").values())


def test_resume_refuses_changed_settings(tiny_stack, tmp_path):
    erase(make_config(tiny_stack, tmp_path / "r", iterations=2))
    with pytest.raises(CoErasingError, match=r"other settings: lr"):
        erase(make_config(tiny_stack, tmp_path / "r", resume=True, lr=1e-4))


def test_contrastive_mode_trains(tiny_stack, tmp_path):
    from PIL import Image

    pairs = tmp_path / "pairs"
    for i, colour in enumerate([(250, 0, 0), (0, 250, 0), (0, 0, 250)]):
        (pairs / f"p{i}").mkdir(parents=True)
        Image.new("RGB", (48, 48), colour).save(pairs / f"p{i}" / "positive.png")
        Image.new("RGB", (48, 48), (128, 128, 128)).save(pairs / f"p{i}" / "negative.png")
    for average in (False, True):
        config = make_config(
            tiny_stack, tmp_path / f"c{average}", "image", None, image=None, contrastive_image=str(pairs),
            use_average=average, contrastive_size=2, diff_method="l2", iterations=2,
        )
        assert erase(config).exists()


def _losses(tiny_stack, images, folder, eraser=None, **overrides) -> tuple[list[float], dict]:
    """Six iterations with forced buckets, so every variant does the same draws."""
    from coerasing.train import Eraser

    eraser = eraser or Eraser(make_config(tiny_stack, folder, "image", images, **overrides))
    losses = []
    for i in range(6):
        loss, _, _ = eraser.step(bucket=(9 - i % 3, 150 + i))
        eraser.optimizer.zero_grad()
        eraser.backward(loss)
        eraser.optimizer.step()
        losses.append(loss.item())
    return losses, eraser.models.trainable.state_dict()


@pytest.mark.parametrize("text_uncond", [True, False])
def test_batched_reference_matches_separate_calls(tiny_stack, reference_images, tmp_path, text_uncond):
    separate, _ = _losses(tiny_stack, reference_images, tmp_path / "a", text_uncond=text_uncond)
    batched, _ = _losses(tiny_stack, reference_images, tmp_path / "b", text_uncond=text_uncond, batch_reference=True)
    assert batched == pytest.approx(separate, rel=1e-4)  # last-bit differences of a batch-2 call


def test_gradient_checkpointing_changes_nothing(tiny_stack, reference_images, tmp_path):
    plain_losses, plain = _losses(tiny_stack, reference_images, tmp_path / "a")
    ckpt_losses, checkpointed = _losses(tiny_stack, reference_images, tmp_path / "b", gradient_checkpointing=True)
    assert ckpt_losses == plain_losses and same(plain, checkpointed)


def test_bf16_loss_within_documented_tolerance_of_fp32(tiny_stack, reference_images, tmp_path):
    """docs/runs.md: with --mixed_precision bf16 the per-iteration loss stays within 1 % of fp32's."""
    fp32, _ = _losses(tiny_stack, reference_images, tmp_path / "a")
    bf16, _ = _losses(tiny_stack, reference_images, tmp_path / "b", mixed_precision="bf16")
    assert bf16 == pytest.approx(fp32, rel=0.01)
    assert bf16 != fp32  # it really ran in bf16


@pytest.mark.slow(minutes=2)  # torch.compile's first, uncached compile
def test_compile_matches_the_eager_loop(tiny_stack, reference_images, tmp_path):
    """--compile: same losses as eager up to rounding, and the compiled calls see weight updates."""
    from coerasing.train import Eraser

    eager, _ = _losses(tiny_stack, reference_images, tmp_path / "a", batch_reference=True)
    eraser = Eraser(make_config(tiny_stack, tmp_path / "b", "image", reference_images, batch_reference=True,
                                compile=True))
    compiled, _ = _losses(tiny_stack, reference_images, tmp_path / "b", eraser=eraser)
    assert compiled == pytest.approx(eager, rel=1e-3)

    unet = eraser.models.trainable
    latents = torch.randn(eraser.latent_shape, generator=torch.Generator().manual_seed(0))
    states, t = eraser.prompt_states[0], torch.tensor(500)

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            return (eraser.sampling_unet(latents, t, encoder_hidden_states=states).sample,
                    unet(latents, t, encoder_hidden_states=states).sample)

    before, _ = both()
    with torch.no_grad():  # an in-place update, like the optimizer's
        for parameter in eraser.parameters:
            parameter.add_(0.05 * torch.randn_like(parameter))
    after, eager_after = both()
    assert torch.allclose(after, eager_after, atol=1e-4) and not torch.allclose(after, before, atol=1e-3)


def test_compile_without_a_cpu_compiler_is_a_clear_error(monkeypatch):
    from coerasing import acceleration

    monkeypatch.setattr(acceleration.shutil, "which", lambda name: None)
    with pytest.raises(CoErasingError, match="needs a C\\+\\+ compiler"):
        acceleration.check_compile_support(torch.device("cpu"))
    acceleration.check_compile_support(torch.device("cuda"))  # no host compiler needed to check

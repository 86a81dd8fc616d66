"""The seed command lines of docs/method.md §7, run verbatim as subprocesses against the tiny stack.

Only additions are appended (argparse keeps the last value): model paths pointing at the tiny
stack, small sizes, and ``--devices cpu`` (``--devices 0,1`` needs two GPUs).
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from .conftest import REPO_ROOT

pytestmark = pytest.mark.slow

SEED_LINES = [
    "python generate_data.py --label nudity",
    "python erase_pipeline.py --modality text --prompt 'nudity' --train_method noxattn --iterations 1000",
    "python erase_pipeline.py --modality image --train_method noxattn --text_uncond --prompt 'nudity' "
    '--devices 0,1 --unet_ckpt_path "checkpoints/text/nudity/unet/unet.pth" --image generation_dataset/nudity '
    "--image_number 100 --text_guide nudity --blur_factor 3 --iterations 1000 --negative_guidance 1.0",
]


def run(line: str, extra: list[str], cwd) -> subprocess.CompletedProcess:
    words = shlex.split(line)
    assert words[0] == "python"
    command = [sys.executable, str(REPO_ROOT / words[1]), *words[2:], *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def load(path):
    return torch.load(path, weights_only=True)


def test_seed_command_lines(tiny_stack, tmp_path):
    sd = str(tiny_stack.sd_path)
    # stage 0: reference images
    run(SEED_LINES[0], ["--ckpt_path", sd, "--num_images", "5", "--num_inference_steps", "4", "--batch_size", "2",
                        "--device", "cpu"], tmp_path)
    images = tmp_path / "generation_dataset" / "nudity"
    assert sorted(p.name for p in images.glob("*.png")) == [f"nudity_{i:04d}.png" for i in range(5)]
    with (images / "metadata.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["file"], r["prompt"], int(r["seed"])) for r in rows] == [
        (f"nudity_{i:04d}.png", "a photo of nudity", i) for i in range(5)
    ]
    # resume: a deleted image comes back identical, with another batch size; the others are skipped
    original = np.asarray(Image.open(images / "nudity_0003.png"))
    (images / "nudity_0003.png").unlink()
    result = run(SEED_LINES[0], ["--ckpt_path", sd, "--num_images", "5", "--num_inference_steps", "4",
                                 "--batch_size", "1", "--device", "cpu"], tmp_path)
    assert "4 of 5 images already exist" in result.stdout
    assert np.array_equal(np.asarray(Image.open(images / "nudity_0003.png")), original)

    # stage 1: text erasing
    run(SEED_LINES[1], ["--ckpt_path", sd, "--devices", "cpu", "--iterations", "4", "--save_iter", "2",
                        "--num_inference_steps", "10"], tmp_path)
    text_dir = tmp_path / "checkpoints" / "text" / "nudity" / "unet"
    for name in ("unet.pth", "unet_2.pth", "unet_4.pth", "train_state.pt", "run.json", "loss.csv"):
        assert (text_dir / name).is_file(), name

    # stage 2: Co-Erasing, with every export format
    run(SEED_LINES[2], ["--ckpt_path", sd, "--ip_adapter", str(tiny_stack.ip_adapter_bin),
                        "--image_encoder_path", str(tiny_stack.image_encoder_path), "--devices", "cpu",
                        "--iterations", "4", "--save_iter", "2", "--num_inference_steps", "10",
                        "--save_format", "pth,safetensors,diffusers"], tmp_path)
    image_dir = tmp_path / "checkpoints" / "image" / "nudity" / "unet_noxattn_im100_ng1.0_it4"
    for name in ("unet.pth", "unet_2.pth", "unet_4.pth", "unet.safetensors", "run.json", "loss.csv"):
        assert (image_dir / name).is_file(), name
    run_info = json.loads((image_dir / "run.json").read_text())
    assert run_info["status"] == "finished" and run_info["config"]["text_guide"] == "nudity"
    assert run_info["config"]["devices"] == "cpu" and run_info["versions"]["diffusers"]

    # every checkpoint loads strictly into a plain diffusers UNet; stage 2 moved the weights
    plain = UNet2DConditionModel.from_pretrained(tiny_stack.sd_path / "unet")
    stage1, stage2 = load(text_dir / "unet.pth"), load(image_dir / "unet.pth")
    for state in (stage1, stage2):
        plain.load_state_dict(state, strict=True)
    assert any(not torch.equal(stage1[k], stage2[k]) for k in stage1)
    exported = UNet2DConditionModel.from_pretrained(image_dir / "unet_diffusers").state_dict()
    assert all(torch.equal(exported[k], stage2[k]) for k in stage2)

    # and generates inside a StableDiffusionPipeline (the README's loading path)
    command = [sys.executable, "-m", "coerasing.inspect_checkpoint", str(image_dir / "unet.pth"), "--ckpt_path", sd,
               "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "sample.png")]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert Image.open(tmp_path / "sample.png").size == (64, 64)

"""Bad input → one-paragraph error, exit status 2, no traceback (the list of issue #2)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

import erase_pipeline
import generate_data
from coerasing.cli import run_cli

from .conftest import REPO_ROOT


@pytest.fixture(scope="module")
def world(tiny_stack, tmp_path_factory):
    """Paths for the cases: good reference images, an empty folder, corrupt images, a bad UNet file."""
    root = tmp_path_factory.mktemp("cli_errors")
    (root / "empty").mkdir()
    (root / "corrupt").mkdir()
    for i in range(2):
        (root / "corrupt" / f"c{i}.png").write_bytes(b"\x89PNG broken")
    (root / "good").mkdir()
    Image.new("RGB", (32, 32), (255, 0, 0)).save(root / "good" / "a.png")
    torch.save({"conv_in.weight": torch.zeros(1), "foo.bar": torch.zeros(1)}, root / "mismatch.pth")
    (root / "bad.yaml").write_text("train_method: noxattn\nnot_a_flag: 3\n")
    # a model whose UNet lacks up_blocks.2 attentions: --train_method xlayer selects nothing
    odd = root / "odd_model"
    shutil.copytree(tiny_stack.sd_path, odd)
    config = json.loads((odd / "unet" / "config.json").read_text())
    config["up_block_types"] = ["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"]
    (odd / "unet" / "config.json").write_text(json.dumps(config))
    return root


def _base(stack) -> list[str]:
    return ["--ckpt_path", str(stack.sd_path), "--devices", "cpu", "--iterations", "2"]


def _image(stack, image) -> list[str]:
    return [
        "--modality", "image", "--prompt", "nudity", "--train_method", "noxattn", "--image", str(image),
        "--ip_adapter", str(stack.ip_adapter_bin), "--image_encoder_path", str(stack.image_encoder_path),
    ]


TEXT = ["--modality", "text", "--prompt", "nudity", "--train_method", "noxattn"]

CASES = {
    "missing --image folder": (lambda s, w: _image(s, w / "nope"), "does not exist"),
    "empty --image folder": (lambda s, w: _image(s, w / "empty"), "contains no image files"),
    "only corrupt images": (lambda s, w: _image(s, w / "corrupt"), "none of the 2 image"),
    "missing --unet_ckpt_path": (lambda s, w: TEXT + ["--unet_ckpt_path", str(w / "nope.pth")], "does not exist"),
    "mismatching --unet_ckpt_path": (
        lambda s, w: TEXT + ["--unet_ckpt_path", str(w / "mismatch.pth")], "not base UNet parameters: foo.bar"
    ),
    "unknown --train_method": (lambda s, w: TEXT[:-1] + ["attention"], "is not known"),
    "--train_method selecting nothing": (
        lambda s, w: TEXT[:-1] + ["xlayer", "--ckpt_path", str(w / "odd_model")], "selects no parameter"
    ),
    "even --blur_factor": (lambda s, w: _image(s, w / "good") + ["--blur_factor", "4"], "positive odd kernel"),
    "negative --blur_factor": (lambda s, w: _image(s, w / "good") + ["--blur_factor", "-3"], "positive odd kernel"),
    "empty --prompt": (lambda s, w: ["--prompt", " , ", "--train_method", "noxattn"], "--prompt is empty"),
    "zero --iterations": (lambda s, w: TEXT + ["--iterations", "0"], "--iterations must be a positive"),
    "negative --save_iter": (lambda s, w: TEXT + ["--save_iter", "-5"], "--save_iter must be a positive"),
    "model path neither folder nor hub id": (
        lambda s, w: TEXT + ["--ckpt_path", str(w / "no_model")], "neither a local folder nor a Hugging Face Hub id"
    ),
    "unreachable hub model": (lambda s, w: TEXT + ["--ckpt_path", "nobody/no-such-model"], "pass --ckpt_path with"),
    "GPU that is not there": (lambda s, w: TEXT + ["--devices", "0,1"], "--devices cpu"),
    "unknown YAML key": (lambda s, w: TEXT + ["--config", str(w / "bad.yaml")], "unknown keys: not_a_flag"),
    "--image and --contrastive_image": (
        lambda s, w: _image(s, w / "good") + ["--contrastive_image", str(w)], "exactly one of --image"
    ),
    "unknown --save_format": (lambda s, w: TEXT + ["--save_format", "pth,ckpt"], "unknown format(s) ckpt"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_erase_pipeline_errors(case, tiny_stack, world, capsys):
    make_args, expected = CASES[case]
    argv = _base(tiny_stack) + make_args(tiny_stack, world)
    if case == "GPU that is not there" and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has two GPUs")
    assert run_cli(erase_pipeline.main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in " ".join(err.split()), err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--label", "../.."], "gives no usable folder name"),
        (["--label", "nudity", "--num_images", "0"], "--num_images must be a positive number"),
        (["--label", "nudity", "--prompt_template", "a photo"], "must contain {label}"),
        (["--label", "nudity", "--device", "0,1"], "names several devices"),
    ],
)
def test_generate_data_errors(argv, expected, capsys):
    assert run_cli(generate_data.main, argv) == 2
    assert expected in " ".join(capsys.readouterr().err.split())


def test_a_real_process_exits_2_without_traceback(tiny_stack, world):
    result = subprocess.run(
        [sys.executable, "erase_pipeline.py", *_base(tiny_stack), *_image(tiny_stack, world / "empty")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "error: --image" in result.stderr and "Traceback" not in result.stderr


def test_corrupt_file_among_good_ones_is_skipped(tiny_stack, world, tmp_path, capsys):
    mixed = tmp_path / "mixed"
    shutil.copytree(world / "good", mixed)
    (mixed / "z.png").write_bytes(b"garbage")
    argv = _base(tiny_stack) + _image(tiny_stack, mixed) + ["--save_path", str(tmp_path / "out"), "--image_number", "5"]
    with pytest.warns(UserWarning) as record:
        assert run_cli(erase_pipeline.main, argv) == 0
    messages = " ".join(str(w.message) for w in record)
    assert "skipping unreadable image" in messages and "larger than the 2 images" in messages
    assert (tmp_path / "out" / "unet.pth").exists()

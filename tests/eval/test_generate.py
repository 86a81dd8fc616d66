"""Generation on the tiny stack: named by case number, per-row seeds, resumable, sharded like one process."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from coerasing.errors import CoErasingError
from coerasing.eval.prompts import load_prompts
from coerasing.generation import GenerationSettings, generate_images, load_generation_pipeline, plan_batches
from coerasing.methods import load_runtime

from ..conftest import REPO_ROOT

CPU = torch.device("cpu")
STEPS = 3


@pytest.fixture(scope="module")
def pipe(tiny_stack):
    return load_generation_pipeline(str(tiny_stack.sd_path), CPU, torch.float32)


def _run(rows, folder, pipe, batch_size, loads=None):
    def load(device, dtype):
        if loads is not None:
            loads.append(device)
        return pipe

    settings = GenerationSettings(num_inference_steps=STEPS, batch_size=batch_size)
    return generate_images(rows, folder, settings, load, device="cpu")


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_images_named_by_case_with_row_settings(rows_csv, pipe, tmp_path):
    rows = load_prompts(str(rows_csv))
    folder = _run(rows, tmp_path / "images", pipe, batch_size=2)
    assert sorted(p.name for p in folder.glob("*.png")) == [f"a{i}.png" for i in range(1, 6)]
    with Image.open(folder / "a3.png") as image:
        assert image.size == (64, 48)  # the row's sd_image_width × sd_image_height
    with Image.open(folder / "a1.png") as image:
        assert image.size == (64, 64)  # the model's size (tiny stack: 8 latents × 8)
    manifest = list(csv.DictReader((folder / "manifest.csv").open()))
    assert [r["case"] for r in manifest] == ["a1", "a2", "a3", "a4", "a5"]
    assert manifest[0]["seed"] == "4261553411" and manifest[2]["guidance"] == "5.0" and manifest[4]["guidance"] == "9.0"


def test_resume_and_seed_independent_of_batch_size(rows_csv, pipe, tmp_path):
    rows = load_prompts(str(rows_csv))
    one = _run(rows, tmp_path / "one", pipe, batch_size=1)
    loads: list = []
    three = _run(rows, tmp_path / "three", pipe, batch_size=3, loads=loads)
    assert len(loads) == 1
    for row in rows:  # batch composition must not change an image (tolerance 1 level for BLAS batching)
        assert np.abs(_pixels(one / row.file) - _pixels(three / row.file)).max() <= 1, row.case
    assert not np.array_equal(_pixels(one / "a1.png"), _pixels(one / "a2.png"))
    before = {p.name: p.stat().st_mtime_ns for p in three.glob("*.png")}
    (three / "a4.png").unlink()
    loads.clear()
    _run(rows, three, pipe, batch_size=3, loads=loads)
    assert len(loads) == 1 and (three / "a4.png").exists()
    assert all((three / name).stat().st_mtime_ns == t for name, t in before.items() if name != "a4.png")
    loads.clear()
    _run(rows, three, pipe, batch_size=3, loads=loads)
    assert loads == []  # nothing left to do: the pipeline is not even loaded


def test_batches_group_rows_with_the_same_call_settings(rows_csv):
    rows = load_prompts(str(rows_csv))
    batches = plan_batches(rows, GenerationSettings(batch_size=4), 64)
    assert [[r.case for r in b] for b in batches] == [["a1"], ["a2"], ["a3"], ["a4"], ["a5"]]
    same = GenerationSettings(batch_size=2, guidance_scale=7.5, height=64, width=64)
    assert [[r.case for r in b] for b in plan_batches(rows, same, 64)] == [["a1", "a2"], ["a3", "a4"], ["a5"]]


def test_erased_unet_is_loaded_in_any_format(tiny_stack, tmp_path):
    base = load_generation_pipeline(str(tiny_stack.sd_path), CPU, torch.float32)
    state = {k: v + 0.01 for k, v in base.unet.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "erased.pt")
    erased = load_runtime(str(tiny_stack.sd_path), str(tmp_path / "erased.pt"), CPU, torch.float32, flag="--unet").pipe
    key = "conv_in.weight"
    assert torch.equal(erased.unet.state_dict()[key], state[key])
    torch.save({"foo": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(CoErasingError, match="--unet"):
        load_runtime(str(tiny_stack.sd_path), str(tmp_path / "bad.pth"), CPU, torch.float32, flag="--unet")


def test_lms_without_scipy_is_a_clear_error(tiny_stack):
    import importlib.util

    if importlib.util.find_spec("scipy") is not None:
        pytest.skip("scipy is installed")
    with pytest.raises(CoErasingError, match="pip install scipy"):
        load_generation_pipeline(str(tiny_stack.sd_path), CPU, torch.float32, scheduler="lms")


@pytest.mark.slow
def test_two_processes_write_exactly_the_files_of_one(tiny_stack, rows_csv, tmp_path):
    """torchrun (gloo on CPU): process r takes rows r, r+2, …; the same bytes as one process."""
    args = ["generate", "--prompts", str(rows_csv), "--ckpt_path", str(tiny_stack.sd_path),
            "--num_inference_steps", str(STEPS), "--batch_size", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    script = str(REPO_ROOT / "evaluate.py")
    single = subprocess.run([sys.executable, script, *args, "--output_dir", str(tmp_path / "one")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    sharded = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, *args,
         "--output_dir", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert sharded.returncode == 0, sharded.stderr[-2000:]
    one, two = tmp_path / "one" / "images", tmp_path / "two" / "images"
    names = sorted(p.name for p in one.glob("*.png"))
    assert names == sorted(p.name for p in two.glob("*.png")) and len(names) == 5
    for name in [*names, "manifest.csv"]:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert '"processes": 2' in (two / "run.json").read_text()

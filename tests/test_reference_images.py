"""Stage 0: labels become safe folder names; sharded generation equals single-process generation."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from coerasing.config import GenerateConfig, default_prompt_template, safe_name
from coerasing.errors import CoErasingError

from .conftest import REPO_ROOT


@pytest.mark.parametrize(
    ("label", "folder"),
    [("nudity", "nudity"), ("Van Gogh", "Van_Gogh"), ("garbage truck", "garbage_truck"), ("../../etc", "_.._etc"),
     ("a/b\\c", "a_b_c"), ("..hidden", "hidden")],
)
def test_labels_become_safe_folder_names(label, folder):
    assert safe_name(label) == folder
    assert "/" not in folder and not folder.startswith(".")


@pytest.mark.parametrize("label", ["", "   ", "..", "/", "../"])
def test_labels_without_a_usable_name_are_errors(label):
    with pytest.raises(CoErasingError):
        safe_name(label)


def test_prompt_templates():
    assert default_prompt_template("Van Gogh") == "a drawing of {label}"
    assert default_prompt_template("church") == "a photo of {label}"
    assert GenerateConfig(label="Picasso").prompt == "a drawing of Picasso"
    assert GenerateConfig(label="tench", prompt_template="a {label} fish").prompt == "a tench fish"


@pytest.mark.slow
def test_two_processes_write_exactly_the_files_of_one(tiny_stack, tmp_path):
    """torchrun (gloo on CPU): process r takes images r, r+2, …; same bytes as one process."""
    args = ["--label", "nudity", "--ckpt_path", str(tiny_stack.sd_path), "--num_images", "5",
            "--num_inference_steps", "3", "--batch_size", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    script = str(REPO_ROOT / "generate_data.py")
    single = subprocess.run([sys.executable, script, *args, "--output_dir", str(tmp_path / "one")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    sharded = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, *args,
         "--output_dir", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert sharded.returncode == 0, sharded.stderr[-2000:]
    one, two = tmp_path / "one" / "nudity", tmp_path / "two" / "nudity"
    names = sorted(p.name for p in one.glob("*.png"))
    assert names == sorted(p.name for p in two.glob("*.png")) and len(names) == 5
    for name in [*names, "metadata.csv"]:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert '"processes": 2' in (two / "run.json").read_text()

"""The UnlearnDiff attack is real: on a weakly erased toy model it brings the concept back for more
prompts than no attack does (``evaluate.py all`` on the shipped toy model, offline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from coerasing.toy import TOY_MODEL_DIR
from coerasing.toy.demo import REPO_ROOT


def _run(args: list[str]) -> None:
    result = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow(minutes=3)
def test_attack_revives_the_concept_on_a_weakly_erased_toy_model(tmp_path):
    model = str(TOY_MODEL_DIR)
    _run(["erase_pipeline.py", "--modality", "text", "--prompt", "circle", "--train_method", "noxattn",
          "--iterations", "40", "--lr", "3e-4", "--num_inference_steps", "25", "--ckpt_path", model,
          "--save_path", str(tmp_path / "weak"), "--devices", "cpu"])
    out = tmp_path / "eval"
    _run(["evaluate.py", "all", "--prompts", "toy_circle", "--limit", "24", "--ckpt_path", model,
          "--unet", str(tmp_path / "weak" / "unet.pth"), "--output_dir", str(out), "--num_inference_steps", "25",
          "--attack_timesteps", "3", "--device", "cpu"])
    report = json.loads((out / "report.json").read_text())
    block = report["asr"]["all"]
    print(json.dumps(block))
    assert block["n"] == 24 and report["asr"]["complete"]
    assert block["pre_success"] < block["n"]  # something was erased, so there is something to attack
    assert block["attack_success"] >= 1 and block["asr"] > block["pre_asr"]
    assert (out / "report.md").is_file() and (out / "grid.png").is_file()

"""The benchmark scripts keep running (their numbers live in docs/benchmarks.md, not in assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO_ROOT

pytestmark = pytest.mark.slow
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def test_bench_erase_runs_all_loops(tmp_path):
    out = tmp_path / "erase.json"
    command = [sys.executable, "benchmarks/bench_erase.py", "--arch", "tiny", "--device", "cpu", "--iterations", "1",
               "--warmup", "0", "--num_inference_steps", "4", "--stage", "image", "--json", str(out)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.read_text())
    entry = data["stages"]["image"]
    assert {"reference", "ours", "fastest"} <= set(entry)
    assert entry["ours"]["median_s"] > 0 and entry["reference"]["peak_memory_gib"] > 0
    assert "| image | fastest |" in result.stdout


def test_bench_generate_runs(tmp_path):
    out = tmp_path / "generate.json"
    command = [sys.executable, "benchmarks/bench_generate.py", "--arch", "tiny", "--device", "cpu", "--images", "2",
               "--rounds", "1", "--steps", "2", "--batch_size", "2", "--json", str(out)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(out.read_text())["speedup"] > 0


def test_bench_eval_runs_and_compares_rates_image_by_image(tmp_path):
    presets = tmp_path / "presets.yaml"
    presets.write_text("evaluation: {explicit_images: 2, implicit_images: 2, unrelated_images: 4}\n")
    out = tmp_path / "eval.json"
    command = [sys.executable, "benchmarks/bench_eval.py", "--presets", str(presets), "--stage1_iterations", "2",
               "--old", "pndm:4", "--new", "dpm:2@961", "--new", "dpm:2", "--json", str(out)]
    result = subprocess.run(command, cwd=REPO_ROOT, env={**ENV, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["speedup"] > 0 and isinstance(data["rates_agree"], bool) and data["tolerance"] == 0.1
    assert data["new"] == "dpm:2@961" and data["clock"] == "CPU seconds"
    rates = data["rates"]["dpm:2"]
    assert set(rates) == {"base", "stage1-2"} and rates["base"]["unrelated"]["old"]["n"] == 8  # 4 per split
    assert data["timing"]["pndm:4"]["unet_calls_per_image"] == 8
    assert data["timing"]["dpm:2@961"]["unet_calls_per_image"] == 4

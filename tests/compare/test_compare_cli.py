"""``compare.py`` end to end: the quick toy comparison (resumable) and the real protocol on the tiny stack."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from ..conftest import REPO_ROOT

pytestmark = pytest.mark.slow

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}


def _compare(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(REPO_ROOT / "compare.py"), *args], cwd=REPO_ROOT, env=ENV,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow(minutes=1.5)
def test_quick_comparison_writes_every_output_and_resumes_only_what_is_missing(tmp_path):
    out = tmp_path / "quick"
    _compare("--quick", "--output_dir", str(out))
    for name in ("results.json", "results.csv", "results.md", "plot_circle.png", "grid_circle.png", "run.json"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["method"] for r in rows} == {"base", "esd", "coerasing"}
    assert sum(r["chosen"] == "True" for r in rows if r["method"] != "base") == 2
    # in budget or the rule's fallback, at the chosen points only; the same as results.json says
    assert all((r["qualified"] in ("True", "False")) == (r["chosen"] == "True") for r in rows)
    assert all(r["validation_unrelated_n"] == "16" for r in rows)
    # test images only at the base model and the chosen checkpoints (the presets' test_evaluation: chosen)
    assert all(r["test_explicit_n"] == ("8" if r["chosen"] == "True" else "") for r in rows)
    results = json.loads((out / "results.json").read_text())
    cell = results["summary"]["per_concept"]["circle"]["coerasing"]
    attack = cell["with_fallback"]["asr"]  # every cell, whether or not its point is the rule's fallback
    assert attack["n"] == 1 and 0 <= attack["mean"] <= 1 and cell["cells"] == 1
    assert ("asr" in cell) == (cell["fallback"] == 0)  # the headline holds only cells with a point in budget
    chosen_row = next(r for r in rows if r["method"] == "coerasing" and r["chosen"] == "True")
    assert chosen_row["qualified"] == str(cell["chosen"][0]["qualified"])
    assert results["verdicts"]["reference"] == "coerasing" and "esd" in results["verdicts"]["against"]
    # --quick trains one candidate per method (the base presets): candidate 0 everywhere, declared as such
    assert results["machine"]["cpu"] and results["machine"]["versions"]["torch"]  # what made the numbers
    assert results["candidates"] == {"esd": [{}], "coerasing": [{}]} and {r["candidate"] for r in rows} == {"", "0"}
    assert "| coerasing |" in (out / "results.md").read_text()
    # the robustness suite: a column per attack at the chosen points and the base model, per-prompt outcomes
    for name in ("asr", "inversion", "ring_a_bell", "mma", "p4d", "relearn"):
        assert cell["with_fallback"][name]["n"] == 1, name
        assert all((r[f"attack_{name}_n"] != "") == (r["chosen"] == "True") for r in rows), name
    assert all(r["attack_ring_a_bell_n"] == "3" for r in rows if r["chosen"] == "True")
    for job in results["jobs"]:
        for entry in (job["base"], *job["methods"].values()):
            for key in ("attack", "ring_a_bell", "mma", "p4d", "relearn"):
                assert len(entry[key]["cases"]) == 3, key
            assert [point["steps"] for point in entry["relearn"]["curve"]] == [0, 1, 2]
            inversion = entry["inversion"]  # its images, one per seed, paired across models for the verdicts
            assert len(inversion["cases"]) == inversion["n"] and sum(inversion["cases"].values()) == inversion["k"]
    assert len(list((out / "cache" / "text_attacks").glob("*/attack_prompts.csv"))) == 2  # once per attack
    robustness = (out / "results.md").read_text().split("## Robustness")[1]
    assert "| base (sanity) |" in robustness and "RAB ↓" in robustness and "relearn ↓" in robustness

    # a rerun trains and evaluates nothing; after losing one evaluation and the job, only those are redone
    cache = out / "cache"
    stamps = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    _compare("--quick", "--output_dir", str(out))
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    evaluations = sorted((cache / "evals").glob("*.json"))
    lost = evaluations[0]
    lost.unlink()
    for job in (out / "jobs").glob("*.json"):
        job.unlink()
    _compare("--quick", "--output_dir", str(out))
    assert lost.exists()
    redone = {lost, lost.with_suffix(".npz")}  # the lost evaluation (its JSON and its images) is made again
    untouched = [p for p in stamps if p not in redone]
    assert untouched and all(p.stat().st_mtime_ns == stamps[p] for p in untouched)
    assert not list((cache / "runs").rglob("*.tmp"))


def test_the_real_protocol_path_on_the_tiny_stack(tiny_stack, tiny_classifier, tmp_path):
    presets = tmp_path / "presets.yaml"
    presets.write_text("""
stage1: {train_method: noxattn, lr: 1.0e-4, iterations: 2, save_iter: 1, num_inference_steps: 3}
stage2: {train_method: noxattn, lr: 1.0e-4, iterations: 2, save_iter: 1, num_inference_steps: 3,
         image_number: 2, text_uncond: true, blur_factor: 0}
references: {num_images: 2, num_inference_steps: 2, batch_size: 2}
evaluation: {num_inference_steps: 2, target: church, batch_size: 2}
attack: {rows: 1, iterations: 1, timesteps: 1}
rule: {max_usability_drop: 0.05}
""")
    out = tmp_path / "real"
    _compare("--ckpt_path", str(tiny_stack.sd_path), "--ip_adapter", str(tiny_stack.ip_adapter_bin),
             "--image_encoder_path", str(tiny_stack.image_encoder_path), "--classifier", str(tiny_classifier),
             "--concepts", "church", "--methods", "esd,coerasing", "--seeds", "0", "--limit", "2",
             "--presets", str(presets), "--output_dir", str(out), "--device", "cpu")
    results = json.loads((out / "results.json").read_text())
    job = results["jobs"][0]
    assert job["concept"] == "church" and set(job["methods"]) == {"esd", "coerasing"}
    assert job["base"]["test"]["metrics"]["explicit"]["n"] == 2  # --limit 2 rows of church.csv per split
    assert job["methods"]["esd"]["chosen"]["reason"].startswith("no usability measure")
    assert "attack" in job["methods"]["coerasing"]

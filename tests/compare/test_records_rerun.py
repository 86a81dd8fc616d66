"""A finished ``--quick`` comparison with one record truncated, rerun: exactly that record's cell is made again
(the results equal the uninterrupted run's) or the run stops with an error naming the file; and two
comparisons started together on one folder give one run's results, each training run trained once.

The comparison (``--quick`` with the toy presets' quick block made smaller: :data:`SMALL`) is built once
for the module and restored in place for each case (its cache keys hold absolute paths, so a copy
elsewhere would be another comparison)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from coerasing.files import read_json_record

from ..conftest import REPO_ROOT

pytestmark = pytest.mark.slow

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}


#: The toy presets' ``quick`` block made smaller still (these tests check the cache, not the numbers).
SMALL = {"stage1": {"iterations": 6, "save_iter": 3}, "stage2": {"iterations": 4, "save_iter": 2, "image_number": 4},
         "references": {"num_images": 4, "batch_size": 4},
         "evaluation": {"explicit_images": 4, "implicit_images": 4, "unrelated_images": 8},
         "attack": {"rows": 2, "iterations": 2, "timesteps": 1, "inversion_steps": 2, "inversion_images": 2}}


@pytest.fixture(scope="module")
def presets(tmp_path_factory) -> Path:
    data = yaml.safe_load((REPO_ROOT / "configs" / "compare" / "toy.yaml").read_text(encoding="utf-8"))
    for block, values in SMALL.items():
        data["quick"][block] = {**data["quick"].get(block, {}), **values}
    for attack in ("ring_a_bell", "mma", "p4d", "relearn"):  # their records are the CLI test's (time)
        data.pop(attack, None)
        data["quick"].pop(attack, None)
    path = tmp_path_factory.mktemp("presets") / "small.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _command(out: Path, presets: Path) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "compare.py"), "--quick", "--presets", str(presets), "--output_dir",
            str(out), "--workers", "1"]


def _compare(out: Path, presets: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(_command(out, presets), cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def finished(tmp_path_factory, presets) -> tuple[Path, Path]:
    """(the comparison's folder, a pristine copy of it) after one uninterrupted ``--quick`` run."""
    root = tmp_path_factory.mktemp("records")
    out = root / "quick"
    _compare(out, presets)
    shutil.copytree(out, root / "pristine")
    return out, root / "pristine"


def _restore(finished: tuple[Path, Path]) -> Path:
    out, pristine = finished
    shutil.rmtree(out)
    shutil.copytree(pristine, out)  # copy2: the files keep their times, so a rewrite shows
    return out


def _stamps(cache: Path) -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in cache.rglob("*")
            if p.is_file() and not p.name.endswith(".lock")}


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _one(pattern: str, out: Path) -> Path:
    found = sorted(out.glob(pattern))
    assert found, pattern
    return found[0]


def _attack_entry(record: Path) -> Path:
    """The cache entry ``cache/attacks/<key>.json`` that sums up the attack records under ``cache/attacks/<key>/``."""
    folder = record.parent
    while folder.parent.name != "attacks":
        folder = folder.parent
    return folder.with_suffix(".json")


#: kind → (the record to truncate, whether the job records are removed too so that the job reads the cache
#: again, and the files besides the record that may be made again).
CASES = {
    "evaluation": ("cache/evals/*.json", False, lambda p: {p.with_suffix(".npz")}),
    "npz": ("cache/evals/*.npz", False, lambda p: {p.with_suffix(".json")}),
    "done": ("cache/references/*/done.json", True, lambda p: set(p.parent.rglob("*"))),
    "progress": ("cache/runs/stage2/*/progress.json", True, lambda p: set()),
    "request": ("cache/runs/stage1/*/request.json", True, lambda p: set()),
    "job": ("jobs/*.json", False, lambda p: set()),
    # an attack interrupted after writing a broken record (UnlearnDiff's or, where every attacked image
    # already showed the concept, concept inversion's): its summary entry is not there yet
    "attack": ("cache/attacks/**/*-*.json", True, lambda p: {_attack_entry(p), p.with_suffix(".png")}),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_a_truncated_record_is_made_again_and_the_results_equal_the_uninterrupted_run(finished, presets, kind):
    out = _restore(finished)
    expected = (finished[1] / "results.csv").read_text()
    pattern, drop_jobs, also = CASES[kind]
    target = _one(pattern, out)
    _truncate(target)
    if kind == "attack":
        _attack_entry(target).unlink()
    if drop_jobs:
        for job in (out / "jobs").glob("*.json"):
            job.unlink()
    before = _stamps(out / "cache")
    result = _compare(out, presets)
    assert re.search(rf"warning: {re.escape(str(target))} (is not a valid record|could not be read|cannot be used)",
                     result.stderr) or (kind in ("evaluation", "npz") and str(target.with_suffix(".json"))
                                        in result.stderr), result.stderr[-3000:]
    assert (out / "results.csv").read_text() == expected
    if target.suffix == ".npz":
        with np.load(target) as arrays:
            assert arrays["grid"].ndim == 4
    else:
        assert read_json_record(target) is not None  # written whole again
    after = _stamps(out / "cache")
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    assert changed <= {target, *also(target)}, sorted(map(str, changed - {target, *also(target)}))
    if kind != "job":
        assert not [p for p in changed if "runs" in p.parts and p.suffix in (".pth", ".pt")]  # nothing retrained


def test_two_comparisons_on_one_folder_give_one_runs_results_and_train_each_run_once(finished, presets, tmp_path):
    out = tmp_path / "shared"
    processes = [subprocess.Popen(_command(out, presets), cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [process.communicate(timeout=900)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert (out / "results.csv").read_text() == (finished[1] / "results.csv").read_text()
    runs = sorted(p for p in (out / "cache" / "runs").glob("*/*") if p.is_dir())
    assert len(runs) == 2  # stage 1 (shared by esd and coerasing) and stage 2
    for run in runs:  # `erase` prints "saved <run>/unet.pth" once per training
        assert sum(log.count(f"saved {run / 'unet.pth'}") for log in logs) == 1, run

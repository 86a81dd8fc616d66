"""The run folder of a training run: resume state, ``run.json`` and the loss log.

- ``train_state.pt``: optimizer, iteration and RNG state of the newest periodic checkpoint, for
  ``--resume``.
- ``run.json``: resolved config, library versions, git commit and command line, written by
  :func:`write_run_json` (the one writer of ``run.json`` for every command).
- ``loss.csv``: the loss log (:class:`LossLog`).

The weights themselves (``unet.pth``, ``unet_<iter>.pth`` and the other formats) are written and read
by :mod:`coerasing.formats`. Every file is written atomically (:mod:`coerasing.files`).
"""

from __future__ import annotations

import csv
import json
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import CoErasingError
from .files import atomic_write, atomic_write_text

TRAIN_STATE = "train_state.pt"
_PERIODIC = re.compile(r"^unet_(\d+)\.pth$")


# ----------------------------------------------------------------------------------------------
# Training state for --resume


def save_training_state(path: str | Path, state: dict[str, Any]) -> Path:
    """Atomically save the resume state (optimizer, iteration, RNG states)."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_training_state(path: str | Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CoErasingError(
            f"the resume state {path} could not be read ({exc}). Delete it to start the run afresh."
        ) from exc


def latest_periodic_checkpoint(folder: str | Path) -> tuple[int, Path] | None:
    """The newest ``unet_<iter>.pth`` in ``folder`` as (iteration, path), if any."""
    found = []
    for path in Path(folder).glob("unet_*.pth"):
        match = _PERIODIC.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return max(found) if found else None


# ----------------------------------------------------------------------------------------------
# Run metadata and loss log


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries a result depends on."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "accelerate", "safetensors", "numpy", "pillow"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    versions["cuda"] = str(torch.version.cuda)
    return versions


def git_commit(path: str | Path | None = None) -> str | None:
    """The git commit of the code (with ``-dirty`` when modified), or ``None`` outside git."""
    cwd = Path(path or Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit


def write_run_json(folder: str | Path, config: dict[str, Any], **extra: Any) -> Path:
    """Write ``folder/run.json``: resolved config, library versions, commit, command line, and ``extra``.

    Every command that writes results (training, generation, attack, comparison) records itself so.
    """
    payload = {
        "config": config,
        "versions": library_versions(),
        "git_commit": git_commit(),
        "command": sys.argv,
        **extra,
    }
    return atomic_write_text(Path(folder) / "run.json", json.dumps(payload, indent=2, default=str) + "\n")


class CsvLog:
    """An append-only CSV log (``loss.csv``) that, when a run resumes, keeps only the rows ``keep`` accepts.

    The kept rows are rewritten atomically first, so a resumed log never repeats or mixes rows of
    the interrupted run past its resume point.
    """

    def __init__(self, path: str | Path, fields: tuple[str, ...], keep: Callable[[dict[str, str]], bool] | None = None):
        self.path = Path(path)
        self.fields = fields
        rows: list[dict[str, str]] = []
        if keep is not None and self.path.exists():
            with self.path.open(newline="") as handle:
                rows = [row for row in csv.DictReader(handle) if keep(row)]
        atomic_write(self.path, lambda tmp: self._write_rows(tmp, rows))
        self._handle = self.path.open("a", newline="")
        self._writer = csv.DictWriter(self._handle, fieldnames=fields)

    def _write_rows(self, path: Path, rows: list[dict[str, str]]) -> None:
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.fields)
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: dict[str, Any]) -> None:
        self._writer.writerow(row)

    def flush(self) -> None:
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


class LossLog(CsvLog):
    """Per-iteration loss log of the erasing loop: ``loss.csv`` always, TensorBoard events when installed."""

    FIELDS = ("iteration", "loss", "bucket", "timestep")

    def __init__(self, folder: str | Path, logging_dir: str | Path | None = None, resume_from: int = 0):
        keep = (lambda row: int(row["iteration"]) <= resume_from) if resume_from else None
        super().__init__(Path(folder) / "loss.csv", self.FIELDS, keep)
        self._tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(logging_dir or Path(folder) / "log"))
        except ImportError:
            pass

    def log(self, iteration: int, loss: float, bucket: int, timestep: int) -> None:
        self.write({"iteration": iteration, "loss": f"{loss:.8g}", "bucket": bucket, "timestep": timestep})
        if self._tensorboard is not None:
            self._tensorboard.add_scalar("loss", loss, iteration)

    def flush(self) -> None:
        super().flush()
        if self._tensorboard is not None:
            self._tensorboard.flush()

    def close(self) -> None:
        super().close()
        if self._tensorboard is not None:
            self._tensorboard.close()

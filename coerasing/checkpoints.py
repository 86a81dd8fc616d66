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
import os
import platform
import re
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
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


# ----------------------------------------------------------------------------------------------
# Run metadata and loss log


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries a result depends on."""

    versions = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "accelerate", "safetensors", "numpy", "pillow"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    versions["cuda"] = str(torch.version.cuda)
    return versions


def machine() -> dict[str, Any]:
    """What produced a result besides the code: the CPU model (training on another CPU model changes weights in
    the last bits), its core count, the operating system, and the library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "versions": library_versions(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


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


def write_run_json(folder: str | Path, config: dict[str, Any], method: str | None = None, **extra: Any) -> Path:
    """Write ``folder/run.json``: resolved config, library versions, commit, command line, and ``extra``.

    Every command that writes results (training, generation, attack, comparison) records itself so;
    a training run also records its ``method`` (:func:`run_owner` reads it).
    """
    payload = {
        **({"method": method} if method else {}),
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


# ----------------------------------------------------------------------------------------------
# Whose run a folder holds


def _json_object(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


#: Settings that only one method's config has: how a ``run.json`` written before it named its method is read.
_SIGNATURES = (("reo_lr", "stereo"), ("gate_dim", "cpe"), ("cross_fraction", "gie"), ("modality", "coerasing"))


def run_owner(folder: str | Path) -> str | None:
    """The method whose run ``folder`` holds (``run.json``'s ``method``, else its files), ``None`` if none.

    An erasing run of ``erase_pipeline.py`` (either stage, or a stage inside STEREO) is ``coerasing``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    for name in ("run.json", "artifact.json"):
        data = _json_object(folder / name)
        if data and isinstance(data.get("method"), str):
            return data["method"]
    if (folder / "stereo.json").exists():
        return "stereo"
    if (folder / "cpe.json").exists():
        return "cpe"
    run = _json_object(folder / "run.json")
    if run and isinstance(run.get("config"), dict):
        return next((method for key, method in _SIGNATURES if key in run["config"]), "unknown")
    if any((folder / name).exists() for name in (TRAIN_STATE, "unet.pth", "loss.csv", "run.json")) or \
            any(folder.glob("unet_*.pth")):
        return "coerasing"
    return None


def _within(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def claim_run_folder(
    folder: str | Path, method: str, *, overwrite: bool = False, owned: tuple[str, ...] = (),
    inputs: dict[str, str | Path | None] | None = None, save_flag: str = "--save_path",
) -> None:
    """Make ``folder`` ready for a run of ``method``: never another method's run, never the command's inputs.

    A folder that holds another method's run is refused, with or without ``--overwrite``. With
    ``overwrite``, only the files and folders matching ``owned`` (glob patterns of what ``method``
    writes) are removed; other files stay. An input of the command (``inputs``: flag → path) among
    them is refused before anything is removed.
    """

    folder = Path(folder).expanduser()
    owner = run_owner(folder)
    if owner is not None and owner != method:
        raise CoErasingError(f"{save_flag} {folder} holds a {owner} run; a {method} run never writes into another "
                             "method's folder, with or without --overwrite. Pass another folder.")
    if not overwrite or not folder.is_dir():
        return
    doomed = sorted({path for pattern in owned for path in folder.glob(pattern)})
    for flag, value in (inputs or {}).items():
        if value and any(_within(Path(value).expanduser(), path) for path in doomed):
            raise CoErasingError(f"{flag} {value} lies among the files that --overwrite would remove from {folder}; "
                                 "move it out of that folder first, or pass another folder.")
    for path in doomed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

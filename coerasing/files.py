"""Writing files so that nothing is lost: atomic writes (temp file + rename) and stale-temp cleanup.

Every file the project writes (checkpoints, images, JSON, CSV) goes through :func:`atomic_write`:
it is written under a temporary name in the same folder, ``.<name>.<pid>.<random>.tmp``, and
renamed into place, so a crash never leaves a half-written file under the real name. A process
killed mid-write leaves its temporary file behind; :func:`remove_stale_temps` deletes those whose
process is gone (called when a run folder is opened again).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import CoErasingError

_TEMP = re.compile(r"^\..+\.(\d+)\.[^.]+\.tmp$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` and move ``tmp`` onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, payload: Any) -> Path:
    return atomic_write_text(path, json.dumps(payload, indent=2, default=str) + "\n")


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3… of ``/proc/<pid>/stat`` (state first); ``None`` where there is no such file."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()  # the command name (field 2) may hold spaces and parentheses


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, from ``/proc``); ``None`` where unknown."""
    stat = _stat_fields(pid)
    try:
        return int(stat[19]) if stat else None
    except (ValueError, IndexError):
        return None


def process_identity(pid: int | None = None) -> dict[str, Any]:
    """Who a process is, beyond its reusable pid: host, boot, start time and command (this one by default)."""
    pid = os.getpid() if pid is None else pid
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        command = " ".join(sys.argv) if pid == os.getpid() else ""
    return {"pid": pid, "host": socket.gethostname(), "boot": _boot_id(), "start": process_start(pid),
            "command": command[:300], "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def holder_alive(holder: dict[str, Any], marker: str = "") -> bool:
    """Whether the process ``holder`` (a :func:`process_identity`) still runs.

    On another host it is assumed alive. On this one the pid must run *and* be the same process: same
    boot and same start time (a pid reused after a restart, or by another program, is not the
    holder). Without a recorded start time (an old lock), the running process's command must
    contain ``marker``.
    """
    if holder.get("host") not in (None, socket.gethostname()):
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0 or not pid_alive(pid):
        return False
    stat = _stat_fields(pid)
    if stat and stat[0] in ("Z", "X"):  # exited, not yet reaped by its parent
        return False
    if holder.get("boot") and _boot_id() and holder["boot"] != _boot_id():
        return False
    if holder.get("start") is not None:
        return process_start(pid) in (None, holder["start"])
    return marker in process_identity(pid)["command"]


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temporary files of :func:`atomic_path` in ``folder`` whose writing process is gone."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        match = _TEMP.match(path.name)
        if match and path.is_file() and int(match.group(1)) != os.getpid() and not pid_alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _file_digest(path: Path, whole: int = 256 << 20, chunk: int = 1 << 20, samples: int = 64) -> str:
    """sha256 of a file: of all of it up to 256 MiB; above, of its size and 64 evenly spaced 1 MiB chunks
    (multi-GB weights hash in a second, and two checkpoints of one run still differ in many chunks)."""

    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as handle:
        if size <= whole:
            for block in iter(lambda: handle.read(chunk), b""):
                digest.update(block)
        else:
            for i in range(samples):
                handle.seek((size - chunk) * i // (samples - 1))
                digest.update(handle.read(chunk))
    return digest.hexdigest()[:16]


def fingerprint(spec: str | Path | None) -> str | None:
    """A short content fingerprint of a local file or folder (``None`` stays ``None``; a Hub id is itself).

    Folders hash every file's relative path and content (:func:`_file_digest`), so a changed weight
    file changes the fingerprint; results cached under the old one are never reused for it.
    """

    if spec is None:
        return None
    path = Path(spec).expanduser()
    if not path.exists():
        return str(spec)
    if path.is_file():
        return _file_digest(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(_file_digest(file).encode())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Reading back what was written


def _type_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("null" if k is type(None) else k.__name__ for k in kinds)


def record_problem(path: str | Path, required: dict[str, type | tuple[type, ...]] | None = None) -> str | None:
    """Why ``path`` is not a JSON object with the ``required`` fields of the given types, or ``None`` if it is.

    ``required`` maps a top-level key to its type (or a tuple of types; ``float`` also accepts an
    ``int``, ``bool`` is never an ``int``). A missing file, unreadable bytes, truncated or garbled JSON,
    a non-object, a missing key or a wrong-typed value are all named.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return "it does not exist"
    except (OSError, UnicodeDecodeError) as exc:
        return f"it could not be read ({exc})"
    try:
        data = json.loads(text)
    except ValueError as exc:
        return f"it is not valid JSON (truncated or garbled: {exc})"
    if not isinstance(data, dict):
        return f"it holds a JSON {type(data).__name__}, not an object"
    for key, kind in (required or {}).items():
        if key not in data:
            return f"it has no {key!r} field"
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds:
            kinds = (*kinds, int)
        value = data[key]
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            return f"its {key!r} field is {type(value).__name__}, not {_type_name(kind)}"
    return None


def read_json_record(path: str | Path, required: dict[str, type | tuple[type, ...]] | None = None,
                     warn: str | None = None) -> dict[str, Any] | None:
    """The JSON object in ``path`` if it has the ``required`` fields (see :func:`record_problem`), else ``None``.

    A missing file is ``None`` silently. A file that exists but is not such a record is ``None`` with a
    line on stderr naming it, when ``warn`` says what happens instead (e.g. ``"recomputing it"``);
    callers that cannot recompute use :func:`require_json_record`.
    """
    path = Path(path)
    if not path.exists():
        return None
    problem = record_problem(path, required)
    if problem is None:
        return json.loads(path.read_text(encoding="utf-8"))
    if warn is not None:
        print(f"warning: {path} is not a valid record: {problem}; {warn}.", file=sys.stderr, flush=True)
    return None


def require_json_record(path: str | Path, required: dict[str, type | tuple[type, ...]] | None = None,
                        fix: str = "delete it and rerun") -> dict[str, Any]:
    """The JSON object in ``path`` with the ``required`` fields, or a :class:`~coerasing.errors.CoErasingError`
    naming the file, what is wrong and ``fix`` (what the user does about it)."""

    problem = record_problem(path, required)
    if problem is not None:
        raise CoErasingError(f"{path} is not a valid record: {problem}; {fix}.")
    return json.loads(Path(path).read_text(encoding="utf-8"))

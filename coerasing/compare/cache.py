"""The comparison's cache: every trained run and every evaluation is a folder or file keyed by its settings.

A key is the sha256 of the canonical JSON of everything that produced the result (method, concept,
seed, every training and evaluation setting, the base model's and the artifact's content
fingerprints, and :data:`CACHE_VERSION`). A changed setting is a new key, so a stale result is never
served; an interrupted comparison finds the finished keys and redoes only the rest. Each entry
records its request (``request.json``) and is marked complete last (``done.json``), atomically.
Processes that share an output folder take a lock file per entry, so two never compute one entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..files import atomic_write, atomic_write_json, pid_alive

#: Bumped when what a cached entry means changes (a new metric, a fixed bug), so old entries are not reused.
CACHE_VERSION = 1
DONE = "done.json"
REQUEST = "request.json"


def canonical(payload: Any) -> str:
    """Canonical JSON (sorted keys, no spaces): equal settings give equal text."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)


def key_of(payload: Any) -> str:
    """The cache key of ``payload``: 16 hex digits of the sha256 of its canonical JSON."""
    return hashlib.sha256(canonical({"version": CACHE_VERSION, "payload": payload}).encode()).hexdigest()[:16]


def lock_owner() -> str:
    """What a lock file holds: ``<host> <pid>`` (ranks on several nodes may share one output folder)."""
    return f"{socket.gethostname()} {os.getpid()}"


def lock_is_stale(text: str) -> bool:
    """Whether a lock file's holder is gone: a pid of *this* host that no longer runs.

    A lock of another host is never taken over (its pid cannot be checked from here); an old lock
    holding only a pid is read as this host's.
    """
    host, _, pid = text.strip().rpartition(" ")
    if host and host != socket.gethostname():
        return False
    return pid.isdigit() and int(pid) > 0 and not pid_alive(int(pid))


@contextmanager
def locked(path: Path, poll: float = 1.0) -> Iterator[None]:
    """Hold ``path`` (a lock file with our host and pid) while the block runs; wait while another holds it.

    A lock left by a killed process of this host (its pid is gone) is taken over; one left by a
    killed process of another node must be deleted by hand (the files are ``cache/**/.*.lock``).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                stale = lock_is_stale(path.read_text())
            except OSError:
                stale = False
            if stale:
                path.unlink(missing_ok=True)
                continue
            time.sleep(poll)
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(lock_owner())
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _save_npz(path: Path, arrays: dict[str, Any]) -> None:
    with path.open("wb") as handle:  # a file object: np.savez would add ".npz" to a name
        np.savez(handle, **arrays)


class Cache:
    """Folders and files under ``<output_dir>/cache`` keyed by their settings."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root) / "cache"

    def folder(self, kind: str, payload: Any) -> Path:
        """``cache/<kind>/<key>/`` for ``payload``, with its request recorded."""
        folder = self.root / kind / key_of(payload)
        if not (folder / REQUEST).exists():
            atomic_write_json(folder / REQUEST, {"kind": kind, "payload": payload, "version": CACHE_VERSION})
        return folder

    @staticmethod
    def is_done(folder: Path, request: Any) -> bool:
        path = folder / DONE
        if not path.exists():
            return False
        try:
            return json.loads(path.read_text(encoding="utf-8")).get("request") == json.loads(canonical(request))
        except (OSError, ValueError):
            return False

    def once(self, folder: Path, request: Any, work: Callable[[], None]) -> None:
        """Run ``work`` unless ``folder`` is marked done for ``request``; mark it done afterwards."""
        if self.is_done(folder, request):
            return
        with locked(folder.parent / f".{folder.name}.lock"):
            if self.is_done(folder, request):  # another process finished it while we waited
                return
            work()
            atomic_write_json(folder / DONE, {"request": json.loads(canonical(request))})

    def json_entry(self, kind: str, payload: Any, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """``cache/<kind>/<key>.json``: computed once for ``payload``, read afterwards.

        Arrays that ``compute`` returns under ``"arrays"`` go to ``<key>.npz`` beside it (written first).
        The result's ``"path"`` is the JSON file.
        """
        key = key_of(payload)
        path = self.root / kind / f"{key}.json"
        if not path.exists():
            with locked(self.root / kind / f".{key}.lock"):
                if not path.exists():
                    result = compute()
                    arrays = result.pop("arrays", None)
                    if arrays:
                        atomic_write(path.with_suffix(".npz"), lambda tmp: _save_npz(tmp, arrays))
                    atomic_write_json(path, {"request": json.loads(canonical(payload)), **result})
        return {**json.loads(path.read_text(encoding="utf-8")), "path": str(path)}

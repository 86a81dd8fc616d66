"""The comparison's cache: every trained run and every evaluation is a folder or file keyed by its settings.

A key is the sha256 of the canonical JSON of everything that produced the result (method, concept,
seed, every training and evaluation setting, the base model's and the artifact's content
fingerprints, the protocol's metric declarations for an evaluation, and :data:`CACHE_VERSION`). A
changed setting or metric is a new key, so a stale result is never served; an interrupted comparison
finds the finished keys and redoes only the rest. Each entry records its request (``request.json``)
and is marked complete last (``done.json``), atomically. Processes that share an output folder take
a lock file per entry, so two never compute one entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..files import atomic_write, atomic_write_json, holder_alive, process_identity, read_json_record

#: Bumped only when the cache's own format changes. Metrics need no bump: their declarations are in each
#: evaluation's key (:meth:`coerasing.compare.protocols.EvaluationProtocol.evaluation_identity`), and a
#: metric whose computation changes bumps its own ``Metric.version``.
CACHE_VERSION = 1
DONE = "done.json"
REQUEST = "request.json"
#: The fields every JSON entry of a kind must have (besides ``request``); an entry without them is recomputed.
ENTRY_FIELDS: dict[str, dict[str, type]] = {"evals": {"metrics": dict}, "attacks": {"asr": dict},
                                            "robustness": {"result": object}}


def canonical(payload: Any) -> str:
    """Canonical JSON (sorted keys, no spaces): equal settings give equal text."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)


def key_of(payload: Any) -> str:
    """The cache key of ``payload``: 16 hex digits of the sha256 of its canonical JSON."""
    return hashlib.sha256(canonical({"version": CACHE_VERSION, "payload": payload}).encode()).hexdigest()[:16]


#: A waiting process says who it waits for after this many seconds, and again every minute.
WAIT_NOTICE_S = 5.0


def _read_holder(path: Path) -> dict[str, Any] | None:
    """The lock's holder: a :func:`~coerasing.files.process_identity` (an old lock holds only a pid)."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    try:
        holder = json.loads(text) if text else None
    except ValueError:
        return None
    if isinstance(holder, int):
        return {"pid": holder}
    return holder if isinstance(holder, dict) else None


def _describe(holder: dict[str, Any]) -> str:
    where = f" on {holder['host']}" if holder.get("host") else ""
    since = f" since {holder['since']}" if holder.get("since") else ""
    command = f" ({holder['command'][:120]})" if holder.get("command") else ""
    return f"process {holder.get('pid')}{where}{since}{command}"


@contextmanager
def locked(path: Path, poll: float = 1.0) -> Iterator[None]:
    """Hold ``path`` (a lock file naming its holder) while the block runs; wait while its holder runs.

    A lock whose holder is gone, or whose pid now belongs to another process (a restart, another
    program), is taken over with a message; a wait longer than :data:`WAIT_NOTICE_S` says whom it
    waits for. A lock whose file is empty or unreadable (its holder was killed while writing it) is
    given the same grace period, then taken over. A lock held on another host (ranks on several nodes
    sharing one output folder) is never taken over, since its process cannot be checked from here: one
    left by a killed process of another node must be deleted by hand (the files are ``cache/**/.*.lock``).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    started, told, unreadable_since = time.monotonic(), 0.0, None
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_holder(path)
            if holder is None:
                unreadable_since = unreadable_since or time.monotonic()
                if time.monotonic() - unreadable_since > WAIT_NOTICE_S:
                    print(f"taking over the lock {path}: it names no holder", file=sys.stderr, flush=True)
                    path.unlink(missing_ok=True)
                    unreadable_since = None
                    continue
            elif not holder_alive(holder, marker="compare"):
                print(f"taking over the lock {path}: its holder, {_describe(holder)}, is gone", file=sys.stderr,
                      flush=True)
                path.unlink(missing_ok=True)
                continue
            waited = time.monotonic() - started
            if holder is not None and waited > WAIT_NOTICE_S and waited - told > (60.0 if told else 0.0):
                print(f"waiting {waited:.0f} s for {_describe(holder)}, which holds {path}", file=sys.stderr,
                      flush=True)
                told = waited
            time.sleep(poll)
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(process_identity()))
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


#: Settings that hold a location: a relative value that exists is a path (``x``, ``./x``: one setting).
PATH_KEYS = frozenset({"ckpt_path", "model", "image", "unet_ckpt_path", "ip_adapter", "image_encoder_path",
                       "contrastive_image", "classifier", "clip_model", "nudenet_weights", "anchors", "artifact",
                       "preserve_prompts"})


def _looks_like_path(text: str, key: str | None) -> bool:
    """An absolute path, or a relative one that exists where it names a location (or looks like one)."""
    if os.path.isabs(os.path.expanduser(text)):
        return True
    if key in PATH_KEYS or "/" in text or text.startswith("."):
        return bool(text.strip()) and Path(text).expanduser().exists()
    return False


def _save_npz(path: Path, arrays: dict[str, Any]) -> None:
    with path.open("wb") as handle:  # a file object: np.savez would add ".npz" to a name
        np.savez(handle, **arrays)


def npz_problem(path: Path, names: list[str] | None) -> str | None:
    """Why ``path`` is not a readable ``.npz`` holding ``names`` (every array read, so a truncated or
    garbled file is caught by its zip checksums), or ``None``; a missing file is fine when no names are due."""
    if not path.exists():
        return f"{path} is missing" if names else None
    try:
        with np.load(path, allow_pickle=False) as arrays:
            for name in arrays.files:
                arrays[name]  # noqa: B018 - reading checks the CRC
            missing = sorted(set(names or []) - set(arrays.files))
    except Exception as exc:  # noqa: BLE001 - zipfile, numpy and OS errors alike mean "unreadable"
        return f"{path} could not be read ({type(exc).__name__}: {exc})"
    return f"{path} has no array {missing[0]!r}" if missing else None


class Cache:
    """Folders and files under ``<output_dir>/cache`` keyed by their settings."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root) / "cache"
        #: The output folder: paths inside it are keyed relative to it (see :meth:`portable`).
        self.output = Path(root).expanduser().resolve()

    def portable(self, payload: Any, key: str | None = None) -> Any:
        """``payload`` with every local path resolved, and written relative to the output folder inside it.

        So ``./x`` and ``x`` are one setting, and a comparison folder copied or moved elsewhere keeps its
        keys: nothing is retrained or re-evaluated for it. (Base models are keyed by their content's
        fingerprint besides their path, by the protocols.)
        """
        if isinstance(payload, dict):
            return {name: self.portable(value, str(name)) for name, value in payload.items()}
        if isinstance(payload, (list, tuple)):
            return [self.portable(value, key) for value in payload]
        if isinstance(payload, Path) or (isinstance(payload, str) and _looks_like_path(payload, key)):
            path = Path(payload).expanduser().resolve()
            if path == self.output or self.output in path.parents:
                relative = path.relative_to(self.output).as_posix()
                return "<output>" if relative == "." else f"<output>/{relative}"
            return str(path)
        return payload

    def key(self, payload: Any) -> str:
        """The cache key of ``payload`` (:func:`key_of` of its :meth:`portable` form)."""
        return key_of(self.portable(payload))

    def folder(self, kind: str, payload: Any) -> Path:
        """``cache/<kind>/<key>/`` for ``payload``, with its request recorded."""
        payload = self.portable(payload)
        folder = self.root / kind / key_of(payload)
        if read_json_record(folder / REQUEST, {"kind": str, "version": int}, warn="rewriting it") is None:
            atomic_write_json(folder / REQUEST, {"kind": kind, "payload": payload, "version": CACHE_VERSION})
        return folder

    @staticmethod
    def is_done(folder: Path, request: Any, warn: bool = False) -> bool:
        """Whether ``folder`` is marked done for ``request``; an unreadable mark is not done (``warn``: say so)."""
        done = read_json_record(folder / DONE, {"request": object}, warn="redoing the entry" if warn else None)
        return done is not None and done["request"] == json.loads(canonical(request))

    def once(self, folder: Path, request: Any, work: Callable[[], None]) -> None:
        """Run ``work`` unless ``folder`` is marked done for ``request``; mark it done afterwards."""
        request = self.portable(request)
        if self.is_done(folder, request):
            return
        with locked(folder.parent / f".{folder.name}.lock"):
            if self.is_done(folder, request, warn=True):  # another process finished it while we waited
                return
            work()
            atomic_write_json(folder / DONE, {"request": json.loads(canonical(request))})

    def json_entry(self, kind: str, payload: Any, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """``cache/<kind>/<key>.json``: computed once for ``payload``, read afterwards.

        Arrays that ``compute`` returns under ``"arrays"`` go to ``<key>.npz`` beside it (written first;
        the JSON lists their names). The result's ``"path"`` is the JSON file. An entry that does not read
        back whole (truncated or garbled JSON or ``.npz``, a missing field, another request) is computed
        again, with a warning naming the file.
        """
        payload = self.portable(payload)
        key = key_of(payload)
        path = self.root / kind / f"{key}.json"
        entry = self._read_entry(kind, path, payload, warn=False)
        if entry is None:
            with locked(self.root / kind / f".{key}.lock"):
                entry = self._read_entry(kind, path, payload, warn=True)
                if entry is None:
                    result = compute()
                    arrays = result.pop("arrays", None)
                    if arrays:
                        atomic_write(path.with_suffix(".npz"), lambda tmp: _save_npz(tmp, arrays))
                    atomic_write_json(path, {"request": json.loads(canonical(payload)), **result,
                                             **({"arrays": sorted(arrays)} if arrays else {})})
                    entry = json.loads(path.read_text(encoding="utf-8"))
        return {**entry, "path": str(path)}

    @staticmethod
    def _read_entry(kind: str, path: Path, payload: Any, warn: bool) -> dict[str, Any] | None:
        """The entry at ``path`` if it reads back whole and answers ``payload``, else ``None`` (:meth:`json_entry`)."""
        how = "computing it again" if warn else None
        entry = read_json_record(path, {"request": object, **ENTRY_FIELDS.get(kind, {})}, warn=how)
        if entry is None:
            return None
        if entry["request"] != json.loads(canonical(payload)):
            if warn:
                print(f"warning: {path} answers another request; computing it again.", file=sys.stderr, flush=True)
            return None
        names = entry.get("arrays")
        problem = npz_problem(path.with_suffix(".npz"), names if isinstance(names, list) else None)
        if problem is not None:
            if warn:
                print(f"warning: {problem}; computing {path} again.", file=sys.stderr, flush=True)
            return None
        return entry

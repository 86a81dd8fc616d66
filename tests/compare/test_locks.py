"""The cache's lock files name their holder; a lock of a gone or different process is taken over, with a word."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from coerasing.compare import cache
from coerasing.compare.cache import locked
from coerasing.files import holder_alive, process_identity, process_start

linux_only = pytest.mark.skipif(process_start(os.getpid()) is None, reason="needs /proc (Linux)")


def test_a_lock_names_its_holder(tmp_path):
    path = tmp_path / "a.lock"
    with locked(path):
        holder = json.loads(path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] and "since" in holder
    assert not path.exists()


@linux_only
def test_this_process_is_alive_and_a_reused_pid_is_not():
    me = process_identity()
    assert holder_alive(me)
    assert not holder_alive({**me, "start": me["start"] + 1})  # same pid, another process
    assert not holder_alive({**me, "boot": "another-boot"})  # same pid after a restart


@linux_only
def test_pid_one_is_not_a_comparison(tmp_path, capsys):
    """The probe's hang: a lock whose pid belongs to a live process that is not a comparison."""
    path = tmp_path / "b.lock"
    path.write_text("1")  # an old-style lock: just a pid, here of init
    start = time.monotonic()
    with locked(path, poll=0.05):
        pass
    assert time.monotonic() - start < 2
    assert "is gone" in capsys.readouterr().err


def test_a_dead_holder_is_taken_over(tmp_path, capsys):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    path = tmp_path / "c.lock"
    path.write_text(json.dumps(process_identity(child.pid) | {"pid": child.pid}))
    with locked(path, poll=0.05):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert "taking over" in capsys.readouterr().err


@linux_only
def test_a_live_holder_is_waited_for_and_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cache, "WAIT_NOTICE_S", 0.2)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    try:
        path = tmp_path / "d.lock"
        path.write_text(json.dumps(process_identity(child.pid)))
        start = time.monotonic()
        with locked(path, poll=0.05):
            waited = time.monotonic() - start
    finally:
        child.wait()
    err = capsys.readouterr().err
    assert waited > 1.0  # it waited for the live holder ...
    assert "waiting" in err and f"process {child.pid}" in err  # ... and said for whom
    assert "taking over" in err  # then took over the lock the finished holder left behind


def test_an_empty_lock_is_taken_over_after_the_grace_period(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cache, "WAIT_NOTICE_S", 0.2)
    path = tmp_path / "e.lock"
    path.write_text("")
    with locked(path, poll=0.05):
        pass
    assert "names no holder" in capsys.readouterr().err

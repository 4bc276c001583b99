"""Directories of killed kernel providers: which ones a new provider removes, and which it leaves."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.kernels import leftovers


def _made(parent: Path, name: str, owner: str | None) -> Path:
    directory = parent / name
    (directory / "work" / "k1").mkdir(parents=True)
    (directory / "work" / "k1" / "out.txt").write_text("x")
    os.chmod(directory / "work", 0o300)  # as a provider leaves its working directories: unlistable
    if owner is not None:
        (directory / leftovers.OWNER).write_text(owner)
    return directory


def _dead_process() -> tuple[int, int]:
    """The pid and start time of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    started = leftovers._started(proc.pid)
    assert started is not None
    proc.kill()
    proc.wait()
    return proc.pid, started


def test_only_directories_of_a_gone_owner_in_this_namespace_are_removed(tmp_path: Path) -> None:
    ns = leftovers._namespace()
    assert ns is not None
    pid, started = _dead_process()
    me = os.getpid()
    dead = _made(tmp_path, "cablectl-kernels-dead", f"{pid} {started} {ns}")
    reused = _made(tmp_path, "cablectl-kernels-reused", f"{me} {started - 1} {ns}")  # my pid, not me
    alive = _made(tmp_path, "cablectl-kernels-alive", f"{me} {leftovers._started(me)} {ns}")
    elsewhere = _made(tmp_path, "cablectl-kernels-other-ns", f"{pid} {started} {ns + 1}")
    unmarked = _made(tmp_path, "cablectl-kernels-new", None)
    garbage = _made(tmp_path, "cablectl-kernels-garbage", "not an owner")
    other = _made(tmp_path, "something-else", f"{pid} {started} {ns}")
    # a link by a matching name to a dead owner's directory: never followed
    target = _made(tmp_path, "target", f"{pid} {started} {ns}")
    (tmp_path / "cablectl-kernels-link").symlink_to(target)
    assert sorted(leftovers.sweep(tmp_path, "cablectl-kernels-")) == sorted([dead, reused])
    assert not dead.exists() and not reused.exists()
    for kept in (alive, elsewhere, unmarked, garbage, other, target, tmp_path / "cablectl-kernels-link"):
        assert kept.is_dir()
    assert (target / "work").stat().st_mode & 0o777 == 0o300  # untouched


def test_mark_names_this_process(tmp_path: Path) -> None:
    leftovers.mark(tmp_path)
    pid, started, ns = (int(x) for x in (tmp_path / leftovers.OWNER).read_text().split())
    assert (pid, started, ns) == (os.getpid(), leftovers._started(os.getpid()), leftovers._namespace())
    assert leftovers.sweep(tmp_path.parent, tmp_path.name) == []  # alive: kept


def test_no_proc_of_our_own_means_no_mark_and_no_sweep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/proc of another PID namespace (a host's, seen from a container): ids there are not ours."""
    monkeypatch.setattr(os, "readlink", lambda path: "1")
    leftovers.mark(tmp_path)
    assert not (tmp_path / leftovers.OWNER).exists()
    dead = _made(tmp_path, "cablectl-kernels-x", "1 1 1")
    assert leftovers.sweep(tmp_path, "cablectl-kernels-") == [] and dead.is_dir()

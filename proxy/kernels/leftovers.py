"""What a proxy killed outright (SIGKILL, the OOM killer, ``docker kill``) leaves behind: the
kernels' root in the temporary directory and their runtime files on /dev/shm, which no cleanup
of its own removed. Its kernels die with it (death signals); their directories do not.

Each such directory of a provider's own making carries an ``.owner`` file: the process id
that made it, that process's start time and its PID namespace. A new provider removes those
whose owner is gone: the same PID namespace as its own, and no process with that id started at
that time (an id reused since is another process). A directory with no such file (being made
this instant, or not ours), or made in another PID namespace (another container sharing the
directory, whose process ids mean nothing here), is left alone.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

__all__ = ["OWNER", "mark", "sweep"]

log = logging.getLogger("cablectl.kernels")
OWNER = ".owner"


def _started(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22 of stat: starttime


def _namespace() -> int:
    return os.stat("/proc/self/ns/pid").st_ino


def mark(directory: Path) -> None:
    """Say that this process made ``directory`` (and will remove it unless it is killed)."""
    pid = os.getpid()
    (directory / OWNER).write_text(f"{pid} {_started(pid)} {_namespace()}\n")


def _abandoned(directory: Path, namespace: int) -> bool:
    try:
        pid, started, ns = (int(x) for x in (directory / OWNER).read_text().split())
    except (OSError, ValueError):
        return False  # not ours to judge
    return ns == namespace and _started(pid) != started


def sweep(parent: Path, prefix: str) -> list[Path]:
    """Remove the directories ``parent/prefix*`` whose owner is gone; the ones removed."""
    if not Path("/proc/self/ns/pid").exists():
        return []
    namespace = _namespace()
    try:
        candidates = [d for d in parent.iterdir() if d.name.startswith(prefix) and d.is_dir()]
    except OSError:
        return []
    removed = []
    for directory in candidates:
        if not _abandoned(directory, namespace):
            continue
        try:  # the kernels' working directories are not listable: made so again first
            for child in directory.iterdir():
                if child.is_dir() and not child.is_symlink():
                    child.chmod(0o700)
        except OSError:
            pass
        shutil.rmtree(directory, ignore_errors=True)
        if not directory.exists():
            removed.append(directory)
    if removed:
        log.info("removed %d directories of kernel providers that were killed: %s", len(removed), removed)
    return removed

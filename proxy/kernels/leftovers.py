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
import tempfile
from pathlib import Path

__all__ = ["OWNER", "make", "mark", "sweep"]

log = logging.getLogger("cablectl.kernels")
OWNER = ".owner"


def _started(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22 of stat: starttime
    except (OSError, ValueError, IndexError):
        return None


def _namespace() -> int | None:
    """This process's PID namespace, when /proc is this namespace's own (not a host's /proc
    seen from inside a container, where process ids would name other processes); else None."""
    try:
        if os.readlink("/proc/self") != str(os.getpid()):
            return None
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def mark(directory: Path) -> None:
    """Say that this process made ``directory`` (and will remove it unless it is killed).
    Best effort: with no /proc of our own, nothing is written and nothing will be swept."""
    pid, namespace = os.getpid(), _namespace()
    started = _started(pid)
    if namespace is None or started is None:
        return
    try:
        (directory / OWNER).write_text(f"{pid} {started} {namespace}\n")
    except OSError as exc:
        log.warning("could not mark %s as this proxy's: %s", directory, exc)


def _abandoned(directory: Path, namespace: int) -> bool:
    try:
        pid, started, ns = (int(x) for x in (directory / OWNER).read_text().split())
    except (OSError, ValueError):
        return False  # not ours to judge
    return ns == namespace and _started(pid) != started


def _remove(directory: Path) -> bool:
    """Remove a killed provider's directory (its kernels' working directories are not
    listable: made so again first); never through a symbolic link."""
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                os.chmod(entry.path, 0o700)
    shutil.rmtree(directory, ignore_errors=True)
    return not os.path.lexists(directory)


def sweep(parent: Path, prefix: str) -> list[Path]:
    """Remove the directories ``parent/prefix*`` whose owner is gone; the ones removed. Never
    raises: a directory it cannot judge or remove is left."""
    namespace = _namespace()
    if namespace is None:
        return []
    removed = []
    try:
        with os.scandir(parent) as entries:
            candidates = [
                Path(e.path) for e in entries if e.name.startswith(prefix) and e.is_dir(follow_symlinks=False)
            ]
    except OSError:
        return []
    for directory in candidates:
        try:
            if _abandoned(directory, namespace) and _remove(directory):
                removed.append(directory)
        except OSError as exc:
            log.debug("left %s: %s", directory, exc)
    if removed:
        log.info("removed %d directories of kernel providers that were killed: %s", len(removed), removed)
    return removed


def make(prefix: str, parent: Path | None = None) -> Path:
    """A new directory ``parent/prefix*`` of this process's own (marked), after removing those
    of killed owners; ``parent``: the temporary directory unless given."""
    parent = parent or Path(tempfile.gettempdir())
    sweep(parent, prefix)
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    mark(directory)
    return directory

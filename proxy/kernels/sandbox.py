"""Every local kernel in a bubblewrap sandbox of its own.

bubblewrap (``bwrap``, Debian's ``bubblewrap``, what Flatpak uses) starts the kernel in new
user, PID, mount, IPC, UTS, cgroup and network namespaces (``--unshare-all``), as an
unprivileged uid inside, in a session of its own, killed when its parent goes
(``--die-with-parent``). What it sees of the filesystem is built from nothing:

- read-only: ``/usr`` (and the merged-usr links), the Python installation the kernel runs
  from (``sys.base_prefix``) and the proxy's virtual environment (``sys.prefix``), and the
  few files of ``/etc`` a Python process reads (the loader cache, time zone, certificates);
- read-write: its own working directory, and its own runtime directory (its connection file
  and IPC sockets), each bound at the same path as outside, so the proxy reaches the sockets;
- a private ``/tmp``, its own ``/proc`` (its PID namespace: no other kernel, no proxy),
  a minimal ``/dev``; everything else is read-only.

Nothing else exists inside: no other kernel's directory or connection file, no config file,
no ``/etc/shadow``, no ``/root``, no session store data, no network (unless
``kernels.network: host``). The sandbox is made by a launcher that runs (with the scrubbed
environment) where jupyter_client starts the kernel: it reads the kernel's paths from the
connection file's location and ``exec``s bwrap, so the process jupyter_client holds is
bwrap's, and killing it takes the whole sandbox with it.

Kernels are interrupted by message (``interrupt_request`` on the control channel): a signal to
bwrap would not reach the kernel inside.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["bwrap_path", "bwrap_works", "sandbox_argv"]

# /etc files a Python process may read; nothing with secrets (no shadow, no ssh, no ssl keys)
ETC_FILES = (
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/etc/nsswitch.conf",
    "/etc/hosts",
    "/etc/ssl/certs",
    "/etc/ca-certificates.conf",
    "/etc/alternatives",
    "/etc/mime.types",
)
INSIDE_UID = 1000  # an unprivileged uid inside the user namespace


def bwrap_path() -> str | None:
    return shutil.which("bwrap")


def bwrap_works(bwrap: str | None = None) -> bool:
    """Whether bubblewrap can make a sandbox here (it needs user namespaces)."""
    bwrap = bwrap or bwrap_path()
    if bwrap is None:
        return False
    argv = [bwrap, *_base_args(network=False), "--", sys.executable, "-c", "pass"]
    try:
        done = subprocess.run(argv, env={}, capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _ro(path: str) -> list[str]:
    return ["--ro-bind-try", path, path]


def _base_args(network: bool) -> list[str]:
    args = [
        "--unshare-all",
        "--die-with-parent",
        "--new-session",
        "--uid",
        str(INSIDE_UID),
        "--gid",
        str(INSIDE_UID),
        "--ro-bind",
        "/usr",
        "/usr",
    ]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        target = Path("/") / name
        if target.is_symlink():
            args += ["--symlink", str(target.readlink()), str(target)]
        elif target.is_dir():
            args += _ro(str(target))
    for prefix in dict.fromkeys([sys.base_prefix, sys.prefix, str(Path(sys.executable).resolve().parent)]):
        args += _ro(prefix)
    for path in ETC_FILES:
        args += _ro(path)
    args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    if network:
        args.append("--share-net")
    return args


def sandbox_argv(bwrap: str, workdir: str, rundir: str, network: bool) -> list[str]:
    """bwrap's arguments for one kernel (the command to run follows ``--``)."""
    return [
        bwrap,
        *_base_args(network),
        "--bind",
        workdir,
        workdir,
        "--bind",
        rundir,
        rundir,
        "--chdir",
        workdir,
        # ipykernel would watch the proxy's pid, which its PID namespace cannot see: 1 means
        # "a parent, not to be polled"; bwrap's --die-with-parent ends the kernel with the proxy
        "--setenv",
        "JPY_PARENT_PID",
        "1",
        "--remount-ro",  # the sandbox's own root: nothing can be written outside these binds and /tmp
        "/",
        "--",
    ]

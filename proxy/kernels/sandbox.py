"""Every local kernel in a bubblewrap sandbox of its own.

bubblewrap (``bwrap``, Debian's ``bubblewrap``, what Flatpak uses) starts the kernel in new
user, PID, mount, IPC, UTS, cgroup and network namespaces, as an unprivileged uid inside with
no capabilities, in a session of its own (no terminal to push keystrokes into), killed when its
parent goes (``--die-with-parent``), and, with bwrap 0.8 or later, unable to make further user
namespaces. What it sees of the filesystem is built from nothing:

- read-only: ``/usr`` (and the merged-usr links), the Python installation the kernel runs
  from (``sys.base_prefix``) and the proxy's virtual environment (``sys.prefix``), and the
  few files of ``/etc`` a Python process reads (loader cache, time zone, certificates), plus a
  ``passwd``, ``group`` and ``hosts`` of its own (written per kernel: one user, ``sandbox``);
- read-write: its own working directory, bound at the same path as outside, and at the path of
  its runtime directory, a directory with a copy of its connection file, where it makes its IPC
  sockets. The proxy connects through hard links to those sockets in the runtime directory,
  which the kernel cannot see: a program may replace its socket files (by symlinks to any unix
  socket on the host, say), but cannot change where the proxy's connections and reconnections go;
- a private ``/tmp`` and ``/dev/shm`` (memory, each capped), its own ``/proc`` (its PID
  namespace: no other kernel, no proxy), a minimal ``/dev``; the rest of its root is read-only.

Nothing else exists inside: no other kernel's directory or connection file, no config file,
no ``/etc/shadow``, no ``/root``, no session store data, no network (unless
``kernels.network: host``). The sandbox is made by a launcher that runs (with the scrubbed
environment) where jupyter_client starts the kernel: it reads bwrap's arguments from
``sandbox.json`` beside the connection file and ``exec``s bwrap, so the process jupyter_client
holds is bwrap's, and killing it takes the whole sandbox (a PID namespace) with it. bwrap's
``--die-with-parent`` is tied to the thread that started it: the pool's event loop thread.

Kernels are interrupted by message (``interrupt_request`` on the control channel, which
ipykernel turns into a SIGINT to itself): a signal to bwrap would not reach the kernel inside.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from proxy.errors import ConfigError
from proxy.kernels.execution import KernelDied

__all__ = ["ARGV_FILE", "SANDBOX_UID", "Bubblewrap", "link_sockets", "require_sandbox", "sandbox_launcher"]

log = logging.getLogger("cablectl.kernels")

# /etc files a Python process may read; nothing with secrets (no shadow, no ssh, no ssl keys)
ETC_FILES = (
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/etc/nsswitch.conf",
    "/etc/ssl/certs",
    "/etc/ca-certificates.conf",
    "/etc/alternatives",
    "/etc/mime.types",
)
SANDBOX_UID = 1000  # an unprivileged uid (and gid) inside the user namespace
SANDBOX_USER = "sandbox"  # its name in the sandbox's own /etc/passwd, and the hostname
ARGV_FILE = "sandbox.json"  # bwrap's arguments for one kernel, beside its connection file
INSIDE = "sandbox"  # the part of a kernel's runtime directory it sees
DEFAULT_TMPFS_BYTES = 1 << 30  # /tmp and /dev/shm are memory: capped, at the memory limit if set

FIX = (
    "install it (apt-get install bubblewrap) where user namespaces are allowed: in Docker, "
    "docker run --security-opt seccomp=unconfined --security-opt apparmor=unconfined "
    "--security-opt systempaths=unconfined (see the Dockerfile); on Ubuntu 24.04 and later, an "
    "AppArmor profile for bwrap or sysctl kernel.apparmor_restrict_unprivileged_userns=0. Or use "
    "remote kernels (kernels.gateway_url), or set kernels.sandbox: none to run kernels unsandboxed "
    "(they then see the host's files and processes: trusted programs only)"
)


@dataclass(frozen=True)
class Bubblewrap:
    """``bwrap`` on this host, and whether it can forbid user namespaces inside (0.8+)."""

    path: str
    disable_userns: bool = False

    @classmethod
    def find(cls) -> Bubblewrap | None:
        path = shutil.which("bwrap")
        if path is None:
            return None
        try:
            helped = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return cls(path)
        return cls(path, disable_userns="--disable-userns" in helped.stdout)

    def problem(self) -> str | None:
        """Why bwrap cannot make a kernel's sandbox here (its own words), or None if it can."""
        argv = [self.path, *self._base(network=False, tmpfs_bytes=DEFAULT_TMPFS_BYTES)]
        argv += ["--", sys.executable, "-c", "pass"]
        try:
            done = subprocess.run(argv, env={}, capture_output=True, text=True, timeout=30, check=False)
        except subprocess.TimeoutExpired:
            return "bwrap did not finish in 30 s"
        except OSError as exc:
            return f"bwrap could not run: {exc.strerror}"
        if done.returncode == 0:
            return None
        lines = done.stderr.strip().splitlines()
        return lines[-1] if lines else f"bwrap exited with status {done.returncode}"

    def _base(self, network: bool, tmpfs_bytes: int) -> list[str]:
        args = ["--unshare-all", "--unshare-user"]  # --unshare-all only tries the user namespace
        if self.disable_userns:
            args.append("--disable-userns")
        args += [
            "--cap-drop",
            "ALL",
            "--die-with-parent",
            "--new-session",
            "--uid",
            str(SANDBOX_UID),
            "--gid",
            str(SANDBOX_UID),
            "--hostname",
            SANDBOX_USER,
            *_host_view(),
            "--proc",
            "/proc",
            "--dev",
            "/dev",
        ]
        args += [
            "--size",
            str(tmpfs_bytes),
            "--tmpfs",
            "/dev/shm",
            "--size",
            str(tmpfs_bytes),
            "--tmpfs",
            "/tmp",
        ]
        if network:
            args.append("--share-net")
        return args

    def argv(self, workdir: str, rundir: str, *, network: bool, tmpfs_bytes: int = 0) -> list[str]:
        """bwrap's arguments for one kernel (the command to run follows ``--``). Inside, the
        path of ``rundir`` is ``rundir/sandbox``: see ``prepare``."""
        run = Path(rundir)
        args = [self.path, *self._base(network, tmpfs_bytes or DEFAULT_TMPFS_BYTES)]
        for name in ("passwd", "group", "hosts"):
            args += ["--ro-bind", str(run / "etc" / name), f"/etc/{name}"]
        return [
            *args,
            "--bind",
            workdir,
            workdir,
            "--bind",
            str(run / INSIDE),
            rundir,
            "--chdir",
            workdir,
            # ipykernel would watch the proxy's pid, which its PID namespace cannot see: 1 means
            # "a parent, not to be polled"; bwrap's --die-with-parent ends the kernel with the proxy
            "--setenv",
            "JPY_PARENT_PID",
            "1",
            "--remount-ro",  # the sandbox's own root: nothing can be written outside these binds
            "/",
            "--",
        ]

    def prepare(
        self, workdir: Path, rundir: Path, *, network: bool, tmpfs_bytes: int = 0, launcher: bool = True
    ) -> Path:
        """Lay out one kernel's runtime directory; returns the directory its sockets appear in.

        ``rundir`` itself is the proxy's: the connection file jupyter_client writes,
        ``sandbox.json`` (for ``sandbox_launcher``; not written with ``launcher=False``: a
        forked kernel's bwrap has its arguments from the proxy), the kernel's ``/etc`` files,
        and (``link_sockets``) hard links to the kernel's sockets, through which the proxy
        connects. The kernel sees ``rundir/sandbox``
        at ``rundir``'s path: a copy of its connection file, and the sockets it makes. A program
        can replace what it sees there (with symlinks to any socket on the host, say), never
        where the proxy's connections go."""
        inside = rundir / INSIDE
        inside.mkdir(mode=0o700)
        etc = rundir / "etc"
        etc.mkdir(mode=0o755)
        uid = SANDBOX_UID
        (etc / "passwd").write_text(f"{SANDBOX_USER}:x:{uid}:{uid}:cablectl kernel:{workdir}:/bin/sh\n")
        (etc / "group").write_text(f"{SANDBOX_USER}:x:{uid}:\n")
        (etc / "hosts").write_text(f"127.0.0.1\tlocalhost {SANDBOX_USER}\n::1\tlocalhost\n")
        if launcher:
            argv = self.argv(str(workdir), str(rundir), network=network, tmpfs_bytes=tmpfs_bytes)
            (rundir / ARGV_FILE).write_text(json.dumps({"argv": argv, "inside": str(inside)}))
        return inside


async def link_sockets(
    inside: Path,
    rundir: Path,
    names: list[str],
    alive: Callable[[], Awaitable[bool]],
    timeout: float,
    link: bool = True,
) -> None:
    """Hard-link each socket ``names`` the kernel makes in ``inside`` into ``rundir`` as soon as
    it exists (the proxy's connections find them there, and retry until then). ``link=False``:
    only wait until they exist (ZeroMQ would otherwise retry a connection to a socket not made
    yet only after its 100 ms reconnect interval)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pending = list(names)
    while pending:
        for name in list(pending):
            try:
                mode = os.lstat(inside / name).st_mode
            except FileNotFoundError:
                continue
            if not stat.S_ISSOCK(mode):
                raise KernelDied(f"the kernel made {name} but not as a socket")
            if link:
                os.link(inside / name, rundir / name, follow_symlinks=False)
            pending.remove(name)
        if not pending:
            return
        if not await alive():
            raise KernelDied("the kernel exited before it opened its sockets")
        if loop.time() > deadline:
            raise KernelDied(f"the kernel did not open its sockets in {timeout:.0f} s")
        await asyncio.sleep(0.005)


def _ro(path: str) -> list[str]:
    return ["--ro-bind-try", path, path]


@functools.cache
def _host_view() -> tuple[str, ...]:
    """bwrap's arguments that show the sandbox the host's read-only minimum: ``/usr``, the top
    directories that are links into it, the Python it runs from, a few ``/etc`` files. Read
    from the host once (a kernel's start would stat and resolve them all again)."""
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        target = Path("/") / name
        if target.is_symlink():
            args += ["--symlink", str(target.readlink()), str(target)]
        elif target.is_dir():
            args += _ro(str(target))
    bound = [Path("/usr")]
    for prefix in dict.fromkeys([sys.base_prefix, sys.prefix, str(Path(sys.executable).resolve().parent)]):
        if _within(Path(prefix), bound):
            continue  # what it holds is there already: one mount less
        bound.append(Path(prefix))
        args += _ro(prefix)
    for path in ETC_FILES:
        link = _link_into(Path(path), bound)
        # a link to a file the sandbox sees already (/etc/localtime): the same link, no mount
        args += ["--symlink", str(link), path] if link is not None else _ro(path)
    return tuple(args)


def _within(path: Path, bound: list[Path]) -> bool:
    """Whether ``path`` (with no symbolic link on the way: it is itself, resolved) is inside one
    of the ``bound`` directories, each bound read-only at its own path (recursively): then the
    sandbox sees it, the same files, read-only, without a mount of its own. Its ancestors are
    real directories (an ancestor of a resolved path is one), so the bind of the one it is in
    shows it where it is."""
    if not path.is_absolute() or path.resolve() != path:
        return False
    return any(path.is_relative_to(b) for b in bound)


def _link_into(path: Path, bound: list[Path]) -> Path | None:
    """Where ``path`` leads, if it is a symbolic link to a file the sandbox sees at the same path
    (inside ``bound``; ``/etc/localtime`` to ``/usr/share/zoneinfo/...``, say); else None."""
    if not path.is_symlink():
        return None
    target = path.resolve()
    return target if target.is_file() and _within(target, bound) else None


def sandbox_launcher(inner: str) -> str:
    """Python source run where jupyter_client starts a kernel: it copies the connection file (the
    last argument) to where the kernel will see it, and ``exec``s bwrap with the arguments in
    ``sandbox.json`` beside it, and ``inner`` (more Python source, given the same arguments) as
    the command inside."""
    return (
        "import json, os, sys\n"
        "conn = sys.argv[-1]\n"
        f"spec = json.load(open(os.path.join(os.path.dirname(conn), {ARGV_FILE!r})))\n"
        "copy = os.path.join(spec['inside'], os.path.basename(conn))\n"
        "fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)\n"
        "os.write(fd, open(conn, 'rb').read())\n"
        "os.close(fd)\n"
        f"os.execv(spec['argv'][0], [*spec['argv'], sys.executable, '-c', {inner!r}, *sys.argv[1:]])\n"
    )


def require_sandbox(mode: str) -> Bubblewrap | None:
    """The bubblewrap local kernels run in (``kernels.sandbox``: ``auto`` or ``bwrap``), None for
    ``none``; refuses to start, naming the fix, where it cannot make a sandbox."""
    if mode == "none":
        log.warning("kernels.sandbox is none: programs can see the host's files and processes")
        return None
    bwrap = Bubblewrap.find()
    why = "bwrap is not installed" if bwrap is None else bwrap.problem()
    if bwrap is not None and why is None:
        return bwrap
    raise ConfigError(
        f"kernels.sandbox is {mode!r}, but bubblewrap cannot make a sandbox here ({why}): {FIX}"
    )

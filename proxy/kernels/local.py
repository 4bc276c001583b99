"""Local ipykernel processes through jupyter_client's async API.

- In a bubblewrap sandbox of its own by default (``kernels.sandbox``; see
  ``proxy.kernels.sandbox``): its own namespaces, an unprivileged uid, only its own directories
  of the host's files writable, nothing of any other kernel or of the proxy visible.
- IPC transport (unix sockets in a private runtime directory per kernel): ipykernel warns that
  TCP traffic between proxy and kernel is unencrypted, and nothing else needs to reach it.
- A minimal environment: PATH, HOME (the kernel's own directory), locale; never the
  proxy's environment, so no API key or proxy secret reaches user code.
- Its own working directory per kernel (a kernel serves one session, then is discarded).
- Optional resource limits (address space, CPU seconds, open files), applied by a
  tiny launcher before it execs ipykernel.
- No network: a sandbox has a network namespace of its own (only a loopback that is down),
  so a program cannot reach Redis, the proxy, the cloud metadata address or anything else.
  IPC sockets are files and still work. Unsandboxed, the launcher makes that namespace
  itself where the host allows it (root or unprivileged user namespaces); ``network="auto"``
  falls back to the host's network (with a warning) where neither exists, ``"isolated"``
  refuses to start instead.
- For unsandboxed kernels (``kernels.sandbox: none``), which run as the proxy's user and see
  what it sees, the proxy marks itself non-dumpable (its ``/proc/<pid>/environ`` and memory are
  closed to its own user's other processes; root can still read them), and ``work/`` is
  write+search only (0300), so a kernel cannot list it to find another live kernel's directory.

See the README's "Kernel isolation" section for what each mode prevents, and what still needs
remote kernels.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import queue
import secrets
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, cast

import zmq
import zmq.asyncio
from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.connect import write_connection_file
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.session import Session

from proxy.kernels import leftovers
from proxy.kernels.base import KernelConnection, KernelProvider, Message
from proxy.kernels.execution import KernelDied
from proxy.kernels.forking import ForkServer
from proxy.kernels.sandbox import Bubblewrap, link_sockets, sandbox_launcher

__all__ = [
    "START_DEFAULT",
    "ForkedKernel",
    "LocalKernel",
    "LocalKernelProvider",
    "ResourceLimits",
    "can_isolate_network",
    "start_mode",
]

log = logging.getLogger("cablectl.kernels")

SPEC_NAME = "cablectl-python"

# Leaves the host's network: a new network namespace (as root), else a user namespace mapping
# this uid to itself plus a network namespace. Exit status 3 if neither is possible.
_UNSHARE_NET = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "if libc.unshare(0x40000000) != 0:\n"
    "    uid, gid = os.getuid(), os.getgid()\n"
    "    if libc.unshare(0x10000000 | 0x40000000) != 0: sys.exit(3)\n"
    "    open('/proc/self/setgroups', 'w').write('deny')\n"
    "    open('/proc/self/uid_map', 'w').write(f'{uid} {uid} 1')\n"
    "    open('/proc/self/gid_map', 'w').write(f'{gid} {gid} 1')\n"
)
# Applies rlimits, then becomes ipykernel. Runs with the scrubbed env, so it imports nothing of ours.
_LAUNCHER = (
    "import os, resource, sys\n"
    "mem, cpu, files, nonet = (int(x) for x in sys.argv[1:5])\n"
    "if nonet: exec(" + repr(_UNSHARE_NET) + ")\n"
    "if mem: resource.setrlimit(resource.RLIMIT_AS, (mem, mem))\n"
    "if cpu: resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))\n"
    "if files: resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'ipykernel_launcher', *sys.argv[5:]])\n"
)


# In a sandbox: exec bwrap, with the launcher above as the command inside.
_SANDBOXED = sandbox_launcher(_LAUNCHER)


# how kernels start when config says auto: forked from a fork server where fork() is what Linux
# has, else each a new process; the test suite runs the kernel suites under both (conftest)
START_DEFAULT = "fork" if sys.platform == "linux" else "spawn"


def start_mode(start: str | None) -> str:
    """``fork`` or ``spawn`` for a ``kernels.start`` value (None and ``auto``: ``START_DEFAULT``)."""
    mode = START_DEFAULT if start in (None, "auto") else str(start)
    if mode not in ("fork", "spawn"):
        raise ValueError(f"kernels.start must be fork, spawn or auto, not {start!r}")
    return mode


def can_isolate_network() -> bool:
    """Whether this host lets a child process leave the host's network (probed once)."""
    import subprocess

    try:
        done = subprocess.run(
            [sys.executable, "-c", _UNSHARE_NET], env={}, capture_output=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


class ResourceLimits:
    def __init__(self, memory_bytes: int = 0, cpu_seconds: int = 0, open_files: int = 0) -> None:
        self.memory_bytes = memory_bytes
        self.cpu_seconds = cpu_seconds
        self.open_files = open_files


def _deserialize(session: Session, frames: list[bytes]) -> Message:
    """``Session.deserialize`` without ``extract_dates``: the signature checked and a replayed
    one refused alike, but no string of the header or the parent header tried as a date
    (dateutil, for each of them, was a fifth of the proxy's CPU per kernel message); nothing
    here reads a message's dates. Raises ``ValueError`` for a message that is not genuine."""
    _, found = session.feed_identities(frames)
    parts = cast(list[bytes], found)  # received with copy=True: bytes, not Frames
    if len(parts) < 5:
        raise ValueError(f"malformed message: {len(parts)} parts")
    if session.auth is not None:
        signature = parts[0]
        if not signature:
            raise ValueError("unsigned message")
        if signature in session.digest_history:
            raise ValueError(f"duplicate signature {signature!r}")
        session._add_digest(signature)
        if not hmac.compare_digest(signature, session.sign(parts[1:5])):
            raise ValueError(f"invalid signature {signature!r}")
    header = session.unpack(parts[1])
    return {
        "header": header,
        "msg_id": header["msg_id"],
        "msg_type": header["msg_type"],
        "parent_header": session.unpack(parts[2]),
        "metadata": session.unpack(parts[3]),
        "content": session.unpack(parts[4]),
        "buffers": [memoryview(b) for b in parts[5:]],
    }


class _ChannelKernel(KernelConnection):
    """A kernel reached over its IPC sockets through jupyter_client's async client."""

    # how often our sockets retry connecting to a kernel that has not bound its own yet (ZeroMQ's
    # default, 100 ms, would round every kernel's readiness up to the next tenth of a second)
    RECONNECT_IVL_MS = 10
    STDIN_RECONNECT_IVL_MS = 10  # stdin's own (tests make it long, to widen a race)

    def __init__(self, client: Any, kernel_id: str, workdir: Path, rundir: Path | None) -> None:
        super().__init__()
        self.client = client
        self.kernel_id = kernel_id
        self.workdir = workdir
        self.rundir = rundir
        self._pumps: list[asyncio.Task[None]] = []
        self._closed = False

    async def open(self, timeout: float) -> None:
        # no heartbeat channel: liveness is the process's (is_alive), and its thread raced a
        # fast shutdown (a socket created on a context being closed)
        self.client.context.setsockopt(zmq.RECONNECT_IVL, self.RECONNECT_IVL_MS)
        watch = self._watch_stdin()
        try:
            self.client.start_channels(hb=False)
            await self._ready(timeout)
            await self._stdin_connected(watch, timeout)
        finally:
            with contextlib.suppress(zmq.ZMQError):
                self.client.stdin_channel.socket.disable_monitor()
            watch.close(linger=0)
        for channel, socket in (
            ("iopub", self.client.iopub_channel.socket),
            ("shell", self.client.shell_channel.socket),
            ("stdin", self.client.stdin_channel.socket),
            ("control", self.client.control_channel.socket),  # interrupt replies
        ):
            self._pumps.append(asyncio.create_task(self._pump(channel, socket)))

    async def _ready(self, timeout: float) -> None:
        """Until the kernel answers ``kernel_info`` and our IOPub subscription is live (ipykernel
        greets each new subscriber with ``iopub_welcome``, and publishes its status around every
        request): what jupyter_client's ``wait_for_ready`` checks, without its fixed 0.2 s
        polls of IOPub."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self.client.kernel_info()
            try:
                reply = await self.client.get_shell_msg(timeout=1.0)
            except queue.Empty:
                reply = None
            if reply is not None and reply["msg_type"] == "kernel_info_reply":
                try:
                    await self.client.get_iopub_msg(timeout=1.0)
                    return
                except queue.Empty:
                    pass
            if not await self.is_alive():
                raise KernelDied("the kernel died before it answered kernel_info")
            if loop.time() > deadline:
                raise KernelDied(f"the kernel did not answer kernel_info in {timeout:.0f} s")

    def _watch_stdin(self) -> zmq.asyncio.Socket:
        """jupyter_client's stdin socket, made here with a monitor attached before it connects.

        The kernel sends each ``input_request`` (a tool call) from a ROUTER to the identity the
        execute request came from; until our stdin DEALER has finished its handshake the ROUTER
        does not know that identity and drops the request without a word, and the program
        waits in ``input()`` for a reply that never comes. The shell and stdin sockets retry
        their connections independently (every ``RECONNECT_IVL``), so a kernel that answers
        ``kernel_info`` on shell may not have our stdin yet; readiness waits for both."""
        client = self.client
        sock = client.context.socket(zmq.DEALER)
        sock.linger = 1000
        sock.identity = client.session.bsession  # the shell's: stdin requests are routed by it
        sock.setsockopt(zmq.RECONNECT_IVL, self.STDIN_RECONNECT_IVL_MS)
        watch = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        sock.connect(client._make_url("stdin"))
        client._stdin_channel = client.stdin_channel_class(sock, client.session, client.ioloop)
        return watch  # type: ignore[no-any-return]

    async def _stdin_connected(self, watch: zmq.asyncio.Socket, timeout: float) -> None:
        if not await watch.poll(timeout * 1000):
            raise KernelDied(f"the kernel's stdin channel did not connect in {timeout:.0f} s")
        await watch.recv_multipart()

    async def _pump(self, channel: str, socket: zmq.asyncio.Socket) -> None:
        """Every message of one channel into the inbox: read from the socket itself (not through
        the client's ``get_*_msg``, a poll and then a receive per message)."""
        failures = 0
        while True:
            try:
                msg = _deserialize(self.client.session, await socket.recv_multipart())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._closed or isinstance(exc, zmq.ZMQError) or failures >= 100:
                    return  # the channel closed under us: the kernel is going away
                # one message that cannot be read (a bad signature, say) must not leave the
                # channel deaf: its cell would wait for a reply it already missed until its limit
                failures += 1
                log.warning("kernel %s: unreadable message on %s skipped: %r", self.kernel_id, channel, exc)
                continue
            failures = 0
            msg["channel"] = channel
            self.inbox.put_nowait(msg)

    async def _interrupt_by_message(self) -> str:
        """ipykernel signals itself from its control thread, and answers when it has."""
        msg = self.client.session.msg("interrupt_request", {})
        self.client.control_channel.send(msg)
        return str(msg["header"]["msg_id"])

    async def execute(
        self, code: str, *, allow_stdin: bool = True, user_expressions: dict[str, str] | None = None
    ) -> str:
        return str(
            self.client.execute(
                code,
                store_history=False,
                allow_stdin=allow_stdin,
                stop_on_error=True,
                user_expressions=user_expressions or {},
            )
        )

    async def input_reply(self, value: str, parent: Message) -> None:
        # the client's own input() routes the reply to the stdin channel with the right parent
        msg = self.client.session.msg("input_reply", {"value": value}, parent=parent)
        self.client.stdin_channel.send(msg)

    async def _close_channels(self) -> bool:
        """Stop reading; False if it was closed already."""
        if self._closed:
            return False
        self._closed = True
        for task in self._pumps:
            task.cancel()
        for task in self._pumps:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            self.client.stop_channels()
        return True

    def _remove_dirs(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)
        if self.rundir is not None:
            shutil.rmtree(self.rundir, ignore_errors=True)


class LocalKernel(_ChannelKernel):
    """A kernel jupyter_client started as a new process (``kernels.start: spawn``)."""

    def __init__(self, manager: AsyncKernelManager, workdir: Path, rundir: Path | None = None) -> None:
        client = manager.client(context=manager.context)  # the provider's, not one of its own
        super().__init__(client, manager.kernel_id or uuid.uuid4().hex, workdir, rundir)
        self.manager = manager

    async def interrupt(self) -> str | None:
        if self.manager.kernel_spec is not None and self.manager.kernel_spec.interrupt_mode == "message":
            return await self._interrupt_by_message()  # sandboxed: a signal would reach bwrap
        await self.manager.interrupt_kernel()
        return None

    async def is_alive(self) -> bool:
        return bool(await self.manager.is_alive())

    def pid(self) -> int | None:
        provisioner = self.manager.provisioner
        process = getattr(provisioner, "process", None)
        return getattr(process, "pid", None)

    async def shutdown(self) -> None:
        if not await self._close_channels():
            return
        try:
            await self.manager.shutdown_kernel(now=True)
        except Exception:  # already dead or half-started: make sure the process is gone
            log.debug("kernel %s shutdown raised; killing", self.kernel_id, exc_info=True)
            if self.manager.provisioner is not None:
                with contextlib.suppress(Exception):
                    await self.manager.provisioner.kill()
        with contextlib.suppress(Exception):
            await self.manager.cleanup_resources()  # connection file and ipc sockets
        await asyncio.to_thread(self._remove_dirs)  # off the event loop: a tree of many files


class ForkedKernel(_ChannelKernel):
    """A kernel forked by the provider's fork server (``kernels.start: fork``)."""

    def __init__(
        self, client: Any, server: ForkServer, kernel_id: str, pid: int, workdir: Path, rundir: Path
    ) -> None:
        super().__init__(client, kernel_id, workdir, rundir)
        self.server = server
        self._pid = pid

    async def interrupt(self) -> str | None:
        return await self._interrupt_by_message()  # as for a sandboxed spawned kernel

    async def is_alive(self) -> bool:
        return self.server.alive(self.kernel_id)

    def pid(self) -> int | None:
        return self._pid

    async def shutdown(self) -> None:
        if not await self._close_channels():
            return
        await self.server.kill(self.kernel_id)
        await asyncio.to_thread(self._remove_dirs)  # off the event loop: a tree of many files


MEMORY_FS = Path("/dev/shm")


class LocalKernelProvider(KernelProvider):
    """Starts ipykernel processes; ``root`` holds their runtime files and working directories."""

    def __init__(
        self,
        root: Path | None = None,
        limits: ResourceLimits | None = None,
        startup_timeout: float = 60.0,
        extra_env: dict[str, str] | None = None,
        network: bool = True,
        sandbox: Bubblewrap | None = None,
        start: str | None = None,
    ) -> None:
        """``network=False``: kernels get a network namespace of their own (see the module doc).
        ``sandbox``: each kernel runs in a bubblewrap sandbox of its own (``proxy.kernels.sandbox``).
        ``start``: ``fork`` (from a fork server, ``proxy.kernels.forking``) or ``spawn`` (a new
        process each); None or ``auto``: ``START_DEFAULT``."""
        self._own_root = root is None
        # our own directories go when we do, or with the next provider if we are killed
        # (``proxy.kernels.leftovers``)
        self.root = Path(root) if root is not None else leftovers.make("cablectl-kernels-")
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        # each kernel's runtime files (connection file, sandbox /etc files, sockets) are made and
        # removed with it: in memory where there is a memory filesystem and the root is our own
        # (on a disk filesystem every kernel costs journal and discard work); the working
        # directories stay on the root's filesystem (a program's files are not memory)
        self.runtime = self.root / "run"
        self._own_runtime = False
        if self._own_root and MEMORY_FS.is_dir() and os.access(MEMORY_FS, os.W_OK | os.X_OK):
            with contextlib.suppress(OSError):
                self.runtime = leftovers.make("cablectl-run-", MEMORY_FS)
                self._own_runtime = True
        self.runtime.mkdir(exist_ok=True, mode=0o700)
        self.limits = limits or ResourceLimits()
        self.startup_timeout = startup_timeout
        self.extra_env = dict(extra_env or {})
        self._specs = self.root / "kernelspecs"
        spec_dir = self._specs / SPEC_NAME
        spec_dir.mkdir(parents=True, exist_ok=True)
        self.sandbox = sandbox
        argv = [
            sys.executable,
            "-c",
            _LAUNCHER if sandbox is None else _SANDBOXED,
            str(self.limits.memory_bytes),
            str(self.limits.cpu_seconds),
            str(self.limits.open_files),
            "1" if not network and sandbox is None else "0",  # a sandbox has no network already
            "--HistoryManager.enabled=False",  # executes are never stored: no sqlite file, no thread
            "-f",
            "{connection_file}",
        ]
        (spec_dir / "kernel.json").write_text(
            json.dumps(
                {
                    "argv": argv,
                    "display_name": "cablectl Python",
                    "language": "python",
                    # a signal would reach bwrap, not the kernel inside: ask the kernel itself
                    "interrupt_mode": "signal" if sandbox is None else "message",
                }
            )
        )
        self._spec_manager = KernelSpecManager(kernel_dirs=[str(self._specs)])
        self.started_pids: list[int] = []  # every kernel process this provider launched
        self.network = network
        self._work = self.root / "work"
        self._work.mkdir(exist_ok=True)
        os.chmod(self._work, 0o300)  # write + search, no listing
        self._hide_proxy_process()
        self.start = start_mode(start)
        self._forks: ForkServer | None = None
        # one ZeroMQ context (one I/O thread) for every kernel's sockets: a context of their own
        # each, as jupyter_client makes by default, cost a thread start and a term per kernel
        self._context = zmq.asyncio.Context()
        if self.start == "fork":
            keep = ("PATH", "LANG", "PYDEVD_DISABLE_FILE_VALIDATION")
            server_env = {k: v for k, v in self.kernel_env(self.root).items() if k in keep}
            self._forks = ForkServer(self.root, server_env, startup_timeout)

    @staticmethod
    def _hide_proxy_process() -> None:
        """PR_SET_DUMPABLE 0: same-user processes (our kernels) cannot read /proc/<proxy>/environ."""
        if sys.platform != "linux":
            return
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE
            log.warning("could not mark the proxy non-dumpable (errno %d)", ctypes.get_errno())

    def kernel_env(self, workdir: Path) -> dict[str, str]:
        """The whole environment of a kernel: built from nothing, never copied from the proxy."""
        path = os.pathsep.join(
            dict.fromkeys([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"])
        )
        env = {
            "PATH": path,
            "HOME": str(workdir),
            "TMPDIR": str(workdir),
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "MPLBACKEND": "Agg",
            # debugpy (imported by ipykernel) warns about frozen modules on stderr, which the
            # first program's output would carry
            "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        }
        env.update(self.extra_env)
        return env

    async def start_kernel(self) -> LocalKernel | ForkedKernel:
        kernel_id = uuid.uuid4().hex
        workdir = self._work / kernel_id
        workdir.mkdir(mode=0o700)
        rundir = self.runtime / kernel_id  # its connection file and sockets, and nothing else's
        rundir.mkdir(mode=0o700)
        inside = None  # sandboxed: where its sockets appear (the proxy connects through links)
        if self.sandbox is not None:
            inside = self.sandbox.prepare(
                workdir,
                rundir,
                network=self.network,
                tmpfs_bytes=self.limits.memory_bytes,
                launcher=self._forks is None,
            )
        if self._forks is not None:
            return await self._fork(self._forks, kernel_id, workdir, rundir, inside)
        manager = AsyncKernelManager(
            context=self._context,
            kernel_name=SPEC_NAME,
            kernel_spec_manager=self._spec_manager,
            transport="ipc",
            ip=str(rundir / "ipc"),
            connection_file=str(rundir / "kernel.json"),
        )
        kernel: LocalKernel | None = None
        try:
            await manager.start_kernel(env=self.kernel_env(workdir), cwd=str(workdir), kernel_id=kernel_id)
            kernel = LocalKernel(manager, workdir, rundir)
            pid = kernel.pid()
            if pid is not None:
                self.started_pids.append(pid)
            if inside is not None:
                ports = (manager.shell_port, manager.iopub_port, manager.stdin_port, manager.control_port)
                names = [f"ipc-{port}" for port in ports]
                await link_sockets(inside, rundir, names, kernel.is_alive, self.startup_timeout)
            await kernel.open(self.startup_timeout)
        except BaseException:
            if kernel is not None:
                await asyncio.shield(kernel.shutdown())
            else:
                with contextlib.suppress(Exception):
                    await asyncio.shield(manager.shutdown_kernel(now=True))
                shutil.rmtree(workdir, ignore_errors=True)
                shutil.rmtree(rundir, ignore_errors=True)
            raise
        return kernel

    async def _fork(
        self, server: ForkServer, kernel_id: str, workdir: Path, rundir: Path, inside: Path | None
    ) -> ForkedKernel:
        """A kernel from the fork server, with what a spawned one has (see ``proxy.kernels.forking``)."""
        connection = rundir / "kernel.json"
        kernel: ForkedKernel | None = None
        try:
            _, info = write_connection_file(
                str(connection),
                transport="ipc",
                ip=str(rundir / "ipc"),
                key=secrets.token_hex(32).encode(),
                kernel_name=SPEC_NAME,
            )
            env = self.kernel_env(workdir)
            bwrap = None
            if inside is not None and self.sandbox is not None:
                # what the kernel sees at rundir is inside/: its own copy of the connection file
                fd = os.open(inside / connection.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.write(fd, connection.read_bytes())
                os.close(fd)
                argv = self.sandbox.argv(
                    str(workdir), str(rundir), network=self.network, tmpfs_bytes=self.limits.memory_bytes
                )
                bwrap = argv[: argv.index("--")]
            # no parent to poll: it dies with the fork server (a death signal) instead
            env["JPY_PARENT_PID"] = "1"
            request = {
                "id": kernel_id,
                "conn": str(connection),
                "cwd": str(workdir),
                "env": env,
                "limits": [self.limits.memory_bytes, self.limits.cpu_seconds, self.limits.open_files],
                "unshare_net": not self.network and bwrap is None,
                "bwrap": bwrap,
            }
            pid = await server.start(request)
            self.started_pids.append(pid)
            client = AsyncKernelClient(context=self._context)
            client.load_connection_info(info)
            kernel = ForkedKernel(client, server, kernel_id, pid, workdir, rundir)
            names = [
                f"ipc-{info[port]}" for port in ("shell_port", "iopub_port", "stdin_port", "control_port")
            ]
            if inside is not None:
                await link_sockets(inside, rundir, names, kernel.is_alive, self.startup_timeout)
            else:  # connect once they exist, not after ZeroMQ's first failed try
                await link_sockets(rundir, rundir, names, kernel.is_alive, self.startup_timeout, link=False)
            await kernel.open(self.startup_timeout)
        except BaseException:
            if kernel is not None:
                await asyncio.shield(kernel.shutdown())
            else:
                await asyncio.shield(server.kill(kernel_id))
                shutil.rmtree(workdir, ignore_errors=True)
                shutil.rmtree(rundir, ignore_errors=True)
            raise
        return kernel

    async def aclose(self) -> None:
        if self._forks is not None:
            await self._forks.aclose()
        self._context.destroy(linger=0)  # kernels' sockets are closed by then; any left, now
        if self._own_root:
            with contextlib.suppress(OSError):
                os.chmod(self._work, 0o700)  # listable again, so it can be removed
            shutil.rmtree(self.root, ignore_errors=True)
        if self._own_runtime:
            shutil.rmtree(self.runtime, ignore_errors=True)

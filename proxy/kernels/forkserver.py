"""The fork server: a process that has imported ipykernel once, and forks one kernel per request.

Run as a program (``python -I forkserver.py <proxy pid>``) by ``proxy.kernels.forking``, with the
kernels' scrubbed environment, and imports nothing of cablectl: what a kernel inherits from it is
the Python runtime, ipykernel and what ipykernel imports, and nothing else. It is single-threaded,
holds no ZeroMQ context and runs no event loop, so a forked child starts clean: the child makes its
own context, sockets, threads and event loop when ipykernel initializes. Its modules are imported
before ``gc.freeze()``, so the collector does not touch (and copy) the inherited objects.

It also builds, once, the one part of a kernel that depends on nothing of any kernel: ipykernel's
shell (``ZMQInteractiveShell``: namespaces, magics, completer, formatters, traceback handlers;
history off), with no directory made, no ZeroMQ and no thread (``_build_shell``). Every kernel
forked afterwards starts from that same pristine object, which ipykernel's own
``ZMQInteractiveShell.instance()`` hands to the kernel it builds; the child then gives it what a
spawned kernel's shell takes from its own process (``_adopt_shell``: the kernel, its profile and
IPython directories, home, working directory, environment). Where the kernel's configuration is
not the one the shell was built with, the child drops it and ipykernel builds a shell of its own.

Protocol: one JSON object per line. On stdin, requests: ``{"op": "start", "id", "conn", "cwd",
"env", "limits": [memory bytes, cpu seconds, open files], "unshare_net", "bwrap": argv or null}``
and ``{"op": "kill", "id"}``. On stdout: ``{"ready": true}`` once, then ``{"id", "pid"}`` (or
``{"id", "error"}``) for each start, and ``{"exited": id, "status"}`` when a kernel's process has
been reaped. Only this process reaps its children, so a kill never reaches a reused PID.

A kernel in a sandbox (``bwrap`` given): the forked child (the *keeper*) starts bubblewrap with the
sandbox's arguments and a placeholder as the sandbox's PID 1, joins the placeholder's namespaces
(user, mount, PID, network, IPC, UTS, cgroup: the same sandbox ``bwrap`` makes for a spawned
kernel, with the same files, limits and no network), and forks the kernel inside; the kernel drops
every capability, sets no-new-privileges and becomes ipykernel. The keeper only waits: when the
kernel ends it kills the sandbox, and killing the keeper ends both (death signals, and bwrap's
``--die-with-parent``). Without a sandbox, the child itself is the kernel (in a network namespace
of its own if asked). Every process here dies with its parent: the server with the proxy, the
children with the server. Each child leads a process group, and the server kills the whole group
(kill, shutdown, or the child's own end) before it reaps the child: bwrap arms its death signal
only once the sandbox is made, so a keeper killed while bwrap was still making it would leave
bwrap's sandbox side waiting forever for its other half.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import gc
import json
import os
import random
import resource
import selectors
import signal
import subprocess
import sys
from typing import Any

__all__ = ["main"]

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
NS_GET_PARENT = 0xB702  # ioctl: the user namespace that owns (is parent of) this one
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
JOINED = ("mnt", "pid", "net", "ipc", "uts", "cgroup")  # then the sandbox's own user namespace
# the sandbox's PID 1 until the kernel joins it: blocks reading a pipe only the keeper holds, so
# it also ends when the keeper does; its arguments name the kernel (for ps, as a spawned kernel's do)
PLACEHOLDER = ["/bin/sh", "-c", "echo ready; read x", "cablectl-kernel-sandbox"]
PRELOAD = (
    "ipykernel.kernelapp",
    "ipykernel.ipkernel",
    "ipykernel.zmqshell",
    "ipykernel.comm",
    "ipykernel.debugger",
    "ipykernel.inprocess.ipkernel",
    "IPython.core.interactiveshell",
    "IPython.core.completer",
    "IPython.core.formatters",
    "IPython.core.completerlib",
    "IPython.core.debugger",
    "IPython.core.oinspect",
    "IPython.extensions.storemagic",
    "sqlite3",
    "pdb",
    "faulthandler",
    "tornado.platform.asyncio",
    "jupyter_client.session",
    "zmq.eventloop.zmqstream",
    "tornado.ioloop",
    "tornado.queues",
    "asyncio",
    "json",
    "comm",
)

libc = ctypes.CDLL(None, use_errno=True)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _check(result: int, what: str) -> None:
    if result != 0:
        raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")


def _die_with_parent(parent: int) -> None:
    """SIGKILL when the parent (seen as PID ``parent`` from here) goes."""
    _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:  # it went before the death signal was armed
        os._exit(1)


def _kill_group(pid: int) -> None:
    """SIGKILL a child of the server and its process group: a keeper, its bwrap (both of bwrap's
    processes, until the sandbox's own calls setsid) and a kernel not yet in a session of its
    own. ``pid`` must not be reaped yet, so that neither the PID nor the group is anyone else's."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:  # not a group leader yet (it has not run setpgid and neither have we)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _set_title(args: list[str]) -> None:
    """This process's command line as ``ps`` and ``/proc/<pid>/cmdline`` show it: written over
    the arguments area the server was started with (padded for this), as setproctitle does. A
    forked kernel shows ``python -m ipykernel_launcher -f <connection file>``, as a spawned one."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end (fields 48 and 49)
    except (OSError, IndexError, ValueError):
        return
    size = end - start
    data = b"\0".join(a.encode() for a in args)[: size - 1]
    ctypes.memmove(start, data.ljust(size, b"\0"), size)


def _kernel_config() -> Any:
    """The configuration every kernel is given (``_become_kernel``), and the shell built with."""
    from traitlets.config import Config

    config = Config()
    config.HistoryManager.enabled = False  # executes are never stored: no sqlite, no thread
    return config


def _send(message: dict[str, Any]) -> None:
    data = json.dumps(message).encode() + b"\n"
    while data:
        data = data[os.write(1, data) :]


def _preload() -> tuple[Any, _ModuleFiles]:
    """Import, warm, build the shell (None if it could not be built) and the module files list;
    then freeze the heap."""
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception as exc:  # an optional module: the kernel imports it later if at all
            print(f"cablectl fork server: could not preload {name}: {exc}", file=sys.stderr)
    _warm()
    shell = _build_shell()
    modules = _ModuleFiles.snapshot()
    gc.collect()
    gc.freeze()
    return shell, modules


class _ModuleFile:
    __slots__ = ("__file__",)

    def __init__(self, path: str) -> None:
        self.__file__ = path


class _ModuleFiles:
    """The file of every module this process has loaded, as ipykernel's kernel lists them when
    it is built (``IPythonKernel.__init__``: for its debugger, which leaves them out of
    "just my code"), listed once here rather than in each kernel.

    A kernel that lists them itself touches every module object and every path string it
    inherited (a reference count each: ~420 copy-on-write page faults, 2-3 ms of CPU a kernel here). These
    are copies made together, on a few pages of their own, and the kernel's code sees them as
    ``sys.modules`` while its kernel is built (``during_kernel_build``); everywhere else, and
    for all other attributes of ``sys`` even there, it is the real ``sys``. A module a kernel
    imports between the fork and that point is not in the list (the debugger would step into
    it), which no cablectl client notices: the proxy never sends a debug request."""

    def __init__(self, modules: dict[str, _ModuleFile]) -> None:
        self.modules = modules

    @classmethod
    def snapshot(cls) -> _ModuleFiles:
        files = [str(m.__file__) for m in sys.modules.copy().values() if getattr(m, "__file__", None)]
        # one new string, split: fresh copies, laid out one after another
        copies = "\0".join(files).split("\0")
        return cls({str(i): _ModuleFile(path) for i, path in enumerate(copies)})

    def __getattr__(self, name: str) -> Any:
        return getattr(sys, name)

    @contextlib.contextmanager
    def during_kernel_build(self) -> Any:
        """ipykernel's kernel module sees this as ``sys`` (only while the kernel is built)."""
        try:
            from ipykernel import ipkernel
        except ImportError:
            yield
            return
        if getattr(ipkernel, "sys", None) is not sys:
            yield  # not the module we know: it lists them itself
            return
        ipkernel.sys = self  # type: ignore[attr-defined,assignment]
        try:
            yield
        finally:
            ipkernel.sys = sys  # type: ignore[attr-defined]


def _build_shell() -> Any:
    """ipykernel's shell, as its kernel would build it, from nothing of any kernel; registered as
    the shell singleton, which ipykernel's kernel takes (``ZMQInteractiveShell.instance()``).

    Built with what is the same in every kernel: the kernels' configuration, the kernel's
    compiler, a namespace of its own (the kernel gives it none); and with nothing that differs:
    no IPython directory (an empty one is the default, so none is made), a profile directory
    with no location (nothing made), no kernel. What it reads from this process (working
    directory, home, environment) each child sets again for itself (``_adopt_shell``); the
    variables it sets in the environment are undone here. It makes no ZeroMQ context, socket or
    thread (history is off: no saving thread), and runs no code."""
    saved = dict(os.environ)
    try:
        from ipykernel.ipkernel import IPythonKernel
        from ipykernel.zmqshell import ZMQInteractiveShell
        from IPython.core.profiledir import ProfileDir

        shell: Any = ZMQInteractiveShell.instance(
            config=_kernel_config(),
            ipython_dir="",
            profile_dir=ProfileDir(),
            compiler_class=IPythonKernel.compiler_class.default_value,
        )
        shell.display_formatter.formatters  # noqa: B018  (built on the first display otherwise)
    except Exception as exc:  # each kernel builds its own instead
        print(f"cablectl fork server: could not build the kernel shell: {exc}", file=sys.stderr)
        with contextlib.suppress(Exception):
            from ipykernel.zmqshell import ZMQInteractiveShell

            ZMQInteractiveShell.clear_instance()
        return None
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return shell


def _adopt_shell(app: Any, shell: Any) -> None:
    """Make the pre-built shell this kernel's: what ``IPythonKernel`` passes a shell it builds,
    and what a shell reads from its process at construction, read again here."""
    from pathlib import Path

    from IPython.paths import get_ipython_dir
    from IPython.utils.path import get_home_dir

    kernel = app.kernel
    if kernel is None or kernel.shell is not shell:
        return
    shell.parent = kernel
    # the kernel's is the one it was built with (checked before the kernel was built), plus what
    # the shell added to its own (ipykernel's marker for tqdm); then both are one object again
    kernel.config.merge(shell.config)
    shell.config = kernel.config
    shell.kernel = kernel
    shell.ipython_dir = get_ipython_dir()
    shell.profile_dir = kernel.profile_dir
    shell.starting_dir = os.getcwd()
    shell.home_dir = get_home_dir()
    history = shell.history_manager
    history.hist_file = history._get_hist_file_name()
    history.dir_hist[:] = [Path.cwd()]  # the list the namespace's _dh is
    shell.init_environment()  # TERM, PAGER, ...: set in this kernel's environment
    shell.init_virtualenv()


def _warm() -> None:
    """Fill caches every kernel would otherwise fill again in its first cell: run pure code
    paths once here, with a sample that is nobody's (no session exists in this process)."""
    import io
    import tokenize

    sample = 'x = 1\ns = """a"""\nt = \'\'\'b\'\'\'\nf"{x}" + rb"c"\nprint(x)\n'
    # tokenize compiles its big token regular expressions on first use (lru_cache)
    list(tokenize.generate_tokens(io.StringIO(sample).readline))
    try:
        from IPython.core.inputtransformer2 import TransformerManager
    except ImportError:
        return
    TransformerManager().transform_cell(sample)  # type: ignore[no-untyped-call]


def _quiet_fds() -> None:
    """stdin from /dev/null, stdout to stderr (never the protocol pipe), nothing else open."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(2, 1)
    os.closerange(3, 65536)


def _drop_privileges() -> None:
    """No capability in any set, none to regain: what bwrap's --cap-drop ALL leaves a command."""
    for cap in range(64):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            break  # past the last capability this kernel knows
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    _check(libc.capset(ctypes.byref(header), data), "capset")
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def _unshare_network() -> None:
    """A network namespace of its own (as root), else a user namespace mapping this uid to
    itself plus a network namespace."""
    if libc.unshare(CLONE_NEWNET) == 0:
        return
    uid, gid = os.getuid(), os.getgid()
    _check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNET), "unshare(network)")
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{gid} {gid} 1")


def _become_kernel(req: dict[str, Any], shell: Any, modules: _ModuleFiles) -> None:
    """Limits, environment, working directory, fresh random state; then ipykernel, with the
    pre-built ``shell`` if there is one, and the ``modules`` listed (never returns)."""
    with contextlib.suppress(PermissionError):  # a group leader already (unsandboxed: it is
        os.setsid()  # the server's child, in a group of its own), and that is what it needs
    memory, cpu, files = (int(x) for x in req["limits"])
    if memory:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    if cpu:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    if files:
        resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    _set_title([sys.executable, "-m", "ipykernel_launcher", "-f", req["conn"]])
    random.seed()  # every child would draw the server's sequence otherwise
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()
    sys.argv = ["ipykernel_launcher", "--HistoryManager.enabled=False", "-f", req["conn"]]
    from ipykernel.kernelapp import IPKernelApp

    code = 0
    try:
        app = IPKernelApp.instance()
        # its default was read from the server's environment at import: no parent to poll (it
        # dies with the server by a death signal), and no banner for a terminal
        app.parent_handle = 1
        # what the spawned kernel's command line says (sys.argv above, for anyone who looks),
        # set directly: building traitlets' argument parser for two options costs ~5 ms a kernel
        app.update_config(_kernel_config())
        app.connection_file = req["conn"]
        app.parse_command_line = lambda argv=None: None  # type: ignore[method-assign]
        _with_shell(app, shell, modules)
        app.initialize([])  # type: ignore[no-untyped-call]
        app.start()  # type: ignore[no-untyped-call]
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _sections(config: Any) -> dict[str, Any]:
    """A configuration's sections but empty ones (a lookup makes them)."""
    return {name: section for name, section in config.items() if section}


def _with_shell(app: Any, shell: Any, modules: _ModuleFiles) -> None:
    """The kernel ``app`` builds takes ``shell`` (ipykernel's ``instance()`` returns it), and
    adopts it before anything else uses it (extensions, startup files); unless there is none,
    or the configuration read since (config files) is not the one it was built with: then
    ipykernel builds its own. Either way it finds the ``modules`` listed already."""
    from ipykernel.kernelapp import IPKernelApp

    def init_kernel() -> None:
        if shell is not None and _sections(app.config) != _sections(_kernel_config()):
            type(shell).clear_instance()
        with modules.during_kernel_build():
            IPKernelApp.init_kernel(app)  # type: ignore[no-untyped-call]
        if shell is not None:
            _adopt_shell(app, shell)

    app.init_kernel = init_kernel  # type: ignore[method-assign]


def _join_sandbox(sandbox: subprocess.Popen[bytes], info_fd: int) -> None:
    """Join the namespaces of the sandbox's PID 1 (the placeholder)."""
    assert sandbox.stdout is not None
    if not sandbox.stdout.readline():
        raise OSError("bubblewrap did not make the sandbox")
    raw = b""
    while True:
        raw += os.read(info_fd, 65536)
        try:
            pid = int(json.loads(raw)["child-pid"])
            break
        except ValueError:
            continue
    # a namespace the sandbox shares with us (the host's network, with kernels.network: host)
    # is not joined: it is ours already, and the sandbox's user namespace does not own it
    theirs = [
        ns
        for ns in (*JOINED, "user")
        if os.stat(f"/proc/{pid}/ns/{ns}").st_ino != os.stat(f"/proc/self/ns/{ns}").st_ino
    ]
    fds = {ns: os.open(f"/proc/{pid}/ns/{ns}", os.O_RDONLY) for ns in theirs}
    # the sandbox's namespaces belong to bwrap's first user namespace; with --disable-userns the
    # command runs in one nested below it: join the owner first, then them, then the nested one
    owner = fcntl.ioctl(fds["user"], NS_GET_PARENT)
    steps = ((owner, "user (owner)"), *((fds[ns], ns) for ns in JOINED if ns in fds), (fds["user"], "user"))
    for fd, what in steps:
        if libc.setns(fd, 0) != 0:
            errno = ctypes.get_errno()
            if what == "user (owner)" and errno == 22:  # EINVAL: it is ours already (no nesting)
                continue
            raise OSError(errno, f"setns({what}): {os.strerror(errno)}")
    for fd in (owner, *fds.values()):
        os.close(fd)


def _child(req: dict[str, Any], server: int, shell: Any, modules: _ModuleFiles) -> None:
    """In the forked child (never returns)."""
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    os.setpgid(0, 0)  # a group of its own (the server sets it too): bwrap's processes join it
    _die_with_parent(server)
    _quiet_fds()
    try:
        if req.get("bwrap") is None:
            if req.get("unshare_net"):
                _unshare_network()
            _become_kernel(req, shell, modules)
        read, write = os.pipe()
        argv = [*req["bwrap"], "--as-pid-1", "--info-fd", str(write), "--", *PLACEHOLDER, req["conn"]]
        sandbox = subprocess.Popen(
            argv, pass_fds=[write], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={}
        )
        os.close(write)
        _set_title(["cablectl-kernel-keeper", req["conn"]])
        _join_sandbox(sandbox, read)
        kernel = os.fork()
        if kernel == 0:
            _die_with_parent(0)  # its parent, the keeper, is outside its PID namespace: PID 0 here
            os.closerange(3, 65536)  # the keeper's pipes to the sandbox stay the keeper's
            _drop_privileges()
            _become_kernel(req, shell, modules)
        _, status = os.waitpid(kernel, 0)
        sandbox.kill()
        sandbox.wait()
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
    except BaseException as exc:  # nothing of a failed start may go on running
        print(f"cablectl fork server: kernel {req.get('id')} failed to start: {exc}", file=sys.stderr)
        os._exit(70)


def main() -> None:
    server = os.getpid()
    _die_with_parent(int(sys.argv[1]))
    shell, modules = _preload()
    children: dict[int, str] = {}  # pid -> kernel id, until reaped
    by_id: dict[str, int] = {}
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(0, selectors.EVENT_READ, "requests")
    selector.register(wake_r, selectors.EVENT_READ, "children")
    _send({"ready": True})
    pending = b""
    while True:
        for key, _ in selector.select():
            if key.data == "children":
                os.read(wake_r, 4096)
                while children:
                    try:  # see which child ended, without reaping it yet
                        ended = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                    except ChildProcessError:
                        break
                    if ended is None:
                        break
                    # its group goes with it while the PID is still ours (not reaped): a
                    # keeper's bwrap, stuck before the sandbox is made, would wait forever
                    _kill_group(ended.si_pid)
                    pid, status = os.waitpid(ended.si_pid, 0)
                    kernel_id = children.pop(pid, None)
                    if kernel_id is not None:
                        by_id.pop(kernel_id, None)
                        _send({"exited": kernel_id, "status": os.waitstatus_to_exitcode(status)})
                continue
            chunk = os.read(0, 65536)
            if not chunk:  # the proxy closed the pipe: it is going away, and so are its kernels
                for pid in children:
                    _kill_group(pid)
                os._exit(0)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                req = json.loads(line)
                if req["op"] == "kill":
                    victim = by_id.get(str(req["id"]))
                    if victim is not None:  # not reaped yet, so the PID is still ours
                        _kill_group(victim)
                    continue
                try:
                    pid = os.fork()
                except OSError as exc:
                    _send({"id": req["id"], "error": str(exc)})
                    continue
                if pid == 0:
                    _child(req, server, shell, modules)
                with contextlib.suppress(OSError):  # as the child does: whichever runs first
                    os.setpgid(pid, pid)
                children[pid] = str(req["id"])
                by_id[str(req["id"])] = pid
                _send({"id": req["id"], "pid": pid})


if __name__ == "__main__":
    main()

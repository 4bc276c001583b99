"""The fork server's pre-built shell (``proxy.kernels.forkserver._build_shell``): every forked
kernel starts from the same pristine shell, made its own (working directory, home, profile,
environment, kernel), and a kernel whose configuration differs builds its own instead."""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from proxy.kernels import Finished
from proxy.kernels.base import KernelConnection
from proxy.kernels.execution import CellRun
from proxy.kernels.local import LocalKernelProvider
from proxy.kernels.sandbox import Bubblewrap

pytestmark = pytest.mark.anyio

# what a shell looks like from inside its kernel, with paths told relative to the kernel's home
PROBE = r"""
_user = sorted(k for k in get_ipython().user_ns if k not in get_ipython().user_ns_hidden and k[0] != "_")
import gc, json, os, sys
from pathlib import Path
ip = get_ipython()
home = os.environ["HOME"]
def rel(path):
    return os.path.relpath(str(path), home)
print(json.dumps({
    # a frozen object (built before the fork server's gc.freeze) is in no generation of the collector
    "prebuilt": all(o is not ip for o in gc.get_objects()),
    "cwd_is_home": os.getcwd() == home,
    "starting_dir": rel(ip.starting_dir),
    "home_dir": rel(ip.home_dir),
    "dh": [rel(d) for d in _dh],
    "ipython_dir": rel(ip.ipython_dir),
    "profile_dir": rel(ip.profile_dir.location),
    "hist_file": rel(ip.history_manager.hist_file),
    "history": [type(ip.history_manager.db).__name__, ip.history_manager.enabled],
    "execution_count": ip.execution_count,
    "inputs": len(In),
    "outputs": len(Out),
    "user": _user,
    "kernel": [ip.kernel is ip.parent, ip.kernel.shell is ip],
    "config": [ip.config is ip.kernel.config, sorted(k for k, v in ip.config.items() if v)],
    "main": sys.modules["__main__"] is ip.user_module,
    "env": {k: os.environ.get(k) for k in ("TERM", "PAGER", "GIT_PAGER", "CLICOLOR", "FORCE_COLOR")},
    "log": ip.log.name,
    "separate_in": ip.separate_in,
}))
"""


def sandboxes() -> list[Any]:
    bwrap = Bubblewrap.find()
    usable = bwrap is not None and bwrap.problem() is None
    return [
        pytest.param(None, id="none"),
        pytest.param(
            bwrap,
            id="bwrap",
            marks=pytest.mark.skipif(not usable, reason="bubblewrap cannot make a sandbox here"),
        ),
    ]


async def run(kernel: KernelConnection, code: str) -> Finished:
    result = await CellRun(kernel).start(code)
    assert isinstance(result, Finished) and result.output.error is None, result
    return result


async def probe(kernel: KernelConnection) -> dict[str, Any]:
    return json.loads((await run(kernel, PROBE)).output.stdout)  # type: ignore[no-any-return]


def expected(prebuilt: bool) -> dict[str, Any]:
    """A kernel's shell just after start: clean, and everything in it the kernel's own."""
    return {
        "prebuilt": prebuilt,
        "cwd_is_home": True,
        "starting_dir": ".",
        "home_dir": ".",
        "dh": ["."],
        "ipython_dir": ".ipython",
        "profile_dir": ".ipython/profile_default",
        "hist_file": ".ipython/profile_default/history.sqlite",
        "history": ["DummyDB", False],  # never stored
        "execution_count": 1,  # store_history=False: the count does not move
        "inputs": 1,
        "outputs": 0,
        "user": [],
        "kernel": [True, True],
        "main": True,
        "env": {
            "TERM": "xterm-color",
            "PAGER": "cat",
            "GIT_PAGER": "cat",
            "CLICOLOR": "1",
            "FORCE_COLOR": "1",
        },
        "log": "IPKernelApp",
    }


@pytest.mark.parametrize("sandbox", sandboxes())
async def test_forked_kernels_start_from_the_prebuilt_shell_and_share_nothing(
    sandbox: Bubblewrap | None,
) -> None:
    provider = LocalKernelProvider(network=False, sandbox=sandbox, start="fork")
    try:
        first = await provider.start_kernel()
        second = await provider.start_kernel()
        try:
            # the first session leaves what it can in its shell and process ...
            await run(
                first,
                "secret = 42\nget_ipython().user_ns['planted'] = 1\n%cd /\n"
                "import os\nos.environ['LEAK'] = 'x'\nget_ipython().separate_in = 'first'",
            )
            # ... the second (forked before and after it ran) sees none of it
            third = await provider.start_kernel()
            try:
                for kernel in (second, third):
                    assert (await run(kernel, "%who")).output.stdout == "Interactive namespace is empty.\n"
                    seen = await probe(kernel)
                    assert {k: seen[k] for k in expected(True)} == expected(True)
                    assert seen["separate_in"] == "\n"
                    env = (await run(kernel, "import os\nprint('LEAK' in os.environ)")).output.stdout
                    assert env == "False\n"
                homes = {
                    (await run(k, "import os\nprint(os.environ['HOME'])")).output.stdout
                    for k in (first, second, third)
                }
                assert len(homes) == 3  # each its own
            finally:
                await third.shutdown()
        finally:
            await first.shutdown()
            await second.shutdown()
    finally:
        await provider.aclose()


async def in_a_kernel(start: str, look: Callable[[KernelConnection], Awaitable[Any]], **kwargs: Any) -> Any:
    """What ``look`` sees in a new kernel (started with ``start``), the kernel then shut down."""
    provider = LocalKernelProvider(network=False, start=start, **kwargs)
    try:
        kernel = await provider.start_kernel()
        try:
            return await look(kernel)
        finally:
            await kernel.shutdown()
    finally:
        await provider.aclose()


async def test_a_forked_kernels_shell_is_a_spawned_kernels() -> None:
    """What the probe sees is the same in a forked kernel (pre-built shell) and a spawned one."""
    seen = {start: await in_a_kernel(start, probe) for start in ("fork", "spawn")}
    assert seen["fork"].pop("prebuilt") is True
    assert seen["spawn"].pop("prebuilt") is False
    # the connection file is in a spawned kernel's configuration (its command line), and ipykernel
    # marks a configuration without IPKernelApp for tqdm: that section is there either way
    assert seen["fork"] == seen["spawn"]


async def test_a_kernel_configured_otherwise_builds_its_own_shell(tmp_path: Path) -> None:
    """Configuration the pre-built shell was not built with (here an IPython directory with a
    kernel config file) is not lost: that kernel builds its shell itself, and it applies."""
    profile = tmp_path / "ipython" / "profile_default"
    profile.mkdir(parents=True)
    (profile / "ipython_kernel_config.py").write_text("c.InteractiveShell.separate_in = 'configured'\n")
    os.chmod(tmp_path, 0o755)
    seen = await in_a_kernel("fork", probe, extra_env={"IPYTHONDIR": str(tmp_path / "ipython")})
    assert seen["prebuilt"] is False
    assert seen["separate_in"] == "configured"
    assert seen["user"] == [] and seen["history"] == ["DummyDB", False]


MODULES = r"""
import json, sys
import ipykernel.ipkernel as ipkernel
files = get_ipython().kernel._kernel_modules
print(json.dumps({
    "sys": ipkernel.sys is sys,
    "listed": [name in files for name in (ipkernel.__file__, json.__file__)],
    "many": len(files) > 100,
    "paths": all(isinstance(f, str) and f.startswith("/") for f in files),
}))
"""


async def test_a_forked_kernel_lists_the_modules_a_spawned_one_does() -> None:
    """ipykernel's list of its modules' files (for its debugger), which the fork server makes
    once: a forked kernel has one as a spawned kernel does, and its ``sys`` is the real one."""

    async def modules(kernel: KernelConnection) -> Any:
        return json.loads((await run(kernel, MODULES)).output.stdout)

    seen = {start: await in_a_kernel(start, modules) for start in ("fork", "spawn")}
    assert seen["fork"] == seen["spawn"] == {"sys": True, "listed": [True, True], "many": True, "paths": True}

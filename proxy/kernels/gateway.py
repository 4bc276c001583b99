"""Remote kernels from Jupyter Enterprise Gateway or Kernel Gateway (REST + websocket).

``POST /api/kernels`` starts a kernel, ``/api/kernels/{id}/channels`` is a websocket
carrying every channel's messages as JSON (``{"channel": "shell"|"iopub"|"stdin", ...}``),
an ``interrupt_request`` on its control channel interrupts and ``DELETE`` stops it. The
stdin channel travels the same websocket, so the back-channel for tool calls works unchanged.

Where kernels run (Kubernetes pods, YARN, Docker Swarm) and what environment they get is
the gateway's configuration: the proxy sends only ``KERNEL_*`` variables it is told to,
never its own environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import uuid
from typing import Any

import aiohttp

from proxy.kernels.base import KernelConnection, KernelProvider, Message

__all__ = ["GatewayKernel", "GatewayKernelProvider"]

log = logging.getLogger("cablectl.kernels")
PROTOCOL_VERSION = "5.3"


class GatewayKernel(KernelConnection):
    def __init__(
        self, provider: GatewayKernelProvider, kernel_id: str, ws: aiohttp.ClientWebSocketResponse
    ) -> None:
        super().__init__()
        self.provider = provider
        self.kernel_id = kernel_id
        self._ws = ws
        self._session_id = uuid.uuid4().hex
        self._reader = asyncio.create_task(self._read())
        self._closed = False

    async def _read(self) -> None:
        async for frame in self._ws:
            if frame.type == aiohttp.WSMsgType.TEXT:
                msg = frame.json()
                if isinstance(msg, dict) and "channel" in msg:
                    self.inbox.put_nowait(msg)
            elif frame.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSE):
                break

    def _message(
        self, channel: str, msg_type: str, content: dict[str, Any], parent: Message | None = None
    ) -> Message:
        msg_id = uuid.uuid4().hex
        return {
            "header": {
                "msg_id": msg_id,
                "msg_type": msg_type,
                "username": "cablectl",
                "session": self._session_id,
                "date": datetime.datetime.now(datetime.UTC).isoformat(),
                "version": PROTOCOL_VERSION,
            },
            "parent_header": (parent or {}).get("header", {}),
            "metadata": {},
            "content": content,
            "channel": channel,
            "buffers": [],
        }

    async def execute(
        self, code: str, *, allow_stdin: bool = True, user_expressions: dict[str, str] | None = None
    ) -> str:
        msg = self._message(
            "shell",
            "execute_request",
            {
                "code": code,
                "silent": False,
                "store_history": False,
                "user_expressions": user_expressions or {},
                "allow_stdin": allow_stdin,
                "stop_on_error": True,
            },
        )
        await self._ws.send_json(msg)
        return str(msg["header"]["msg_id"])

    async def input_reply(self, value: str, parent: Message) -> None:
        await self._ws.send_json(self._message("stdin", "input_reply", {"value": value}, parent))

    async def interrupt(self) -> str | None:
        # on the control channel, not ``POST .../interrupt``: its reply says when the kernel
        # has signalled itself (the REST call does not wait for a kernel interrupted by message)
        msg = self._message("control", "interrupt_request", {})
        await self._ws.send_json(msg)
        return str(msg["header"]["msg_id"])

    async def is_alive(self) -> bool:
        if self._ws.closed or self._reader.done():
            return False
        try:
            status = await self.provider._get_status(f"/api/kernels/{self.kernel_id}")
        except aiohttp.ClientError:
            return False
        return status == 200

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader
        with contextlib.suppress(Exception):
            await self._ws.close()
        with contextlib.suppress(Exception):
            await self.provider._delete(f"/api/kernels/{self.kernel_id}")


class GatewayKernelProvider(KernelProvider):
    """Kernels from a gateway at ``base_url`` (``http(s)://host:port``, optional base path)."""

    def __init__(
        self,
        base_url: str,
        *,
        kernel_name: str = "python3",
        auth_token: str | None = None,
        env: dict[str, str] | None = None,
        request_timeout: float = 60.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.kernel_name = kernel_name
        self.env = {k: v for k, v in (env or {}).items() if k.startswith("KERNEL_")}
        self._headers = {"Authorization": f"token {auth_token}"} if auth_token else {}
        self._timeout = aiohttp.ClientTimeout(total=request_timeout)
        self._session: aiohttp.ClientSession | None = None
        self.started_ids: list[str] = []  # every kernel this provider created on the gateway

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        return self._session

    async def _post(self, path: str, json: dict[str, Any] | None = None) -> dict[str, Any]:
        async with self._http().post(self.base_url + path, json=json or {}) as response:
            response.raise_for_status()
            data = await response.json(content_type=None)
            return data if isinstance(data, dict) else {}

    async def _get_status(self, path: str) -> int:
        async with self._http().get(self.base_url + path) as response:
            return response.status

    async def _delete(self, path: str) -> None:
        async with self._http().delete(self.base_url + path) as response:
            if response.status not in (204, 404):
                response.raise_for_status()

    async def start_kernel(self) -> GatewayKernel:
        data = await self._post("/api/kernels", {"name": self.kernel_name, "env": self.env})
        kernel_id = str(data["id"])
        self.started_ids.append(kernel_id)
        ws_url = self.base_url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        try:
            ws = await self._http().ws_connect(f"{ws_url}/api/kernels/{kernel_id}/channels", heartbeat=30)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._delete(f"/api/kernels/{kernel_id}"))
            raise
        kernel = GatewayKernel(self, kernel_id, ws)
        try:
            await self._wait_ready(kernel)
        except BaseException:
            await asyncio.shield(kernel.shutdown())
            raise
        return kernel

    async def _wait_ready(self, kernel: GatewayKernel, timeout: float = 60.0) -> None:
        """A kernel_info round trip: the kernel answers on shell once it is ready."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            msg = kernel._message("shell", "kernel_info_request", {})
            await kernel._ws.send_json(msg)
            while asyncio.get_running_loop().time() < deadline:
                reply = await kernel.next_message(1.0)
                if reply is None:
                    break
                if (
                    reply.get("parent_header", {}).get("msg_id") == msg["header"]["msg_id"]
                    and reply["channel"] == "shell"
                ):
                    return
            if asyncio.get_running_loop().time() >= deadline:
                raise TimeoutError(f"kernel {kernel.kernel_id} did not become ready in {timeout:g} s")

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

"""Server-side toolsets: functions the proxy executes itself (OpenAPI endpoints, MCP servers).

Their functions appear in the kernel beside the client's tools. A call to one goes
through the same back-channel, but the proxy answers it by calling the endpoint or
the MCP server, with credentials from config; the program carries on, and the
client is never asked. Keys can be limited to toolsets (``keys[].toolsets``).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from proxy.config import ToolsetConfig
from proxy.errors import ConfigError
from translators import Operation, Toolset, build_request, render_stubs, toolset_from_openapi
from translators.affordance import ToolIndex
from translators.errors import ToolsetError

__all__ = [
    "SEARCH_TOOLS",
    "MCPToolset",
    "OpenAPIToolset",
    "ServerToolset",
    "ToolCallFailed",
    "ToolSearch",
    "build_toolsets",
]

log = logging.getLogger("cablectl.toolsets")


class ToolCallFailed(Exception):
    """A server-side call failed; the message goes to the program as a ToolError."""


class ServerToolset(abc.ABC):
    def __init__(self, name: str, config: ToolsetConfig) -> None:
        self.name = name
        self.config = config
        self.tools: list[dict[str, Any]] = []  # OpenAI tool JSON, filled by start()

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def call(self, tool: str, arguments: dict[str, Any]) -> Any: ...

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections and processes."""

    def names(self) -> list[str]:
        return [str(t["function"]["name"]) for t in self.tools]


def _decode(body: bytes, content_type: str) -> Any:
    if "json" in content_type:
        with contextlib.suppress(orjson.JSONDecodeError):
            return orjson.loads(body)
    return body.decode("utf-8", "replace")


class OpenAPIToolset(ServerToolset):
    def __init__(self, name: str, config: ToolsetConfig) -> None:
        super().__init__(name, config)
        self._ops: dict[str, Operation] = {}
        self._http: aiohttp.ClientSession | None = None

    async def _spec(self) -> Any:
        source = str(self.config.openapi)
        if source.startswith(("http://", "https://")):
            async with aiohttp.ClientSession() as http, http.get(source) as response:
                response.raise_for_status()
                text = await response.text()
        else:
            try:
                text = await asyncio.to_thread(Path(source).read_text, encoding="utf-8")
            except OSError as exc:
                raise ConfigError(
                    f"toolset {self.name!r}: cannot read OpenAPI spec {source}: {exc.strerror}"
                ) from exc
        return yaml.safe_load(text)

    async def start(self) -> None:
        try:
            operations = toolset_from_openapi(await self._spec())
        except ToolsetError as exc:
            raise ConfigError(f"toolset {self.name!r}: {exc.message}") from exc
        self._ops = {op.name: op for op in operations}
        self.tools = [op.tool for op in operations]
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.config.timeout))

    async def call(self, tool: str, arguments: dict[str, Any]) -> Any:
        op = self._ops[tool]
        try:
            request = build_request(op.http, arguments, base_url=self.config.base_url)
        except ToolsetError as exc:
            raise ToolCallFailed(exc.message) from exc
        headers = {**request.headers, **self.config.headers}
        assert self._http is not None
        try:
            async with self._http.request(
                request.method, request.url, headers=headers, data=request.body
            ) as response:
                body = await response.read()
                if response.status >= 400:
                    detail = body[:500].decode("utf-8", "replace")
                    raise ToolCallFailed(
                        f"{op.http.method} {op.http.path} answered HTTP {response.status}: {detail}"
                    )
                return _decode(body, response.headers.get("content-type", ""))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ToolCallFailed(f"{op.http.method} {op.http.path} failed: {exc!r}") from exc

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close()


class MCPToolset(ServerToolset):
    def __init__(self, name: str, config: ToolsetConfig) -> None:
        super().__init__(name, config)
        self._stack = contextlib.AsyncExitStack()
        self._session: Any = None

    async def start(self) -> None:
        from mcp import ClientSession, StdioServerParameters

        server = self.config.mcp
        assert server is not None
        if server.command:
            from mcp.client.stdio import stdio_client

            params = StdioServerParameters(
                command=server.command[0], args=server.command[1:], env=server.env or None
            )
            read, write = await self._stack.enter_async_context(stdio_client(params))
        else:
            from mcp.client.streamable_http import streamable_http_client

            read, write = await self._stack.enter_async_context(streamable_http_client(str(server.url)))
        self._session = await self._stack.enter_async_context(ClientSession(read, write))
        await self._session.initialize()
        listed = await self._session.list_tools()
        self.tools = [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    "description": t.description or "",
                    "parameters": t.input_schema or {"type": "object", "properties": {}},
                },
            }
            for t in listed.tools
        ]

    async def call(self, tool: str, arguments: dict[str, Any]) -> Any:
        result = await self._session.call_tool(tool, arguments)
        text = "\n".join(
            getattr(item, "text", "") for item in result.content if getattr(item, "type", "") == "text"
        )
        if result.is_error:
            raise ToolCallFailed(text or f"{tool} failed")
        if result.structured_content is not None:
            return result.structured_content
        with contextlib.suppress(orjson.JSONDecodeError):
            return orjson.loads(text)
        return text

    async def aclose(self) -> None:
        await self._stack.aclose()


SEARCH_TOOLS = "search_tools"


class ToolSearch(ServerToolset):
    """``search_tools(query, limit=8) -> list[str]``: the stubs of the request's tools that best
    match ``query``, for a prompt that shows only some of them (``translators.affordance``).
    Answered by the proxy from the request's own tools; nothing leaves the process."""

    def __init__(self, index: ToolIndex) -> None:
        super().__init__("affordance", ToolsetConfig(promoted=True))  # proxy-internal: nothing to configure
        self.index = index
        self.tools = [
            {
                "type": "function",
                "function": {
                    "name": SEARCH_TOOLS,
                    "description": "Stubs of more functions you can call, best match first.",
                    "parameters": {
                        "type": "object",
                        "properties": {
                            "query": {"type": "string", "description": "what the function should do"},
                            "limit": {"type": "integer", "default": 8},
                        },
                        "required": ["query"],
                    },
                },
            }
        ]

    async def start(self) -> None:
        return None

    async def call(self, tool: str, arguments: dict[str, Any]) -> Any:
        limit = max(1, min(int(arguments.get("limit") or 8), 50))
        return [
            render_stubs(Toolset(tools=(t,), digest=self.index.toolset.digest), header=False).strip()
            for t in self.index.rank(str(arguments.get("query", "")), limit)
        ]


def build_toolsets(configs: dict[str, ToolsetConfig]) -> dict[str, ServerToolset]:
    """The toolsets the proxy executes (promoted ones live in the kernel: ``proxy.library``)."""
    return {
        name: (OpenAPIToolset(name, config) if config.openapi else MCPToolset(name, config))
        for name, config in configs.items()
        if not config.promoted
    }

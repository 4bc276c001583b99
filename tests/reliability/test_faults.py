"""Fault injection: kernels killed mid-cell, Redis restarted, the proxy restarted between a
tool_calls response and its results, an upstream failing in every way, clients going away.

In every case the conversation either continues correctly or gets a clear, retryable error,
nothing is lost, and no kernel process outlives its proxy."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from proxy.app import create_app
from proxy.config import load_settings
from tests.conftest import upstream_models, write_config
from tests.servers import UvicornThread, free_port, wait_for_redis
from tests.test_actions import LOOP_PROGRAM, WEATHER, answer_call, program
from tests.upstream import Hang, Reply, ScriptedUpstream, Stream, canned_completion, load_recording

ANSWER = "Rome is hotter (24 vs 18)."
CONTENT = "no_tool_calls/e2aad469b71d1d4894ff833ea147020a9d875eb7ce644a0ff355581690a4cbfd.bin"
OBSERVATION = "Observation:\nhottest: Rome {'Paris': 18, 'Rome': 24}"


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def kernel_pids(server: UvicornThread) -> list[int]:
    return list(server.server.config.app.state.pool.provider.started_pids)


def start(path: Path) -> UvicornThread:
    return UvicornThread(create_app(load_settings(path, env={}))).start()


def config(upstream_url: str, **extra: Any) -> dict[str, Any]:
    return {"model_list": upstream_models(upstream_url), "kernels": {"min_idle": 1, "max_total": 3}, **extra}


def sdk(server: UvicornThread, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, **kwargs)


def first_two_turns(client: openai.OpenAI, upstream: ScriptedUpstream, model: str) -> list[Any]:
    """The loop program's first two round trips; the next request finishes the program."""
    upstream.plan(program(LOOP_PROGRAM))
    messages: list[Any] = [{"role": "user", "content": "Which is hotter, Paris or Rome?"}]
    response = client.chat.completions.create(model=model, messages=messages, tools=WEATHER)
    answer_call(messages, response, {"t": 18})
    response = client.chat.completions.create(model=model, messages=messages, tools=WEATHER)
    assert json.loads((response.choices[0].message.tool_calls or [])[0].function.arguments) == {
        "city": "Rome"
    }
    answer_call(messages, response, {"t": 24})
    return messages


# --- kernels -----------------------------------------------------------------------------------


def test_kernel_killed_mid_cell(tmp_path: Path, upstream_url: str, upstream: ScriptedUpstream) -> None:
    server = start(write_config(tmp_path, config(upstream_url)))
    try:
        with sdk(server) as client:
            upstream.plan(
                program("```python\nimport time\ntime.sleep(30)\nprint('never')\n```"),
                program("The kernel died; I will try again."),
            )
            result: dict[str, Any] = {}

            def ask() -> None:
                result["r"] = client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "sleep"}], tools=WEATHER
                )

            thread = threading.Thread(target=ask)
            thread.start()
            pool = server.server.config.app.state.pool
            deadline = time.monotonic() + 30
            while not any(k["state"] == "busy" for k in pool.snapshot()):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            time.sleep(0.5)  # inside time.sleep(30) now
            [busy] = [k for k in pool.snapshot() if k["state"] == "busy"]
            os.kill(busy["pid"], signal.SIGKILL)
            thread.join(timeout=60)
            # the model is told, and answers; nothing waited for the 30 s
            assert result["r"].choices[0].message.content == "The kernel died; I will try again."
            assert "The kernel died" in upstream.received[-1].json["messages"][-1]["content"]
            # the conversation goes on with a fresh kernel
            upstream.plan(program("```python\nprint(6 * 7)\n```"), program("42"))
            again = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "6*7?"}], tools=WEATHER
            )
            assert again.choices[0].message.content == "42"
            assert not alive(busy["pid"])
    finally:
        pids = kernel_pids(server)
        server.stop()
    assert pids and not [p for p in pids if alive(p)]


# --- Redis -------------------------------------------------------------------------------------


class PersistentRedis:
    """A redis-server with append-only persistence in a directory of its own, restartable."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is needed (apt-get install redis-server)"
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_redis(self.url, self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()  # SIGTERM: redis flushes the AOF and exits
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[PersistentRedis]:
    if shutil.which("redis-server") is None and os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        pytest.skip("redis-server is not installed")
    (tmp_path / "redis").mkdir()
    server = PersistentRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def test_redis_restarted_between_turns(
    tmp_path: Path, upstream_url: str, upstream: ScriptedUpstream, persistent_redis: PersistentRedis
) -> None:
    cfg = config(upstream_url, sessions={"redis_url": persistent_redis.url, "secret": "a-secret-of-replicas"})
    server = start(write_config(tmp_path, cfg))
    try:
        with sdk(server) as client:
            messages = first_two_turns(client, upstream, "gpt-4o-mini")
            persistent_redis.stop()
            # while Redis is away: a clear, retryable error
            with pytest.raises(openai.InternalServerError) as down:
                client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=WEATHER)
            assert down.value.status_code == 503 and "retry" in str(down.value.body)
            persistent_redis.start()  # the same directory: the log comes back from the AOF
            upstream.plan(program(ANSWER))
            final = client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=WEATHER)
            assert final.choices[0].message.content == ANSWER
            assert upstream.received[-1].json["messages"][-1]["content"] == OBSERVATION
    finally:
        pids = kernel_pids(server)
        server.stop()
    assert not [p for p in pids if alive(p)]


def test_proxy_restarted_between_tool_calls_and_results(
    tmp_path: Path, upstream_url: str, upstream: ScriptedUpstream, persistent_redis: PersistentRedis
) -> None:
    path = write_config(
        tmp_path,
        config(upstream_url, sessions={"redis_url": persistent_redis.url, "secret": "a-secret-of-replicas"}),
    )
    first = start(path)
    try:
        with sdk(first) as client:
            messages = first_two_turns(client, upstream, "gpt-4o-mini")
    finally:
        first_pids = kernel_pids(first)
        first.stop()  # the session's kernel goes with it
    assert first_pids and not [p for p in first_pids if alive(p)]
    second = start(path)
    try:
        upstream.plan(program(ANSWER))
        with sdk(second) as client:
            final = client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=WEATHER)
        assert final.choices[0].message.content == ANSWER  # replayed from the log, nothing lost
        assert upstream.received[-1].json["messages"][-1]["content"] == OBSERVATION
    finally:
        second_pids = kernel_pids(second)
        second.stop()
    assert not [p for p in second_pids if alive(p)]


# --- the upstream ------------------------------------------------------------------------------

FAULTS = [
    pytest.param("gpt-4o-mini", Reply(status=500, body=b"<html>oops</html>"), 502, id="500"),
    pytest.param("gpt-4o-mini", Reply(status=429, json={"error": {"message": "slow down"}}), 429, id="429"),
    pytest.param("slow", Hang(3.0), 504, id="timeout"),
    pytest.param("gpt-4o-mini", Reply(body=b'{"choices": [{"mess'), 502, id="invalid-json"),
]


@pytest.mark.parametrize(("model", "fault", "status"), FAULTS)
def test_upstream_fault_inside_the_loop_is_retryable(
    tmp_path: Path, upstream_url: str, upstream: ScriptedUpstream, model: str, fault: Any, status: int
) -> None:
    server = start(write_config(tmp_path, config(upstream_url)))
    try:
        with sdk(server) as client:
            messages = first_two_turns(client, upstream, model)
            upstream.plan(fault)  # the program finishes, then the model call for the answer fails
            with pytest.raises(openai.APIStatusError) as failed:
                client.chat.completions.create(model=model, messages=messages, tools=WEATHER)
            assert failed.value.status_code == status
            assert set(failed.value.body) == {"message", "type", "param", "code"}  # type: ignore[arg-type]
            # the client retries the same request: the program's result was kept, nothing runs twice
            upstream.plan(program(ANSWER))
            final = client.chat.completions.create(model=model, messages=messages, tools=WEATHER)
            assert final.choices[0].message.content == ANSWER
            assert upstream.received[-1].json["messages"][-1]["content"] == OBSERVATION
    finally:
        server.stop()


def test_truncated_stream_is_an_error_event_then_a_retry_works(
    tmp_path: Path, upstream_url: str, upstream: ScriptedUpstream
) -> None:
    server = start(write_config(tmp_path, config(upstream_url)))
    try:
        with sdk(server) as client:
            chunks = load_recording(CONTENT)
            upstream.plan(Stream(chunks=chunks, truncate=True), Stream(chunks=chunks))
            with pytest.raises(openai.APIError):
                for _ in client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
                ):
                    pass
            text = "".join(
                c.choices[0].delta.content or ""
                for c in client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
                )
                if c.choices
            )
            assert text
    finally:
        server.stop()


# --- clients that go away --------------------------------------------------------------------


def test_client_gone_mid_request_leaves_no_stuck_lock_or_kernel(
    tmp_path: Path, upstream_url: str, upstream: ScriptedUpstream
) -> None:
    cfg = config(upstream_url, kernels={"min_idle": 1, "max_total": 3, "session_idle_seconds": 1})
    server = start(write_config(tmp_path, cfg))
    try:
        with sdk(server) as client:
            messages = first_two_turns(client, upstream, "gpt-4o-mini")
            upstream.plan(Hang(1.5), program(ANSWER))  # the answer is slow; the client gives up at 0.3 s
            with sdk(server, timeout=0.3) as impatient, pytest.raises(openai.APITimeoutError):
                impatient.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=WEATHER)
            # at once, the same request again: it waits for the lock at most until the first is done
            final = client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=WEATHER)
            assert final.choices[0].message.content == ANSWER
            assert upstream.received[-1].json["messages"][-1]["content"] == OBSERVATION
            # a stream the client drops after its first chunk
            gate = threading.Event()
            upstream.plan(Stream(chunks=load_recording(CONTENT), gate=gate))
            with httpx.stream(
                "POST",
                server.url + "/v1/chat/completions",
                json={
                    "model": "gpt-4o-mini",
                    "messages": [{"role": "user", "content": "hi"}],
                    "stream": True,
                },
            ) as response:
                next(response.iter_bytes())
            gate.set()
            # idle sessions give their kernels back (session_idle_seconds: 1): the pool is idle again
            pool = server.server.config.app.state.pool
            deadline = time.monotonic() + 15
            while pool.stats().busy and time.monotonic() < deadline:
                time.sleep(0.1)
            assert pool.stats().busy == 0
            assert httpx.get(server.url + "/health").status_code == 200
    finally:
        pids = kernel_pids(server)
        server.stop()
    assert not [p for p in pids if alive(p)]


class OneRequestPerConnection:
    """An upstream that keeps connections alive in its headers, then drops each one on its second
    request without answering, as a server does that closes idle connections on its own clock."""

    def __init__(self, delay: float = 0.0) -> None:
        self.port = free_port()
        self.delay = delay  # before each answer: concurrent requests open connections of their own
        self.requests = 0
        self.dropped = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(
                    next(
                        (
                            h.split(b":")[1]
                            for h in head.split(b"\r\n")
                            if h.lower().startswith(b"content-length")
                        ),
                        b"0",
                    )
                )
                await reader.readexactly(length)
                if served:
                    self.dropped += 1
                    return  # closed without a word
                self.requests += 1
                await asyncio.sleep(self.delay)
                body = json.dumps(canned_completion("scripted", "fresh")).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: keep-alive\r\n"
                    + f"content-length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
                served += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", self.port))
        self._ready.set()
        with contextlib.suppress(RuntimeError):
            self._loop.run_forever()
        server.close()
        self._loop.run_until_complete(server.wait_closed())
        self._loop.close()  # its self-pipe sockets too

    def __enter__(self) -> OneRequestPerConnection:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@contextlib.contextmanager
def client_of(flaky: OneRequestPerConnection, tmp_path: Path) -> Iterator[openai.OpenAI]:
    """An SDK client of a proxy whose one route is ``flaky``."""
    route = {
        "model_name": "m",
        "litellm_params": {"model": "openai/m", "api_base": f"http://127.0.0.1:{flaky.port}/v1"},
    }
    server = start(
        write_config(tmp_path, {"model_list": [route], "kernels": {"min_idle": 0, "max_total": 1}})
    )
    try:
        with sdk(server) as client:
            yield client
    finally:
        server.stop()


def test_a_kept_alive_connection_the_upstream_dropped_is_retried(tmp_path: Path) -> None:
    with OneRequestPerConnection() as flaky, client_of(flaky, tmp_path) as client:
        # the second goes out on the pooled, now dead, connection, and again on a new one
        # (closed after it); the third finds no pooled connection and opens one
        for _ in range(3):
            reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
            assert reply.choices[0].message.content == "fresh"
        assert flaky.requests == 3 and flaky.dropped == 1


def test_a_retry_after_a_dropped_connection_does_not_take_another_dropped_one(tmp_path: Path) -> None:
    """After a lull a server closes every idle connection at once: the retry of a request that
    met one must not go out on the next pooled one (closed too), but on a new connection."""
    with OneRequestPerConnection(delay=0.3) as flaky:
        with client_of(flaky, tmp_path) as client:

            def ask(_: object = None) -> str:
                reply = client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "hi"}]
                )
                return str(reply.choices[0].message.content)

            with ThreadPoolExecutor(4) as threads:  # four connections, each then pooled
                assert list(threads.map(ask, range(4))) == ["fresh"] * 4
            assert flaky.requests == 4
            for _ in range(3):  # each meets a pooled connection the server has dropped
                assert ask() == "fresh"
        assert flaky.requests == 7 and flaky.dropped == 3

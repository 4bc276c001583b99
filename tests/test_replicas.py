"""Three ``cablectl serve`` replicas on one Redis behind a real HAProxy (round robin): each
conversation's requests land on any replica and are answered by the one holding its kernel.

Real processes throughout: redis-server, haproxy (Debian's package) and the replicas are started
here on free ports; the model is an HTTP server that writes, for each question, a program that
asks the client for three cities in turn (so every conversation is 3 client tool round trips),
then answers with what the program printed. Replays and forwards are read from each replica's
``/metrics``."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import yaml

from tests.servers import UvicornThread, free_ports
from tests.upstream import Reply, ScriptedUpstream, Stream, canned_completion

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
WEATHER = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current temperature of a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def temperature(city: str) -> int:
    return sum(city.encode()) % 40


class CityModel(ScriptedUpstream):
    """For a question naming cities, a program asking for each; for its observation, the answer."""

    def _next(self) -> None:
        return None

    def _default(self, body: bytes) -> Reply | Stream:  # type: ignore[override]
        request = orjson.loads(body)
        last = request["messages"][-1]["content"]
        last = last if isinstance(last, str) else json.dumps(last)
        if last.startswith("Observation:"):
            text = "The total is " + last.rsplit("total:", 1)[-1].strip() + "."
        else:
            cities = last.rsplit(":", 1)[-1].strip().split(",")
            text = (
                "Adding them up.\n```python\n"
                "total = 0\n"
                f"for c in {cities!r}:\n"
                "    total += get_weather(city=c)['t']\n"
                "print('total:', total)\n"
                "```"
            )
        return Reply(json=canned_completion(str(request.get("model")), text))


@dataclass
class Cluster:
    replicas: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)
    balancer: str = ""
    redis_url: str = ""

    def owner_of(self, session: str) -> str | None:
        """The replica whose claim on the session is in Redis (by its announced address)."""
        import redis

        client = redis.Redis.from_url(self.redis_url)
        try:
            claim = client.get(f"cablectl:kv:owner:{session}")
            if claim is None:
                return None
            announced = client.get(f"cablectl:r:{orjson.loads(claim)['replica']}")
        finally:
            client.close()
        address = orjson.loads(announced)["address"] if announced else None
        return next((name for name, url in self.urls.items() if url == address), None)

    def metric(self, name: str, url: str) -> dict[str, float]:
        """Each labelled sample of a counter on one replica."""
        samples: dict[str, float] = {}
        for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
            if line.startswith(name + "{"):
                labels, value = line.rsplit(" ", 1)
                samples[labels[len(name) :]] = float(value)
        return samples

    def total(self, name: str, names: list[str] | None = None) -> dict[str, float]:
        summed: dict[str, float] = {}
        for key in names or list(self.urls):
            for labels, value in self.metric(name, self.urls[key]).items():
                summed[labels] = summed.get(labels, 0.0) + value
        return summed

    def kill(self, name: str) -> None:
        proc = self.replicas[name]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, log.read_text()[-4000:]
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return
        assert time.monotonic() < deadline, (
            f"replica at {url} did not become ready:\n{log.read_text()[-4000:]}"
        )
        time.sleep(0.2)


HAPROXY_CFG = """global
    maxconn 512
defaults
    mode http
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    retries 3
    option redispatch
frontend cablectl
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk GET /health
{servers}
"""


@pytest.fixture
def cluster(tmp_path: Path, redis_url: str) -> Iterator[Cluster]:
    haproxy = shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None
    )
    if haproxy is None:
        if IN_CI:
            pytest.fail("haproxy is not installed, and CI needs it: apt-get install haproxy")
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    with UvicornThread(CityModel(), lifespan="off") as model:
        cluster = Cluster(redis_url=redis_url)
        cablectl = str(Path(sys.executable).parent / "cablectl")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "LANG": "C.UTF-8"}
        # all four ports at once: picked one by one, a replica was once given the port of
        # another that had not bound it yet, failed to bind, and the test talked to the other
        *ports, balancer_port = free_ports(4)
        try:
            for n, port in enumerate(ports):
                name = f"r{n + 1}"
                config = {
                    "model_list": [
                        {
                            "model_name": "gpt-4o-mini",
                            "litellm_params": {
                                "model": "openai/gpt-4o-mini",
                                "api_base": model.url + "/v1",
                                "api_key": "sk-test",
                            },
                        }
                    ],
                    "kernels": {"min_idle": 2, "max_total": 12, "session_idle_seconds": 600},
                    "sessions": {"redis_url": redis_url},
                    "server": {"log_level": "info"},
                }
                path = tmp_path / f"{name}.yaml"
                path.write_text(yaml.safe_dump(config))
                log = tmp_path / f"{name}.log"
                cluster.logs[name] = log
                with log.open("wb") as out:  # the child keeps its own descriptor
                    cluster.replicas[name] = subprocess.Popen(
                        [cablectl, "serve", "--config", str(path), "--port", str(port)],
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                cluster.urls[name] = f"http://127.0.0.1:{port}"
            for name, url in cluster.urls.items():
                wait_ready(url, cluster.replicas[name], cluster.logs[name])
            for name, proc in cluster.replicas.items():
                assert proc.poll() is None, f"replica {name} exited: {cluster.logs[name].read_text()[-2000:]}"
            port = balancer_port
            servers = "\n".join(
                f"    server {name} {url.removeprefix('http://')} check inter 300ms fall 2 rise 2"
                for name, url in cluster.urls.items()
            )
            (tmp_path / "haproxy.cfg").write_text(HAPROXY_CFG.format(port=port, servers=servers))
            with (tmp_path / "haproxy.log").open("wb") as out:
                balancer = subprocess.Popen(
                    [haproxy, "-f", str(tmp_path / "haproxy.cfg"), "-db"],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            cluster.balancer = f"http://127.0.0.1:{port}"
            try:
                wait_ready(cluster.balancer, balancer, tmp_path / "haproxy.log", timeout=30)
                yield cluster
            finally:
                balancer.terminate()
                balancer.wait(timeout=10)
        finally:
            for proc in cluster.replicas.values():
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
            for proc in cluster.replicas.values():
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


@dataclass
class Conversation:
    number: int
    stream: bool
    messages: list[Any] = field(default_factory=list)
    asked: list[str] = field(default_factory=list)
    replicas: list[str] = field(default_factory=list)

    @property
    def cities(self) -> list[str]:
        return [f"C{self.number}x{i}" for i in range(3)]

    def start(self) -> None:
        self.messages = [{"role": "user", "content": "Add the temperatures of: " + ",".join(self.cities)}]

    def step(self, base_url: str, retries: int = 0) -> str | None:
        """One request through the balancer; answers the calls it gets. The final text, if any."""
        with openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=retries) as client:
            message, tool_calls = self._streamed(client) if self.stream else self._whole(client)
        self.messages.append(message)
        for call in tool_calls:
            city = json.loads(call["function"]["arguments"])["city"]
            self.asked.append(city)
            self.messages.append(
                {"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"t": temperature(city)})}
            )
        return None if tool_calls else str(message.get("content"))

    def _whole(self, client: openai.OpenAI) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        reply = client.chat.completions.create(model="gpt-4o-mini", messages=self.messages, tools=WEATHER)
        message = reply.choices[0].message.model_dump(exclude_none=True)
        return message, list(message.get("tool_calls") or [])

    def _streamed(self, client: openai.OpenAI) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        stream = client.chat.completions.create(
            model="gpt-4o-mini", messages=self.messages, tools=WEATHER, stream=True
        )
        text, calls = "", {}
        for chunk in stream:
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            text += delta.content or ""
            for call in delta.tool_calls or []:
                held = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                held["id"] = call.id or held["id"]
                if call.function is not None:
                    held["name"] += call.function.name or ""
                    held["arguments"] += call.function.arguments or ""
        tool_calls = [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for _, c in sorted(calls.items())
        ]
        message: dict[str, Any] = {"role": "assistant", "content": text or None}
        if tool_calls:
            message["tool_calls"] = tool_calls
        return message, tool_calls

    @property
    def session(self) -> str:
        """The session its tool-call ids name (``call_<session>_<seq>_<sig>``)."""
        return str(self.messages[1]["tool_calls"][0]["id"].split("_")[1])

    @property
    def expected(self) -> str:
        return f"The total is {sum(temperature(c) for c in self.cities)}."


def run(conversation: Conversation, base_url: str, steps: int, retries: int = 0) -> str | None:
    answer = None
    for _ in range(steps):
        answer = conversation.step(base_url, retries)
        if answer is not None:
            break
    return answer


def test_three_replicas_behind_haproxy_answer_each_session_where_its_kernel_is(cluster: Cluster) -> None:
    """20 concurrent conversations, 3 client tool round trips each, round robin over 3 replicas:
    every answer right, every city asked once, requests forwarded to the owner, zero replays."""
    conversations = [Conversation(n, stream=n % 2 == 1) for n in range(20)]
    for c in conversations:
        c.start()
    with ThreadPoolExecutor(len(conversations)) as pool:
        answers = list(pool.map(lambda c: run(c, cluster.balancer, 5), conversations))
    for c, answer in zip(conversations, answers, strict=True):
        assert c.asked == c.cities, c.number
        assert answer == c.expected, (c.number, c.messages[-1])
    assert sum(cluster.total("cablectl_session_replays_total").values()) == 0
    forwards = cluster.total("cablectl_session_forwards_total")
    # 80 requests, most of which landed on a replica not holding their session
    assert forwards.get('{outcome="sent"}', 0) >= 20
    assert forwards.get('{outcome="sent"}') == forwards.get('{outcome="received"}')
    assert forwards.get('{outcome="unreachable"}', 0) == 0


def test_a_killed_replicas_conversations_go_on_elsewhere_by_replay(cluster: Cluster) -> None:
    """One replica is killed between round trips: its conversations continue on the others
    (their logs replayed), and no city is asked twice."""
    conversations = [Conversation(n, stream=n % 3 == 0) for n in range(9)]
    for c in conversations:
        c.start()
    with ThreadPoolExecutor(len(conversations)) as pool:
        list(pool.map(lambda c: c.step(cluster.balancer), conversations))
    owners = {}
    for c in conversations:
        assert c.asked == c.cities[:1]
        owners[c.number] = cluster.owner_of(c.session)
    victim = max(cluster.urls, key=lambda name: list(owners.values()).count(name))
    cluster.kill(victim)
    survivors = [n for n in cluster.urls if n != victim]
    with ThreadPoolExecutor(len(conversations)) as pool:
        answers = list(pool.map(lambda c: run(c, cluster.balancer, 5, retries=3), conversations))
    for c, answer in zip(conversations, answers, strict=True):
        assert c.asked == c.cities, (c.number, c.asked)
        assert answer == c.expected
    replays = cluster.total("cablectl_session_replays_total", survivors)
    lost = sum(1 for n, owner in owners.items() if owner == victim)
    assert lost >= 1  # round robin gave the victim some of the nine sessions
    # exactly the victim's sessions were replayed, each once, because their owner was gone
    assert sum(replays.values()) == lost
    assert all("owner_" in labels for labels in replays), replays


def test_the_deploy_example_holds_together(tmp_path: Path) -> None:
    """deploy/: the config loads (with Redis), HAProxy accepts its file, and compose's replicas
    are the balancer's servers, each advertising its own address."""
    from proxy.config import load_settings

    deploy = Path(__file__).resolve().parents[1] / "deploy"
    settings = load_settings(deploy / "config.yaml", env={})
    assert settings.sessions.redis_url and settings.server.host == "0.0.0.0"
    compose = yaml.safe_load((deploy / "compose.yaml").read_text())
    replicas = {
        name: service["environment"]["CABLECTL_ADVERTISE_URL"]
        for name, service in compose["services"].items()
        if name.startswith("cablectl")
    }
    assert len(replicas) == 3 and len(set(replicas.values())) == 3
    config = (deploy / "haproxy.cfg").read_text()
    for name, url in replicas.items():
        assert f"server {name} {url.removeprefix('http://')}" in config
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not os.path.exists(haproxy):
        if IN_CI:
            pytest.fail("haproxy is not installed, and CI needs it: apt-get install haproxy")
        pytest.skip("haproxy is not installed")
    checked = subprocess.run(
        [haproxy, "-c", "-f", str(deploy / "haproxy.cfg")], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_client_cannot_pass_for_a_replica(make_proxy: Any, upstream_url: str, redis_url: str) -> None:
    """The forwarding header is for replicas: one that does not verify is a 403 in OpenAI's shape
    (the request is not answered as if another replica had sent it)."""
    from tests.conftest import upstream_models

    proxy = make_proxy({"model_list": upstream_models(upstream_url), "sessions": {"redis_url": redis_url}})
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "tools": WEATHER}
    for header in ("1.abc", f"{int(time.time())}.{'0' * 64}", "nonsense", ""):
        reply = httpx.post(
            proxy.url + "/v1/chat/completions",
            json=body,
            headers={"x-cablectl-forwarded": header},
            timeout=30,
        )
        assert reply.status_code == 403, reply.text
        error = reply.json()["error"]
        assert error["type"] == "permission_error" and error["code"] == "bad_forwarding_signature"

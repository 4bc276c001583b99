"""``/metrics`` scraped after a scripted conversation through a real proxy."""

from __future__ import annotations

from typing import Any

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ProxyFactory, upstream_models
from tests.test_actions import LOOP_PROGRAM, WEATHER, answer_call, program
from tests.upstream import ScriptedUpstream


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = httpx.get(url + "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_metrics_after_a_conversation(
    make_proxy: ProxyFactory, upstream_url: str, upstream: ScriptedUpstream
) -> None:
    proxy = make_proxy(
        {"model_list": upstream_models(upstream_url), "kernels": {"min_idle": 1, "max_total": 2}}
    )
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as client:
        model = "gpt-4o-mini"

        # a repaired static call (fast path), then the loop program over two round trips (kernel path)
        upstream.plan(
            program('```python\nget_weather(town="Paris")\n```'),
            program('```python\nget_weather(city="Paris")\n```'),
        )
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Paris?"}], tools=WEATHER
        )
        upstream.plan(program(LOOP_PROGRAM))
        messages: list[Any] = [{"role": "user", "content": "Which is hotter?"}]
        response = client.chat.completions.create(model=model, messages=messages, tools=WEATHER)
        for temp in (18, 24):
            answer_call(messages, response, {"t": temp})
            if temp == 24:
                upstream.plan(program("Rome."))
            response = client.chat.completions.create(model=model, messages=messages, tools=WEATHER)
        # a pass-through request, and one for a model that does not exist (its name is not a label)
        upstream.plan(program("hi"))
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
        assert (
            httpx.post(
                proxy.url + "/v1/chat/completions", json={"model": "evil-" * 50, "messages": []}
            ).status_code
            == 400
        )
        assert (
            httpx.post(
                proxy.url + "/v1/chat/completions",
                json={"model": "no-such", "messages": [{"role": "user", "content": "x"}]},
            ).status_code
            == 404
        )

        m = scrape(proxy.url)

        def value(name: str, **labels: str) -> float:
            return m.get((name, tuple(sorted(labels.items()))), 0.0)

        assert value("cablectl_requests_total", model=model, status="200", surface="chat.completions") == 5
        assert (
            value("cablectl_requests_total", model="unknown", status="404", surface="chat.completions") == 1
        )
        assert (
            value("cablectl_requests_total", model="-", status="400", surface="chat.completions") == 1
        )  # rejected before a model was read
        assert not any("evil" in str(labels) for _, labels in m)
        for histogram in ("request", "upstream", "overhead"):
            assert value(f"cablectl_{histogram}_duration_seconds_count", model=model) == 5
        assert value("cablectl_upstream_duration_seconds_sum", model=model) > 0
        assert value("cablectl_generations_total", model=model, grammar="none") == 4
        assert value("cablectl_grammar_repairs_total", model=model, outcome="repaired") == 1
        assert value("cablectl_actions_total", path="static") == 1
        assert value("cablectl_actions_total", path="kernel") == 1
        assert value("cablectl_tool_calls_total", kind="client") == 3
        assert value("cablectl_kernel_acquire_wait_seconds_count") == 1
        # the loop session keeps its kernel until it idles out
        assert value("cablectl_sessions_active") == 1
        assert value("cablectl_kernels", state="busy") == 1
        assert value("cablectl_kernels", state="idle") + value("cablectl_kernels", state="starting") >= 1
        assert value("cablectl_kernels_started_total") >= 1

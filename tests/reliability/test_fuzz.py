"""schemathesis against the proxy's own OpenAPI schema, bounded: no generated input (valid or
not) gives a server error, and every 4xx is an OpenAI error body.

schemathesis' pytest plugin does not run under this pytest, so each operation's case
strategy drives a plain hypothesis test.

The cases are a function of the schema alone. ``derandomize`` fixes hypothesis' seed, but
hypothesis also draws, now and then (p=0.05 a string or integer), a literal harvested from the
source of every non-test module of ours imported so far
(``hypothesis.internal.conjecture.providers._get_local_constants``). That pool changed with any
edited string anywhere in proxy/ or translators/ and with what else the run imported (this file
alone vs the whole suite), and so did the cases: one more string in proxy/kernels/local.py
(the /dev/shm runtime, 278de30) turned chat completions' 8 answered valid cases of 60 into 0."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from hypothesis.internal.cache import LRUCache
from hypothesis.internal.conjecture import providers
from hypothesis.internal.constants_ast import Constants

from tests.conftest import ProxyFactory, upstream_models
from tests.servers import UvicornThread
from tests.upstream import Reply, ScriptedUpstream, canned_completion

EXAMPLES = 60  # per operation and generation mode; derandomized, so CI runs the same cases


@pytest.fixture(scope="module")
def fuzzed_proxy(make_proxy: ProxyFactory, upstream_url: str) -> UvicornThread:
    return make_proxy(
        {"model_list": upstream_models(upstream_url), "kernels": {"min_idle": 0, "max_total": 2}}
    )


@pytest.fixture
def schema_only_cases(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No literals from our own source in the generated cases (see the module doc): an empty
    local pool, and a cache of permitted constants of this test's own (the process-wide one may
    hold pools an earlier hypothesis test computed). hypothesis is pinned; if these names move,
    the setattr fails loudly rather than the cases drifting again."""
    monkeypatch.setattr(providers, "_get_local_constants", Constants)
    monkeypatch.setattr(providers, "CONSTANTS_CACHE", LRUCache(1024))
    yield


def no_server_error(ctx: Any, response: Any, case: Any) -> None:
    """No 5xx, except the one the scripted model earns: a request that requires a tool call
    (tool_choice required or named) gets a 502 invalid_model_output when the model keeps
    answering in prose ("All done.") through its repairs. That is the documented answer."""
    if response.status_code < 500:
        return
    body = response.json()
    error = body.get("error") or {}
    earned = error.get("code") == "invalid_model_output" or (  # Anthropic's shape has no code
        case.operation.path.startswith("/v1/messages")
        and "did not write a usable call" in error.get("message", "")
    )
    assert response.status_code == 502 and earned, (
        response.status_code,
        body,
    )


def openai_error_body(ctx: Any, response: Any, case: Any) -> None:
    """A refused request carries {"error": {message, type, param, code}}; on Anthropic's
    Messages API, {"type": "error", "error": {type, message}}."""
    if 400 <= response.status_code < 500:
        body = response.json()
        if case.operation.path.startswith("/v1/messages"):
            assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
            assert body["error"]["message"], body
            return
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error


def operations(url: str) -> list[Any]:
    document = httpx.get(url + "/openapi.json").json()
    # valid cases name real routes, so they reach the action loop and the upstream too
    schemas = document["components"]["schemas"]
    for name in ("ChatCompletionRequest", "ResponsesResponsesRequest", "MessagesMessagesRequest"):
        schemas[name]["properties"]["model"] = {"type": "string", "enum": ["gpt-4o-mini", "plain-tools"]}
    return [result.ok() for result in schemathesis.openapi.from_dict(document).get_all_operations()]


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_input_gives_a_server_error(
    fuzzed_proxy: UvicornThread, upstream: ScriptedUpstream, mode: str, schema_only_cases: None
) -> None:
    upstream.plan(*[Reply(json=canned_completion("scripted", "All done."))] * 1000)
    ops = operations(fuzzed_proxy.url)
    assert {op.label for op in ops} >= {
        "POST /v1/chat/completions",
        "POST /v1/responses",
        "GET /v1/responses/{response_id}",
        "POST /v1/messages",
        "POST /v1/messages/count_tokens",
        "GET /v1/models",
        "GET /metrics",
    }
    statuses: dict[str, set[int]] = {}
    for op in ops:
        strategy = op.as_strategy(generation_mode=schemathesis.GenerationMode(mode))

        @given(case=strategy)
        @settings(
            max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
        )
        def exercise(case: Any) -> None:
            response = case.call_and_validate(
                base_url=fuzzed_proxy.url,
                checks=[no_server_error],
                additional_checks=[openai_error_body],
                timeout=30,
            )
            statuses.setdefault(case.operation.label, set()).add(response.status_code)

        try:
            exercise()
        except Unsatisfiable:  # nothing invalid can be sent to an operation without inputs
            assert mode == "negative" and not op.body and not op.query, op.label
    for label in ("POST /v1/chat/completions", "POST /v1/responses", "POST /v1/messages"):
        assert label in statuses, statuses
    if mode == "positive":  # valid requests got answers, not only refusals
        for label in ("POST /v1/chat/completions", "POST /v1/responses", "POST /v1/messages"):
            assert 200 in statuses[label], statuses
    assert all(code < 500 or code == 502 for codes in statuses.values() for code in codes), statuses
    assert httpx.get(fuzzed_proxy.url + "/health").status_code == 200

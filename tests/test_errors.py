"""The error tree: every error renders the OpenAI body with its status."""

from __future__ import annotations

import pytest

from proxy import errors
from proxy.backends.base import error_from_upstream


@pytest.mark.parametrize(
    ("error", "status", "type_", "code"),
    [
        pytest.param(
            errors.InvalidRequest("x", param="messages"), 400, "invalid_request_error", None, id="invalid"
        ),
        pytest.param(
            errors.AuthenticationFailed("x"), 401, "authentication_error", "invalid_api_key", id="401"
        ),
        pytest.param(errors.PermissionDenied("x"), 403, "permission_error", "model_not_allowed", id="403"),
        pytest.param(errors.ModelNotFound("x"), 404, "invalid_request_error", "model_not_found", id="404"),
        pytest.param(
            errors.RequestTooLarge("x"), 413, "invalid_request_error", "request_too_large", id="413"
        ),
        pytest.param(
            errors.UpstreamRateLimited("x"), 429, "rate_limit_error", "rate_limit_exceeded", id="429"
        ),
        pytest.param(errors.UpstreamError("x"), 502, "upstream_error", "upstream_error", id="502"),
        pytest.param(errors.ServiceUnavailable("x"), 503, "server_error", "service_unavailable", id="503"),
        pytest.param(errors.UpstreamTimeout("x"), 504, "upstream_error", "upstream_timeout", id="504"),
        pytest.param(
            errors.UpstreamRejected("x", status=422, code="c", type_="t"), 422, "t", "c", id="upstream-4xx"
        ),
    ],
)
def test_error_renders(error: errors.CablectlError, status: int, type_: str, code: str | None) -> None:
    assert error.http_status == status
    body = error.to_body()
    assert body == {"error": {"message": "x", "type": type_, "param": error.param, "code": code}}


def test_every_error_is_a_cablectl_error() -> None:
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.CablectlError)


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        pytest.param(429, b'{"error":{"message":"slow"}}', errors.UpstreamRateLimited, id="429"),
        pytest.param(504, b"", errors.UpstreamTimeout, id="504"),
        pytest.param(500, b"<html>", errors.UpstreamError, id="500"),
        pytest.param(401, b"{}", errors.UpstreamError, id="401"),
        pytest.param(404, b'{"error":"nope"}', errors.UpstreamRejected, id="404"),
    ],
)
def test_upstream_status_mapping(status: int, body: bytes, expected: type[errors.CablectlError]) -> None:
    error = error_from_upstream(status, body, "m")
    assert type(error) is expected
    assert error.message

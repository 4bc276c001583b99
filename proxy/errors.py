"""The one error tree of cablectl.

Every error a request can meet is a ``CablectlError``. Each class knows its HTTP
status and its OpenAI ``type`` and ``code``; an instance may name the ``param``.
One exception handler (``proxy.app``) renders any of them as the OpenAI error
body ``{"error": {"message", "type", "param", "code"}}``.

    CablectlError                      500 server_error
    ├── ConfigError                    (startup only: a bad config.yaml or flag)
    ├── InvalidRequest                 400 invalid_request_error
    │   ├── UpstreamRejected           4xx the upstream refused the request itself
    │   ├── MethodNotAllowed           405 invalid_request_error / method_not_allowed
    │   └── NotFound                   404 invalid_request_error / not_found
    │       ├── UnknownURL             404 ... / unknown_url
    │       ├── ResponseNotFound       404 ... / response_not_found (a stored response)
    │       ├── SessionNotFound        404 ... / session_not_found (this key's)
    │       └── ArtifactNotFound       404 ... / artifact_not_found
    ├── AuthenticationFailed           401 authentication_error / invalid_api_key
    ├── AuthRateLimited                429 rate_limit_error / too_many_auth_failures (Retry-After)
    ├── PermissionDenied               403 permission_error / model_not_allowed
    ├── ModelNotFound                  404 invalid_request_error / model_not_found
    ├── RequestTooLarge                413 invalid_request_error / request_too_large
    ├── ServiceUnavailable             503 server_error / service_unavailable
    └── UpstreamError                  502 upstream_error
        ├── UpstreamTimeout            504 upstream_error / upstream_timeout
        ├── UpstreamRateLimited        429 rate_limit_error / rate_limit_exceeded
        ├── UpstreamUnavailable        502 upstream_error / upstream_unavailable
        └── ModelOutputInvalid         502 upstream_error / invalid_model_output (a call was
                                           required; the model's reply had none it could use)

Constructors only store their arguments: no I/O, no logging.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "ArtifactNotFound",
    "AuthRateLimited",
    "AuthenticationFailed",
    "CablectlError",
    "ConfigError",
    "InvalidRequest",
    "MethodNotAllowed",
    "ModelNotFound",
    "ModelOutputInvalid",
    "NotFound",
    "PermissionDenied",
    "RequestTooLarge",
    "ResponseNotFound",
    "ServiceUnavailable",
    "SessionNotFound",
    "UnknownURL",
    "UpstreamError",
    "UpstreamRateLimited",
    "UpstreamRejected",
    "UpstreamTimeout",
    "UpstreamUnavailable",
]


class CablectlError(Exception):
    """Base of every cablectl error; renders as an OpenAI error body."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = None
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self._code = code

    @property
    def error_code(self) -> str | None:
        return self._code or self.code

    @property
    def http_status(self) -> int:
        return self.status

    def to_body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.error_code,
            }
        }


class ConfigError(CablectlError):
    """The configuration cannot be used; raised at startup, never per request."""

    code = "config_error"


class InvalidRequest(CablectlError):
    status = 400
    type = "invalid_request_error"


class UpstreamRejected(InvalidRequest):
    """The upstream answered 4xx to a request the proxy forwarded as the client sent it."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        param: str | None = None,
        code: str | None = None,
        type_: str | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code)
        self._status = status
        self._type = type_

    @property
    def http_status(self) -> int:
        return self._status

    def to_body(self) -> dict[str, Any]:
        body = super().to_body()
        if self._type:
            body["error"]["type"] = self._type
        return body


class NotFound(InvalidRequest):
    status = 404
    code = "not_found"


class UnknownURL(NotFound):
    code = "unknown_url"


class ResponseNotFound(NotFound):
    """No stored response with that id for this API key (never stored, expired, deleted)."""

    code = "response_not_found"


class SessionNotFound(NotFound):
    """No session with that id for this API key (never made, expired, or another key's)."""

    code = "session_not_found"


class ArtifactNotFound(NotFound):
    code = "artifact_not_found"


class MethodNotAllowed(InvalidRequest):
    status = 405
    code = "method_not_allowed"


class AuthenticationFailed(CablectlError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class AuthRateLimited(CablectlError):
    """Too many wrong API keys from one client: it must wait before trying again."""

    status = 429
    type = "rate_limit_error"
    code = "too_many_auth_failures"
    retryable = True

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermissionDenied(CablectlError):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"


class ModelNotFound(CablectlError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class RequestTooLarge(CablectlError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class ServiceUnavailable(CablectlError):
    status = 503
    type = "server_error"
    code = "service_unavailable"
    retryable = True


class UpstreamError(CablectlError):
    status = 502
    type = "upstream_error"
    code = "upstream_error"
    retryable = True


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class UpstreamRateLimited(UpstreamError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class UpstreamUnavailable(UpstreamError):
    code = "upstream_unavailable"


class ModelOutputInvalid(UpstreamError):
    code = "invalid_model_output"
    retryable = False

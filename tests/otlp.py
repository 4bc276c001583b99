"""A real OTLP/HTTP receiver for the tracing tests: what Langfuse's SDK sends, decoded.

It listens on a free port and answers every POST with 200. Bodies sent to
``/api/public/otel/v1/traces`` (Langfuse's OTLP endpoint; gzip or not) are decoded
as ``ExportTraceServiceRequest`` protobufs into flat ``ReceivedSpan`` records.
"""

from __future__ import annotations

import gzip
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

__all__ = ["OTLPReceiver", "ReceivedSpan"]

TRACES_PATH = "/api/public/otel/v1/traces"


@dataclass
class ReceivedSpan:
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]
    start_ns: int
    children: list[ReceivedSpan] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return str(self.attributes.get("langfuse.observation.type", "span"))

    def json_attr(self, name: str) -> Any:
        """An attribute the SDK serialized: JSON for structures, the string itself for text."""
        value = self.attributes.get(f"langfuse.observation.{name}")
        try:
            return json.loads(value) if isinstance(value, str) else value
        except json.JSONDecodeError:
            return value

    def shape(self) -> tuple[Any, ...]:
        """(name, [child shapes]) in start order: the tree without ids or timings."""
        return (self.name, [c.shape() for c in sorted(self.children, key=lambda c: c.start_ns)])


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


class OTLPReceiver:
    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver._receive(self.path, dict(self.headers), body)
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _receive(self, path: str, headers: dict[str, str], body: bytes) -> None:
        with self._lock:
            self.requests.append((path, headers))
            if path != TRACES_PATH:
                return
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append(
                            ReceivedSpan(
                                name=span.name,
                                trace_id=span.trace_id.hex(),
                                span_id=span.span_id.hex(),
                                parent_id=span.parent_span_id.hex(),
                                attributes={a.key: _value(a.value) for a in span.attributes},
                                start_ns=span.start_time_unix_nano,
                            )
                        )

    def roots(self) -> list[ReceivedSpan]:
        """The received spans as trees, roots in start order (a root's parent was not received)."""
        with self._lock:
            spans = [ReceivedSpan(**{**s.__dict__, "children": []}) for s in self.spans]
        by_id = {s.span_id: s for s in spans}
        roots = []
        for span in spans:
            parent = by_id.get(span.parent_id)
            if parent is None:
                roots.append(span)
            else:
                parent.children.append(span)
        return sorted(roots, key=lambda s: s.start_ns)

    def __enter__(self) -> OTLPReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

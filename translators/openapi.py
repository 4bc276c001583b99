"""OpenAPI 3.0/3.1 -> a toolset: one function per operation, plus how to call it.

Each operation becomes an OpenAI tool (named by ``operationId``, else by method and
path) whose parameters are the operation's path, query and header parameters and
the fields of its JSON body, flattened into one keyword list. Alongside it, an
``HttpSpec`` records the method, the URL template and where every argument goes,
so the proxy can execute a call; ``build_request`` does that mapping, purely.

Referenced component schemas are copied into the tool's ``$defs`` (recursion
survives), ``nullable`` (3.0) and type lists (3.1) are kept as JSON Schema has them.
"""

from __future__ import annotations

import copy
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from translators.errors import ToolsetError
from translators.names import to_identifier

__all__ = ["ArgSpec", "HttpRequest", "HttpSpec", "Operation", "build_request", "toolset_from_openapi"]

METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")
_IGNORED_HEADERS = {"accept", "content-type", "authorization"}
_BODY_TYPES = (
    "application/json",
    "application/x-www-form-urlencoded",
    "multipart/form-data",
    "application/octet-stream",
)

Location = Literal["path", "query", "header", "cookie", "body", "body_field"]


@dataclass(frozen=True, slots=True)
class ArgSpec:
    location: Location
    name: str  # the parameter's or body field's own name


@dataclass(frozen=True, slots=True)
class HttpSpec:
    method: str
    path: str  # template, "/pet/{petId}"
    base_url: str | None
    args: dict[str, ArgSpec]
    body_media_type: str | None = None


@dataclass(frozen=True, slots=True)
class Operation:
    tool: dict[str, Any]  # {"type": "function", "function": {...}}
    http: HttpSpec

    @property
    def name(self) -> str:
        return str(self.tool["function"]["name"])


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None


class _Resolver:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec

    def node(self, ref: str) -> Any:
        if not ref.startswith("#/"):
            raise ToolsetError(f"OpenAPI $ref {ref!r} is not supported: only references inside the spec are")
        node: Any = self.spec
        for part in ref[2:].split("/"):
            part = urllib.parse.unquote(part).replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                raise ToolsetError(f"OpenAPI $ref {ref!r} points at nothing")
            node = node[part]
        return node

    def deref(self, obj: Any) -> Any:
        seen = set()
        while isinstance(obj, dict) and "$ref" in obj:
            if obj["$ref"] in seen:
                raise ToolsetError(f"OpenAPI $ref {obj['$ref']!r} refers to itself")
            seen.add(obj["$ref"])
            obj = self.node(obj["$ref"])
        return obj

    def schema_with_defs(self, schema: Any, defs: dict[str, Any]) -> Any:
        """``schema`` with every $ref rewritten to ``#/$defs/<name>``, its targets copied into ``defs``."""

        def walk(node: Any) -> Any:
            if isinstance(node, dict):
                if isinstance(node.get("$ref"), str):
                    ref = node["$ref"]
                    name = re.sub(r"[^A-Za-z0-9_.-]", "_", ref.rsplit("/", 1)[-1])
                    if name not in defs:
                        defs[name] = {}
                        defs[name] = walk(copy.deepcopy(self.node(ref)))
                    rest = {k: walk(v) for k, v in node.items() if k != "$ref"}
                    return {"$ref": f"#/$defs/{name}", **rest} if rest else {"$ref": f"#/$defs/{name}"}
                return {k: walk(v) for k, v in node.items()}
            if isinstance(node, list):
                return [walk(v) for v in node]
            return node

        return walk(schema)


def _operation_name(method: str, path: str, op: dict[str, Any]) -> str:
    if isinstance(op.get("operationId"), str) and op["operationId"].strip():
        return str(op["operationId"]).strip()
    slug = re.sub(r"[{}]", "", path).strip("/").replace("/", "_") or "root"
    return to_identifier(f"{method}_{slug}")


def _description(op: dict[str, Any]) -> str:
    summary = str(op.get("summary") or "").strip()
    detail = str(op.get("description") or "").strip()
    if summary and detail and detail != summary:
        return f"{summary} {detail}" if len(summary) + len(detail) < 300 else summary
    return summary or detail


def _server_url(spec: dict[str, Any]) -> str | None:
    servers = spec.get("servers")
    if isinstance(servers, list) and servers and isinstance(servers[0], dict):
        url = servers[0].get("url")
        if isinstance(url, str):
            for var, meta in (servers[0].get("variables") or {}).items():
                url = url.replace("{" + var + "}", str((meta or {}).get("default", "")))
            return url
    return None


def _operation(
    resolver: _Resolver,
    spec: dict[str, Any],
    path: str,
    method: str,
    path_item: dict[str, Any],
    op: dict[str, Any],
) -> Operation:
    defs: dict[str, Any] = {}
    properties: dict[str, Any] = {}
    required: list[str] = []
    args: dict[str, ArgSpec] = {}
    params: dict[tuple[str, str], dict[str, Any]] = {}
    for raw in [*(path_item.get("parameters") or []), *(op.get("parameters") or [])]:
        param = resolver.deref(raw)
        if isinstance(param, dict) and isinstance(param.get("name"), str) and param.get("in"):
            params[(param["in"], param["name"])] = param  # operation-level wins
    for (location, name), param in params.items():
        if location == "header" and name.lower() in _IGNORED_HEADERS:
            continue
        if location not in ("path", "query", "header", "cookie"):
            continue
        schema = param.get("schema")
        if schema is None and isinstance(param.get("content"), dict):
            media: dict[str, Any] = next(iter(param["content"].values()), {}) or {}
            schema = media.get("schema")
        schema = resolver.schema_with_defs(schema or {"type": "string"}, defs)
        if param.get("description") and isinstance(schema, dict) and "description" not in schema:
            schema = {**schema, "description": str(param["description"])}
        key = name if name not in properties else f"{location}_{name}"
        properties[key] = schema
        args[key] = ArgSpec(location, name)  # type: ignore[arg-type]
        if location == "path" or param.get("required"):
            required.append(key)
    media_type = None
    body = resolver.deref(op.get("requestBody")) if op.get("requestBody") else None
    if isinstance(body, dict) and isinstance(body.get("content"), dict):
        content = body["content"]
        media_type = next((m for m in _BODY_TYPES if m in content), None)
        if media_type is None:
            media_type = next(iter(content))
        schema = resolver.deref((content.get(media_type) or {}).get("schema") or {})
        flat = _object_fields(resolver, schema)
        body_required = bool(body.get("required"))
        if flat is not None and media_type != "application/octet-stream":
            fields, field_required = flat
            for name, sub in fields.items():
                key = name if name not in properties else f"body_{name}"
                properties[key] = resolver.schema_with_defs(sub, defs)
                args[key] = ArgSpec("body_field", name)
                if body_required and name in field_required:
                    required.append(key)
        else:
            key = "body" if "body" not in properties else "request_body"
            raw_schema = (content.get(media_type) or {}).get("schema") or {}
            if media_type == "application/octet-stream":
                raw_schema = {"type": "string", "description": "the request body, as text"}
            properties[key] = resolver.schema_with_defs(raw_schema, defs)
            args[key] = ArgSpec("body", key)
            if body_required:
                required.append(key)
    parameters: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    if defs:
        parameters["$defs"] = defs
    function: dict[str, Any] = {"name": _operation_name(method, path, op), "parameters": parameters}
    description = _description(op)
    if description:
        function["description"] = description
    return Operation(
        tool={"type": "function", "function": function},
        http=HttpSpec(method.upper(), path, _server_url(spec), args, media_type),
    )


def _object_fields(resolver: _Resolver, schema: Any) -> tuple[dict[str, Any], set[str]] | None:
    """The fields of an object body (allOf merged), or None when the body is not an object."""
    schema = resolver.deref(schema)
    if not isinstance(schema, dict):
        return None
    fields: dict[str, Any] = {}
    required: set[str] = set()
    parts = [schema, *[resolver.deref(p) for p in schema.get("allOf") or []]]
    for part in parts:
        if not isinstance(part, dict):
            continue
        if isinstance(part.get("properties"), dict):
            fields.update(part["properties"])
            required |= set(part.get("required") or [])
    is_object = schema.get("type") in ("object", None) and bool(fields)
    return (fields, required) if is_object else None


def toolset_from_openapi(spec: Any) -> list[Operation]:
    """Every operation of an OpenAPI 3.0/3.1 document (a parsed dict) as an ``Operation``."""
    if not isinstance(spec, dict) or not str(spec.get("openapi", "")).startswith("3."):
        raise ToolsetError("not an OpenAPI 3.x document (its 'openapi' field must start with 3.)")
    resolver = _Resolver(spec)
    out: list[Operation] = []
    names: set[str] = set()
    for path, raw_item in (spec.get("paths") or {}).items():
        path_item = resolver.deref(raw_item)
        if not isinstance(path_item, dict):
            continue
        for method in METHODS:
            op = path_item.get(method)
            if not isinstance(op, dict):
                continue
            operation = _operation(resolver, spec, str(path), method, path_item, op)
            name, n = operation.name, 2
            while name in names:
                name, n = f"{operation.name}_{n}", n + 1
            if name != operation.name:
                operation.tool["function"]["name"] = name
            names.add(name)
            out.append(operation)
    return out


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return orjson.dumps(value).decode()
    return str(value)


def build_request(http: HttpSpec, arguments: dict[str, Any], base_url: str | None = None) -> HttpRequest:
    """The HTTP request for one call of an operation (arguments under the tool's names)."""
    base = (base_url or http.base_url or "").rstrip("/")
    path = http.path
    query: list[tuple[str, str]] = []
    headers: dict[str, str] = {}
    cookies: list[str] = []
    fields: dict[str, Any] = {}
    raw_body: Any = None
    for key, value in arguments.items():
        spec = http.args.get(key)
        if spec is None:
            raise ToolsetError(f"{key!r} is not an argument of {http.method} {http.path}")
        if value is None and spec.location not in ("body", "body_field"):
            continue  # an absent parameter; in a JSON body, None is an explicit null
        if spec.location == "path":
            path = path.replace("{" + spec.name + "}", urllib.parse.quote(_scalar(value), safe=""))
        elif spec.location == "query":
            values = value if isinstance(value, list) else [value]
            query += [(spec.name, _scalar(v)) for v in values]
        elif spec.location == "header":
            headers[spec.name] = _scalar(value)
        elif spec.location == "cookie":
            cookies.append(f"{spec.name}={urllib.parse.quote(_scalar(value))}")
        elif spec.location == "body_field":
            fields[spec.name] = value
        else:
            raw_body = value
    if "{" in path:
        missing = re.findall(r"{([^}]+)}", path)
        raise ToolsetError(f"{http.method} {http.path} needs path parameter(s) {', '.join(missing)}")
    if cookies:
        headers["cookie"] = "; ".join(cookies)
    url = base + path + (("?" + urllib.parse.urlencode(query)) if query else "")
    body: bytes | None = None
    payload = fields if fields else raw_body
    if payload is not None or (
        fields == {} and http.body_media_type and http.method in ("POST", "PUT", "PATCH")
    ):
        media = http.body_media_type or "application/json"
        if payload is None:
            payload = {}
        if media == "application/x-www-form-urlencoded" and isinstance(payload, dict):
            body = urllib.parse.urlencode({k: _scalar(v) for k, v in payload.items()}).encode()
        elif media == "application/octet-stream":
            body = payload.encode() if isinstance(payload, str) else orjson.dumps(payload)
        else:
            media = "application/json" if media in ("multipart/form-data",) or "json" not in media else media
            body = orjson.dumps(payload)
        headers["content-type"] = media
    return HttpRequest(http.method, url, headers, body)

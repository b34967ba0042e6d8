"""The OpenAPI 3.1 document of the admin API, generated from the routes and their
msgspec types (``msgspec.json.schema_components``), and a reference page rendering it.
"""

from __future__ import annotations

import html
import re
from typing import Any

import msgspec

from .core import ApiService, Route
from .schema import Problem

__all__ = ["openapi_document", "reference_page"]

_REF = "#/components/schemas/{name}"
_PARAM = re.compile(r"\{([^}]+)\}")


def openapi_document(service: ApiService) -> dict[str, Any]:
    """The OpenAPI document of every route of ``service``."""
    routes = service.routes
    types: list[Any] = [Problem]
    for route in routes:
        for t in (route.response, route.body):
            if t is not None and t not in types:
                types.append(t)
    schemas, components = msgspec.json.schema_components(types, ref_template=_REF)
    refs = dict(zip(types, schemas, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, refs)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tailledger admin API",
            "version": service.version,
            "description": (
                "/api/v1 follows Headscale's REST API, /api/v2 a subset of Tailscale's API "
                "(the tailnet is always '-'). Every change is an event of the log, with the "
                "credential as its actor. Errors are RFC 7807 problem documents."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "an API key or an OAuth access token"},
                "basic": {"type": "http", "scheme": "basic", "description": "an API key as the user name"},
            },
        },
    }


def _operation(route: Route, refs: dict[Any, Any]) -> dict[str, Any]:
    problem = {"application/problem+json": {"schema": refs[Problem]}}
    op: dict[str, Any] = {
        "operationId": route.operation_id,
        "summary": route.summary,
        "tags": list(route.tags) or [route.api],
        "parameters": [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in _PARAM.findall(route.path)
        ]
        + [{"name": name, "in": "query", "required": False, "schema": {"type": "string"}} for name in route.query],
        "responses": {"default": {"description": "an error (RFC 7807)", "content": problem}},
    }
    if route.auth:
        op["security"] = [{"bearer": []}, {"basic": []}]
        op["responses"]["401"] = {"description": "no valid credential", "content": problem}
        op["responses"]["403"] = {"description": "not permitted for this credential", "content": problem}
    if route.scope is not None:
        op["x-required-scope"] = route.scope
        op["description"] = f"OAuth scope: {route.scope}."
    if route.body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": refs[route.body]}}}
    ok: dict[str, Any] = {"description": "success"}
    if route.response is not None:
        ok["content"] = {route.content_type: {"schema": refs[route.response]}}
    elif route.content_type == "application/hujson":
        # The policy file: its text as written, or as JSON with Accept: application/json.
        ok["content"] = {"application/hujson": {"schema": {"type": "string"}},
                         "application/json": {"schema": {"type": "object"}}}
    elif route.content_type != "application/json":
        ok["content"] = {route.content_type: {"schema": {"type": "string"}}}
    op["responses"][str(route.status)] = ok
    return op


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>tailledger admin API</title>
<style>body{{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em}}
code,pre{{background:#f4f4f4;padding:.1em .3em;border-radius:.2em}}
.m{{display:inline-block;width:4.5em;font-weight:bold}} h3{{margin-bottom:.2em}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ddd;padding:.2em .5em;text-align:left}}</style>
</head><body><h1>tailledger admin API <small>{version}</small></h1>
<p>{description}</p><p>The machine-readable document: <a href="/api/v1/openapi.json">/api/v1/openapi.json</a>.</p>
{operations}
<h2>Schemas</h2>{schemas}</body></html>
"""


def reference_page(document: dict[str, Any]) -> str:
    """A plain HTML rendering of ``document`` (no scripts)."""
    e = html.escape
    ops: list[str] = []
    for path, methods in sorted(document["paths"].items()):
        for method, op in methods.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            ok: dict[str, Any] = next((r for s, r in op["responses"].items() if s.startswith("2")), {})
            content: dict[str, Any] = ok.get("content", {})
            first: dict[str, Any] = next(iter(content.values()), {})
            schema: dict[str, Any] = first.get("schema", {})
            params = ", ".join(f"{p['name']} ({p['in']})" for p in op["parameters"])
            ops.append(
                f"<h3><span class=m>{e(method.upper())}</span><code>{e(path)}</code></h3>"
                f"<p>{e(op['summary'])}. {e(op.get('description', ''))}</p>"
                + (f"<p>Parameters: {e(params)}</p>" if params else "")
                + (f"<p>Body: {_ref(body)}</p>" if body else "")
                + (f"<p>Returns: {_ref(schema)}</p>" if schema else "")
            )
    schemas: list[str] = []
    for name, schema in sorted(document["components"]["schemas"].items()):
        rows = "".join(
            f"<tr><td><code>{e(field)}</code></td><td>{_ref(spec)}</td></tr>"
            for field, spec in schema.get("properties", {}).items()
        )
        schemas.append(f"<h3 id='{e(name)}'>{e(name)}</h3><table>{rows}</table>")
    info = document["info"]
    return _PAGE.format(
        version=e(info["version"]), description=e(info["description"]),
        operations="".join(ops), schemas="".join(schemas),
    )


def _ref(schema: dict[str, Any]) -> str:
    e = html.escape
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"<a href='#{e(name)}'>{e(name)}</a>"
    if "anyOf" in schema:
        return " | ".join(_ref(s) for s in schema["anyOf"])
    if schema.get("type") == "array":
        return f"array of {_ref(schema.get('items', {}))}"
    return e(str(schema.get("type", schema.get("format", "any"))))

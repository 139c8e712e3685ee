#!/usr/bin/env python3
"""Writes the Postman collection of adtrack from the service's OpenAPI document.

    python3 _test/postman/generate.py --url http://127.0.0.1:8080          # a running service
    python3 _test/postman/generate.py --spec openapi.json --out other.json  # a saved document

Every operation of the document gets a request (path and query parameters filled from the
schema) whose test script checks the status against the documented ones and the JSON body
against the documented schema. `POST /v1/events` gets hand-written examples instead: one
event, a batch, NDJSON, gzip-free re-send of the same event, `?wait=true`, an invalid event
(422), malformed JSON (400) and a wrong content type (415). A few routes outside the document
(`/openapi.json`, `/docs`) are added too.

Collection variables: `baseUrl` (default http://127.0.0.1:8080); `apiKey`, a key of one tenant
with every scope (ingest, read, admin), sent as `Authorization: Bearer {{apiKey}}` by
collection-level auth; `adminKey`, the bootstrap admin key (`ADTRACK_ADMIN_KEY`), sent only by
the requests that need it (creating a tenant); `tenantId`, the tenant of `apiKey`. Operations
the document marks as public (`security: []`) send no key. An "Auth" folder shows the 401 and
403 answers.

The output is deterministic (no generated ids or dates): the same document gives the same file,
so a test can regenerate it and compare with the committed one. Standard library only.
"""

import argparse
import copy
import json
import sys
import urllib.request

DEFAULT_BASE_URL = "http://127.0.0.1:8080"
OUT = "adtrack.postman_collection.json"
SCHEMA_URL = "https://schema.getpostman.com/json/collection/v2.1.0/collection.json"

# Values for the example event, by field; fields the document does not have are left out.
EXAMPLE_EVENT = {
    "event_id": "{{eventId}}",
    "event_type": "click",
    "timestamp": "{{$isoTimestamp}}",
    "sent_at": "{{$isoTimestamp}}",
    "campaign_id": "spring-sale",
    "ad_id": "spring-sale-ad-7",
    "publisher_id": "news.example.com",
    "advertiser_id": "acme",
    "user_id": "u-0012345",
    "country": "US",
    "device": "mobile",
    "os": "iOS",
    "browser": "Safari",
    "cost_micros": 250000,
    "attributes": {"placement": "banner_300x250"},
}

# Values for parameters and body fields of generic requests, by name, when the document gives
# no example: a time range over the last hour (set before every request, see `build`), the
# event sent by the examples, a dimension every breakdown has.
NAMED_EXAMPLES = {
    "from": "{{from}}",
    "to": "{{to}}",
    "event_id": "{{eventId}}",
    "group_by": "country",
    "time_zone": "UTC",
    # Not the example event's user: deleting it must not remove what later requests read.
    "user_id": "u-forget-me",
    "key_id": "{{newKeyId}}",
}

ADMIN_AUTH = {"type": "bearer", "bearer": [{"key": "token", "value": "{{adminKey}}", "type": "string"}]}

# Operations whose request body is written here rather than derived from the schema: each
# must succeed when the collection runs top to bottom.
BODIES = {
    ("post", "/v1/admin/tenants"): {"tenant_id": "postman-{{$timestamp}}-{{$randomInt}}",
                                    "name": "Created by the Postman collection"},
    ("post", "/v1/admin/keys"): {"tenant_id": "{{tenantId}}", "name": "postman",
                                 "scopes": ["read"], "rate_limit": {"requests_per_sec": 100}},
}
# Requests sent with the bootstrap admin key instead of `apiKey`.
OPERATOR_ONLY = {("post", "/v1/admin/tenants")}
# Extra test lines, e.g. keeping a value for a later request.
EXTRA_TESTS = {
    ("post", "/v1/admin/keys"): [
        "pm.test('the key is shown once, with its id', function () {",
        "    var body = pm.response.json();",
        "    pm.expect(body.key.indexOf(body.key_id)).to.eql(0);",
        "    pm.collectionVariables.set('newKeyId', body.key_id);",
        "});",
    ],
}

# JavaScript that checks a value against a (dereferenced) OpenAPI schema: types, required
# properties, enums, arrays, one-of/any-of. Enough to catch a changed body shape.
SHAPE_JS = r"""
function shapeErrors(v, s, path, errs, optional) {
    if (!s) { return errs; }
    if (v === null) {
        // Optional fields and map values may be null (an absent value), as may `nullable` ones.
        if (!s.nullable && !optional) { errs.push(path + ': is null'); }
        return errs;
    }
    var alts = s.oneOf || s.anyOf;
    if (alts) {
        var ok = alts.some(function (a) { return shapeErrors(v, a, path, []).length === 0; });
        if (!ok) { errs.push(path + ': matches none of the alternatives'); }
        return errs;
    }
    (s.allOf || []).forEach(function (a) { shapeErrors(v, a, path, errs); });
    var t = s.type || (s.properties ? 'object' : undefined);
    if (t === 'object') {
        if (typeof v !== 'object' || Array.isArray(v)) { errs.push(path + ': not an object'); return errs; }
        (s.required || []).forEach(function (k) { if (!(k in v)) { errs.push(path + '.' + k + ': missing'); } });
        var required = s.required || [];
        Object.keys(s.properties || {}).forEach(function (k) {
            if (k in v) { shapeErrors(v[k], s.properties[k], path + '.' + k, errs, required.indexOf(k) < 0); }
        });
        if (s.additionalProperties && typeof s.additionalProperties === 'object') {
            Object.keys(v).forEach(function (k) {
                if (!(s.properties || {})[k]) { shapeErrors(v[k], s.additionalProperties, path + '.' + k, errs, true); }
            });
        }
    } else if (t === 'array') {
        if (!Array.isArray(v)) { errs.push(path + ': not an array'); return errs; }
        v.forEach(function (x, i) { shapeErrors(x, s.items, path + '[' + i + ']', errs); });
    } else if (t === 'integer') {
        if (!Number.isInteger(v)) { errs.push(path + ': not an integer'); }
    } else if (t === 'number') {
        if (typeof v !== 'number') { errs.push(path + ': not a number'); }
    } else if (t === 'boolean') {
        if (typeof v !== 'boolean') { errs.push(path + ': not a boolean'); }
    } else if (t === 'string') {
        if (typeof v !== 'string') { errs.push(path + ': not a string'); }
        else if (s.enum && s.enum.indexOf(v) < 0) { errs.push(path + ': ' + v + ' is not one of ' + s.enum.join(', ')); }
    }
    return errs;
}
""".strip("\n")

# Keys of a schema that say something about shape; descriptions and examples are dropped so
# that rewording the API docs does not make the committed collection stale.
SHAPE_KEYS = {
    "type", "properties", "required", "items", "enum", "nullable", "oneOf", "anyOf", "allOf",
    "additionalProperties",
}


def deref(schema, spec, seen=()):
    """The schema with `$ref`s replaced by what they point to, shape keys only."""
    if isinstance(schema, list):
        return [deref(s, spec, seen) for s in schema]
    if not isinstance(schema, dict):
        return schema
    ref = schema.get("$ref")
    if ref:
        if ref in seen:  # a recursive type: stop checking below this point
            return {}
        target = spec
        for part in ref.lstrip("#/").split("/"):
            target = target[part]
        return deref(target, spec, seen + (ref,))
    out = {}
    for key, value in schema.items():
        if key not in SHAPE_KEYS:
            continue
        if key == "properties":
            out[key] = {k: deref(v, spec, seen) for k, v in value.items()}
        elif key == "required" or key == "enum" or key == "type" or key == "nullable":
            out[key] = value
        elif key == "additionalProperties" and isinstance(value, bool):
            out[key] = value
        else:
            out[key] = deref(value, spec, seen)
    return out


def resolve(schema, spec):
    """The schema a `$ref` points to (all keys kept)."""
    while isinstance(schema, dict) and "$ref" in schema:
        target = spec
        for part in schema["$ref"].lstrip("#/").split("/"):
            target = target[part]
        schema = target
    return schema


def example_of(schema, spec, name=""):
    """A plausible value for a schema (for generic requests)."""
    schema = resolve(schema, spec)
    named = NAMED_EXAMPLES.get(name)
    if "example" not in schema and named is not None and schema.get("type") in ("string", None):
        return named
    if "example" in schema:
        return schema["example"]
    if "default" in schema:
        return schema["default"]
    if schema.get("enum"):
        return schema["enum"][0]
    t = schema.get("type")
    fmt = schema.get("format", "")
    if t == "string":
        if fmt == "date-time":
            return "{{$isoTimestamp}}"
        if fmt == "uuid":
            return "{{eventId}}" if name == "event_id" else "{{$guid}}"
        if fmt == "date":
            return "2026-01-01"
        return "example"
    if t == "integer":
        return max(1, schema.get("minimum", 1))
    if t == "number":
        return 1.0
    if t == "boolean":
        return False
    if t == "array":
        return [example_of(schema.get("items", {}), spec)]
    if t == "object" or "properties" in schema:
        req = set(schema.get("required", []))
        return {
            k: example_of(v, spec, k)
            for k, v in schema.get("properties", {}).items()
            if k in req
        }
    if schema.get("allOf"):
        return example_of(schema["allOf"][0], spec, name)
    return None


def script(listen, lines):
    return {"listen": listen, "script": {"type": "text/javascript", "exec": lines}}


def url(path, query=()):
    query = list(query)
    raw = "{{baseUrl}}" + path
    if query:
        raw += "?" + "&".join(f"{k}={v}" for k, v in query)
    out = {"raw": raw, "host": ["{{baseUrl}}"], "path": [p for p in path.split("/") if p]}
    if query:
        out["query"] = [{"key": k, "value": v} for k, v in query]
    return out


def json_schema_of(response, spec):
    """The dereferenced schema of a documented JSON or NDJSON response, and whether it is
    NDJSON (the schema is then that of every line)."""
    for media, content in (response or {}).get("content", {}).items():
        kind = media.split(";")[0].strip()
        if "schema" not in content:
            continue
        if kind == "application/json" or kind.endswith("+json"):
            return deref(content["schema"], spec), False
        if kind == "application/x-ndjson":
            return deref(content["schema"], spec), True
    return None, False


def is_text(response):
    return any(m.startswith("text/") for m in (response or {}).get("content", {}))


def tests_for(status, response, spec, extra=()):
    """Test-script lines: the status, then the body against the documented schema."""
    lines = [f"pm.test('status is {status}', function () {{ pm.response.to.have.status({status}); }});"]
    schema, ndjson = json_schema_of(response, spec)
    if schema is not None:
        lines += SHAPE_JS.split("\n")
        lines.append(f"var schema = {json.dumps(schema, sort_keys=True)};")
        if ndjson:
            lines += [
                "pm.test('every line has the documented shape', function () {",
                "    var errs = [];",
                "    pm.response.text().split('\\n').forEach(function (line, i) {",
                "        if (line.trim()) { shapeErrors(JSON.parse(line), schema, 'line ' + (i + 1), errs); }",
                "    });",
                "    pm.expect(errs.slice(0, 10), errs.slice(0, 10).join('; ')).to.be.empty;",
                "});",
            ]
        else:
            lines += [
                "pm.test('body has the documented shape', function () {",
                "    var errs = shapeErrors(pm.response.json(), schema, 'body', []);",
                "    pm.expect(errs.slice(0, 10), errs.slice(0, 10).join('; ')).to.be.empty;",
                "});",
            ]
    elif is_text(response):
        lines += [
            "pm.test('body is text', function () {",
            "    pm.expect(pm.response.headers.get('Content-Type')).to.include('text/');",
            "});",
        ]
    return lines + list(extra)


def documented(op, status):
    return op.get("responses", {}).get(str(status))


def example_event(spec, **overrides):
    schema = spec["components"]["schemas"].get("Event", {})
    props = schema.get("properties", {})
    event = {k: v for k, v in EXAMPLE_EVENT.items() if k in props}
    for k in schema.get("required", []):
        if k not in event:
            event[k] = example_of(props[k], spec, k)
    event.update(overrides)
    return event


def raw_json(value):
    return json.dumps(value, indent=2)


def request(name, method, path, description, tests, query=(), headers=(), body=None,
            language="json", prerequest=None, public=False, auth=None):
    req = {
        "method": method,
        "header": [{"key": k, "value": v} for k, v in headers],
        "url": url(path, query),
        "description": description,
    }
    if body is not None:
        req["body"] = {"mode": "raw", "raw": body, "options": {"raw": {"language": language}}}
    if public:
        req["auth"] = {"type": "noauth"}
    elif auth is not None:
        req["auth"] = auth
    events = []
    if prerequest:
        events.append(script("prerequest", prerequest))
    events.append(script("test", tests))
    return {"name": name, "event": events, "request": req}


NEW_EVENT_ID = ["pm.collectionVariables.set('eventId', pm.variables.replaceIn('{{$guid}}'));"]


def events_examples(op, spec, public):
    """Hand-written examples of `POST /v1/events`, each checked to be documented."""
    path = "/v1/events"
    ct_json = [("Content-Type", "application/json")]
    ct_ndjson = [("Content-Type", "application/x-ndjson")]

    def ingest(name, status, description, accepted=None, **kw):
        response = documented(op, status)
        if response is None:
            sys.exit(f"generate.py: POST {path} no longer documents {status} (example {name!r})")
        extra = []
        if accepted is not None:
            extra = [
                f"pm.test('{accepted} accepted', function () {{",
                f"    pm.expect(pm.response.json().accepted).to.eql({accepted});",
                "});",
            ]
        extra += kw.pop("extra", [])
        return request(name, "POST", path, description, tests_for(status, response, spec, extra),
                       public=public, **kw)

    one = example_event(spec)
    batch = [
        example_event(spec, event_id="{{$guid}}", event_type="impression", cost_micros=1500),
        example_event(spec, event_id="{{$guid}}", event_type="click", cost_micros=0),
        example_event(spec, event_id="{{$guid}}", event_type="conversion", cost_micros=0,
                      revenue_micros=49990000),
    ]
    batch = [{k: v for k, v in e.items() if k != "cost_micros" or v} for e in batch]
    ndjson = "\n".join(
        json.dumps(example_event(spec, event_id="{{$guid}}", event_type=t)) for t in
        ("impression", "impression", "click")
    ) + "\n"
    invalid = example_event(spec, event_id="{{$guid}}", campaign_id="spring sale", country="usa")
    return [
        ingest("One event", 202, "One event as a JSON object: 202 once it is durable on the "
               "service's disk.", accepted=1, headers=ct_json,
               body=raw_json(example_event(spec, event_id="{{$guid}}"))),
        ingest("One event, wait for ClickHouse", 200, "`?wait=true`: 200 once the event is "
               "committed in ClickHouse. Its id is kept in `eventId` for later requests.",
               accepted=1, query=[("wait", "true")], headers=ct_json, body=raw_json(one),
               prerequest=NEW_EVENT_ID),
        ingest("Re-send the same event (idempotent)", 202, "The same `event_id` again: accepted, "
               "and still stored once.", accepted=1, headers=ct_json, body=raw_json(one)),
        ingest("Batch (JSON array)", 202, "An impression, a click and a conversion in one "
               "request.", accepted=3, headers=ct_json, body=raw_json(batch)),
        ingest("Batch (NDJSON)", 202, "One event per line, `application/x-ndjson`.", accepted=3,
               headers=ct_ndjson, body=ndjson, language="text"),
        ingest("Invalid event (422)", 422, "No valid event: a space in `campaign_id`, a country "
               "that is not ISO 3166-1 alpha-2. Each problem is named.", accepted=0,
               headers=ct_json, body=raw_json(invalid), extra=[
                   "pm.test('every problem is named', function () {",
                   "    var fields = pm.response.json().rejected[0].errors.map(function (e) { return e.field; });",
                   "    pm.expect(fields).to.include.members(['campaign_id', 'country']);",
                   "});",
               ]),
        ingest("Malformed JSON (400)", 400, "Broken JSON: the answer says where.",
               headers=ct_json, body='[{"event_id": "6f1c1f0e-8a53-4c1e-9d2a-5b7e8f9a0b1c",\n',
               extra=[
                   "pm.test('error is malformed_json with a position', function () {",
                   "    var body = pm.response.json();",
                   "    pm.expect(body.error).to.eql('malformed_json');",
                   "    pm.expect(body.line).to.be.a('number');",
                   "    pm.expect(body.column).to.be.a('number');",
                   "});",
               ]),
        ingest("Wrong content type (415)", 415, "Only JSON and NDJSON are taken.",
               headers=[("Content-Type", "text/plain")], body="hello", language="text"),
    ]


def query_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def generic(method, path, op, spec, public):
    """A request for an operation without hand-written examples: parameters from the schema,
    the lowest documented 2xx expected."""
    template = path
    statuses = sorted(int(s) for s in op.get("responses", {}) if s.isdigit())
    ok = [s for s in statuses if 200 <= s < 300]
    # Creating answers 201 where the operation documents it.
    if method == "post" and 201 in ok:
        ok = [201]
    status = ok[0] if ok else statuses[0]
    params = op.get("parameters", [])
    for p in params:
        if p.get("in") == "path":
            value = p.get("example", example_of(p.get("schema", {}), spec, p["name"]))
            path = path.replace("{" + p["name"] + "}", str(value))
    query = [
        (p["name"], query_value(p.get("example", example_of(p.get("schema", {}), spec, p["name"]))))
        for p in params if p.get("in") == "query" and p.get("required")
    ]
    headers, body = [], None
    content = op.get("requestBody", {}).get("content", {})
    key = (method, template)
    json_type = next((ct for ct in sorted(content) if ct.startswith("application/json")), None)
    if json_type:
        headers = [("Content-Type", "application/json")]
        example = BODIES.get(key) or example_of(content[json_type].get("schema", {}), spec)
        body = raw_json(example)
    description = (op.get("summary", "") + "\n\n" + op.get("description", "")).strip()
    tests = tests_for(status, documented(op, status), spec, EXTRA_TESTS.get(key, ()))
    return request(op.get("summary") or f"{method.upper()} {path}", method.upper(), path,
                   description, tests, query=query, headers=headers, body=body, public=public,
                   auth=ADMIN_AUTH if key in OPERATOR_ONLY else None)


def auth_examples():
    """What a caller without the right key sees."""
    def refused(name, status, error, description, auth):
        return request(name, "GET", "/v1/events", description, [
            f"pm.test('status is {status}', function () {{ pm.response.to.have.status({status}); }});",
            f"pm.test('error is {error}', function () {{",
            f"    pm.expect(pm.response.json().error).to.eql('{error}');",
            "});",
        ], query=[("limit", "1")], auth=auth)
    return [
        refused("No key (401)", 401, "missing_api_key", "Every `/v1` request needs "
                "`Authorization: Bearer <key>`.", {"type": "noauth"}),
        refused("Unknown key (401)", 401, "invalid_api_key", "Unknown, malformed and revoked "
                "keys get the same answer.", {"type": "bearer", "bearer": [
                    {"key": "token", "value": "adt_000000000000_not-a-key", "type": "string"}]}),
        refused("Bootstrap admin key reading events (403)", 403, "insufficient_scope",
                "The bootstrap admin key manages tenants and keys; it reads no event data.",
                ADMIN_AUTH),
    ]


def extras():
    """Routes that are not operations of the document."""
    return [
        request("OpenAPI document", "GET", "/openapi.json", "The OpenAPI 3 document this "
                "collection is generated from.", [
                    "pm.test('status is 200', function () { pm.response.to.have.status(200); });",
                    "pm.test('an OpenAPI 3 document with the ingest route', function () {",
                    "    var doc = pm.response.json();",
                    "    pm.expect(doc.openapi).to.match(/^3\\./);",
                    "    pm.expect(doc.paths).to.have.property('/v1/events');",
                    "});",
                ], public=True),
        request("Browser preflight (CORS)", "OPTIONS", "/v1/events", "What a browser asks "
                "before a page on another origin posts events (no key). Allowed origins: "
                "`ADTRACK_CORS_ORIGINS`; this check expects the default, any origin (`*`).", [
                    "pm.test('status is 204', function () { pm.response.to.have.status(204); });",
                    "pm.test('the page may post with its key', function () {",
                    "    pm.expect(pm.response.headers.get('Access-Control-Allow-Origin')).to.eql('*');",
                    "    pm.expect(pm.response.headers.get('Access-Control-Allow-Methods')).to.include('POST');",
                    "    pm.expect(pm.response.headers.get('Access-Control-Allow-Headers')).to.include('authorization');",
                    "});",
                ], headers=[("Origin", "https://shop.example"),
                            ("Access-Control-Request-Method", "POST"),
                            ("Access-Control-Request-Headers", "authorization,content-type")],
                public=True),
        request("Swagger UI", "GET", "/docs", "Interactive API documentation.", [
            "pm.test('status is 200', function () { pm.response.to.have.status(200); });",
            "pm.test('an HTML page', function () {",
            "    pm.expect(pm.response.headers.get('Content-Type')).to.include('text/html');",
            "});",
        ], public=True),
    ]


def build(spec):
    global_security = spec.get("security")
    folders = {}
    tag_order = [t["name"] for t in spec.get("tags", [])]
    for path in sorted(spec.get("paths", {})):
        for method in sorted(spec["paths"][path]):
            op = spec["paths"][path][method]
            if not isinstance(op, dict) or "responses" not in op:
                continue
            public = op.get("security", global_security) == []
            tag = (op.get("tags") or ["Other"])[0]
            if (method, path) == ("post", "/v1/events"):
                items = events_examples(op, spec, public)
            else:
                items = [generic(method, path, op, spec, public)]
            folder = folders.setdefault(tag, [])
            for item in items:
                if any(other["name"] == item["name"] for other in folder):
                    item["name"] += f" ({method.upper()} {path})"
                folder.append(item)
    folders.setdefault("Auth", []).extend(auth_examples())
    folders.setdefault("Documentation", []).extend(extras())
    # Ingest first (it sets `eventId` for later requests), then the document's tag order,
    # the documentation routes last.
    order = sorted(folders, key=lambda t: (
        t != "Ingest", t == "Documentation",
        tag_order.index(t) if t in tag_order else len(tag_order), t))
    info = spec.get("info", {})
    return {
        "info": {
            "name": info.get("title", "adtrack"),
            "description": "Generated by `_test/postman/generate.py` from `/openapi.json` "
                           "(do not edit by hand). Variables: `baseUrl`; `apiKey`, a key with "
                           "every scope (sent as Bearer token); `adminKey`, the bootstrap admin "
                           "key (for creating tenants); `tenantId`, the tenant of `apiKey`."
                           "\n\n" + info.get("description", ""),
            "schema": SCHEMA_URL,
        },
        "auth": {"type": "bearer", "bearer": [{"key": "token", "value": "{{apiKey}}", "type": "string"}]},
        "variable": [
            {"key": "baseUrl", "value": DEFAULT_BASE_URL, "type": "string"},
            {"key": "apiKey", "value": "", "type": "string"},
            {"key": "adminKey", "value": "", "type": "string"},
            {"key": "tenantId", "value": "", "type": "string"},
            {"key": "newKeyId", "value": "adt_000000000000", "type": "string"},
            {"key": "eventId", "value": "6f1c1f0e-8a53-4c1e-9d2a-5b7e8f9a0b1c", "type": "string"},
        ],
        "event": [
            script("prerequest", [
                "// A time range for the analytics requests: the last hour, up to now.",
                "pm.collectionVariables.set('from', new Date(Date.now() - 3600 * 1000).toISOString());",
                "pm.collectionVariables.set('to', new Date(Date.now() + 1000).toISOString());",
            ]),
            script("test", [
                "pm.test('X-Request-Id is returned', function () {",
                "    pm.expect(pm.response.headers.get('X-Request-Id')).to.be.a('string').and.not.empty;",
                "});",
            ]),
        ],
        "item": [{"name": t, "item": folders[t]} for t in order],
    }


def load_spec(args):
    if args.spec:
        with open(args.spec, encoding="utf-8") as f:
            return json.load(f)
    with urllib.request.urlopen(args.url.rstrip("/") + "/openapi.json", timeout=30) as r:
        return json.load(r)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--url", default=DEFAULT_BASE_URL, help="base URL of a running service")
    src.add_argument("--spec", help="an OpenAPI document saved as JSON")
    parser.add_argument("--out", default=None, help=f"output file (default: {OUT} beside this script)")
    args = parser.parse_args()
    collection = build(load_spec(args))
    out = args.out
    if out is None:
        import os
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), OUT)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(collection, f, indent=2, ensure_ascii=False)
        f.write("\n")
    count = sum(len(folder["item"]) for folder in collection["item"])
    print(f"wrote {out}: {count} requests")


if __name__ == "__main__":
    main()

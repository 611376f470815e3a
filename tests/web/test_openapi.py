"""The OpenAPI 3.1 document: valid, served without a token, complete, and true to the live bridge.

The last test runs schemathesis against the real bridge on a loopback socket
(with the reference AI server behind it): every operation, with data the
document calls valid and data it calls invalid, checked for server errors and
for responses the document does not describe.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
from aiohttp import web
from hypothesis import strategies as st
from pytest_aiohttp import AiohttpClient
from schemathesis import GenerationMode
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import positive_data_acceptance

from sessionbridge.app import create_app
from sessionbridge.config import Settings
from sessionbridge.web import openapi
from tests.conftest import Api, issue_token

DOCUMENT: dict[str, Any] = json.loads(openapi.document_bytes())
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
# aiohttp adds HEAD beside every GET route; the document, like most, leaves it implicit.
IMPLICIT_METHODS = {"HEAD"}
# Per operation and generation mode. With the 24 operations of both faces the
# run takes about half a minute, most of it hypothesis generating the OpenAI
# face's nested bodies.
MAX_EXAMPLES = 20


def has_openapi_route(app: web.Application) -> bool:
    return any(
        route.resource is not None and route.resource.canonical == "/openapi.json"
        for route in app.router.routes()
    )


@pytest.fixture
async def api(aiohttp_client: AiohttpClient, settings: Settings) -> Api:
    """The bridge with its /openapi.json route, whether or not create_app adds it yet."""
    app = create_app(settings)
    if not has_openapi_route(app):
        app.add_routes(openapi.routes)
    client = await aiohttp_client(app)
    return Api(client, await issue_token(app, "openapi"))


def app_operations(app: web.Application) -> set[tuple[str, str]]:
    """(METHOD, path template) of every route the router serves."""
    return {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.method not in IMPLICIT_METHODS
    }


def documented_operations() -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in DOCUMENT["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }


def walk(node: Any) -> Iterator[Any]:
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from walk(child)


def resolve(pointer: str) -> Any:
    assert pointer.startswith("#/"), pointer
    node: Any = DOCUMENT
    for part in pointer[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


# -- the document ------------------------------------------------------------------------


def test_document_is_valid_openapi_3_1() -> None:
    # schemathesis ships the official OpenAPI 3.1 meta-schema and validates with it.
    schema = schemathesis.openapi.from_dict(DOCUMENT)
    schema.validate()
    assert DOCUMENT["openapi"].startswith("3.1.")
    operations = list(schema.get_all_operations())
    assert all(isinstance(result, Ok) for result in operations)
    assert len(operations) == len(documented_operations())


def test_every_reference_resolves() -> None:
    refs = [node["$ref"] for node in walk(DOCUMENT) if isinstance(node, dict) and "$ref" in node]
    assert refs
    for ref in refs:
        assert resolve(ref) is not None, ref


def test_every_path_parameter_is_declared_and_operation_ids_are_unique() -> None:
    operation_ids = []
    for path, item in DOCUMENT["paths"].items():
        templated = set(re.findall(r"{([^}]+)}", path))
        for method, operation in item.items():
            if method not in HTTP_METHODS:
                continue
            operation_ids.append(operation["operationId"])
            parameters = [
                resolve(p["$ref"]) if "$ref" in p else p
                for p in item.get("parameters", []) + operation.get("parameters", [])
            ]
            declared = {p["name"] for p in parameters if p["in"] == "path"}
            assert declared == templated, (method, path)
    assert len(operation_ids) == len(set(operation_ids))


def test_v1_operations_need_a_bearer_token_and_the_others_none() -> None:
    assert DOCUMENT["security"] == [{"bearerAuth": []}]
    bearer = DOCUMENT["components"]["securitySchemes"]["bearerAuth"]
    assert (bearer["type"], bearer["scheme"]) == ("http", "bearer")
    for path, item in DOCUMENT["paths"].items():
        for method, operation in item.items():
            if method not in HTTP_METHODS:
                continue
            if path.startswith("/v1/"):
                assert "security" not in operation, (method, path)
                assert "401" in operation["responses"], (method, path)
            else:
                assert operation["security"] == [], (method, path)


async def test_document_is_served_without_a_token(api: Api) -> None:
    response = await api.client.get("/openapi.json")

    assert response.status == 200
    assert response.content_type == "application/json"
    assert await response.json() == DOCUMENT


async def test_every_route_of_the_app_is_documented_and_nothing_else(api: Api) -> None:
    served = app_operations(api.app)

    assert {op for op in served if op[1].startswith("/v1")} <= documented_operations()
    assert served == documented_operations()


# -- schemathesis against the live bridge ----------------------------------------------------

Operation = schemathesis.APIOperation[Any, Any, Any, Any]
Case = schemathesis.Case[Any]


class LiveBridge:
    """What the fuzzing thread needs to reach the bridge that the event loop serves."""

    def __init__(self, base_url: str, token: str) -> None:
        self.base_url = base_url
        self.token = token
        self.http = requests.Session()
        self.calls = 0

    def post(self, path: str, body: dict[str, Any], status: int = 200) -> Any:
        response = self.http.post(
            f"{self.base_url}{path}", json=body,
            headers={"Authorization": f"Bearer {self.token}"},
        )
        assert response.status_code == status, response.text
        return response.json()

    def new_session(self) -> str:
        return str(self.post("/v1/sessions", {"scenario": "fuzzed"}, status=201)["id"])

    def new_response(self) -> str:
        """A completed response, one that may be retrieved, continued, cancelled or deleted."""
        response = self.post("/v1/responses", {"input": "fuzzed"})
        assert response["status"] == "completed", response
        return str(response["id"])

    def new_conversation(self) -> tuple[str, str]:
        """A conversation that holds one item: its id and the item's."""
        conversation = self.post("/v1/conversations", {})
        items = self.post(
            f"/v1/conversations/{conversation['id']}/items",
            {"items": [{"role": "user", "content": "fuzzed"}]},
        )
        return str(conversation["id"]), str(items["data"][0]["id"])


def load_live_schema(bridge: LiveBridge) -> list[Operation]:
    config = schemathesis.Config.from_dict({
        "base-url": bridge.base_url,
        # The token goes through schemathesis, not as a fixed header, so that
        # its invalid cases may leave it out and expect 401.
        "auth": {"openapi": {"bearerAuth": {"bearer": bridge.token}}},
        # The bridge ignores query parameters it does not know, as most HTTP
        # APIs do, and OpenAPI cannot say so: an extra one is no invalid request.
        "generation": {"allow-extra-parameters": False},
        # A body over the configured size is refused before it is read: 413
        # rejects invalid data as much as 400 or 422 do.
        "checks": {"negative_data_rejection": {"expected-statuses": [
            "400", "401", "404", "405", "409", "413", "422", "429"]}},
    })
    schema = schemathesis.openapi.from_url(f"{bridge.base_url}/openapi.json", config=config)
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        operations.append(result.ok())
    return operations


def integral_floats_as_ints(case: Case) -> Case:
    """Send a generated 125.0 as 125 in valid cases.

    JSON Schema's ``integer`` admits 125.0 and schemathesis generates it; the
    bridge, like the API (``max_tokens: int``), takes only an integer
    literal, and the document says so in words because JSON Schema cannot.
    """
    if isinstance(case.body, dict):
        for name, value in case.body.items():
            if isinstance(value, float) and value.is_integer():
                case.body[name] = int(value)
    return case


def real_path_ids(bridge: LiveBridge, path: str) -> dict[str, str]:
    """Ids that exist for the path parameters of ``path``."""
    if path.startswith("/v1/responses/"):
        return {"id": bridge.new_response()}
    if path.startswith("/v1/conversations/"):
        conversation_id, item_id = bridge.new_conversation()
        return {"id": conversation_id, "item_id": item_id}
    return {"id": bridge.new_session()}


def answerable_messages(messages: Any) -> None:
    """Message items whose parts' texts, joined, are not blank: JSON Schema cannot join them."""
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and content and not "".join(
            part["text"] for part in content
        ).strip():
            content[0]["text"] = "?"


def answerable_response_request(
    bridge: LiveBridge, body: dict[str, Any], use_real_ids: bool
) -> None:
    """A valid ``POST /v1/responses`` body as the bridge can answer it.

    The input must end with a question (its last user or assistant item a
    user message), which JSON Schema cannot say of a list's last match; and
    half the cases that name a response or a conversation name one that
    exists (a random id is rightly 404).
    """
    messages = body.get("input")
    if isinstance(messages, list):
        answerable_messages(messages)
        said = [m["role"] for m in messages if m["role"] in ("user", "assistant")]
        if said[-1:] != ["user"]:
            messages.append({"role": "user", "content": "And then?"})
    if use_real_ids and body.get("previous_response_id") is not None:
        body["previous_response_id"] = bridge.new_response()
    if use_real_ids and body.get("conversation") is not None:
        conversation_id, _ = bridge.new_conversation()
        if isinstance(body["conversation"], dict):
            body["conversation"]["id"] = conversation_id
        else:
            body["conversation"] = conversation_id


def make_valid_case_stand_alone(bridge: LiveBridge, case: Case, use_real_ids: bool) -> None:
    """Undo what makes a schema-valid case fail for reasons the schema cannot express."""
    if use_real_ids and "id" in (case.path_parameters or {}):
        # Random ids are all (rightly) 404; half the valid cases use objects that exist.
        real = real_path_ids(bridge, case.operation.path)
        case.path_parameters = {
            name: real.get(name, value) for name, value in (case.path_parameters or {}).items()
        }
    if isinstance(case.body, dict):
        if case.operation.path == "/v1/responses":
            answerable_response_request(bridge, case.body, use_real_ids)
        else:
            answerable_messages(case.body.get("items"))
    if case.headers and "Idempotency-Key" in case.headers:
        # Hypothesis repeats small values, and a key reused with another body
        # is rightly 422 idempotency_mismatch: each valid case gets its own key.
        key = case.headers["Idempotency-Key"]
        case.headers["Idempotency-Key"] = f"{bridge.calls}-{key}"[:255]


def fuzz_operation(bridge: LiveBridge, operation: Operation, mode: GenerationMode) -> None:
    strategy = operation.as_strategy(generation_mode=mode)
    excluded: list[Any] = []
    if mode is GenerationMode.POSITIVE:
        strategy = strategy.map(integral_floats_as_ints)
        if any(parameter.name == "cursor" for parameter in operation.query):
            # A cursor is valid only as the bridge gave it out; a random string
            # that fits `type: string` is rightly 422, which this check calls a bug.
            excluded.append(positive_data_acceptance)

    @hypothesis.settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
        print_blob=True,
    )
    @hypothesis.given(case=strategy, use_real_ids=st.booleans())
    def run(case: Case, use_real_ids: bool) -> None:
        if mode is GenerationMode.POSITIVE:
            make_valid_case_stand_alone(bridge, case, use_real_ids)
        bridge.calls += 1
        response = case.call(session=bridge.http)
        # Every check schemathesis enables by default: not_a_server_error,
        # status_code_conformance, content_type_conformance,
        # response_headers_conformance, response_schema_conformance,
        # negative_data_rejection, positive_data_acceptance and the rest.
        case.validate_response(response, excluded_checks=excluded)

    run()


def fuzz_every_operation(bridge: LiveBridge) -> list[str]:
    tried = []
    for operation in load_live_schema(bridge):
        modes = [GenerationMode.POSITIVE]
        if operation.path.startswith("/v1/"):
            # The operator routes take no input: no request to them is invalid.
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:
            fuzz_operation(bridge, operation, mode)
            tried.append(f"{operation.label} {mode.value}")
    return tried


def check_streams(bridge: LiveBridge) -> list[str]:
    """Each stream the document describes, fetched for real and checked event by event."""
    operations = {operation.label: operation for operation in load_live_schema(bridge)}
    auth = {"Authorization": f"Bearer {bridge.token}"}
    checked = []

    def check(label: str, **parts: Any) -> list[dict[str, Any]]:
        headers = {**auth, **parts.pop("headers", {})}
        case = operations[label].Case(headers=headers, **parts)
        # Given a session, schemathesis sends its headers (requests' `Accept: */*`
        # among them) over the case's, unless they are passed to call() as well.
        response = case.call(session=bridge.http, headers=headers)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"][0].startswith("text/event-stream"), label
        # schemathesis reads each event against the media type's schema, and its
        # JSON data against the schema's contentSchema.
        case.validate_response(response)
        checked.append(label)
        return [
            json.loads(line.removeprefix("data: "))
            for line in response.text.splitlines()
            if line.startswith("data: ")
        ]

    session_id = bridge.new_session()
    turn = check(
        "POST /v1/sessions/{id}/messages", path_parameters={"id": session_id},
        headers={"Accept": "text/event-stream"}, body={"content": "Stream it."},
    )
    check(
        "GET /v1/sessions/{id}/messages/{message_id}/events",
        path_parameters={"id": session_id, "message_id": turn[0]["user_message"]["id"]},
    )
    events = check("POST /v1/responses", body={"input": "Stream it.", "stream": True})
    response_id = events[0]["response"]["id"]
    replayed = check(
        "GET /v1/responses/{id}", path_parameters={"id": response_id},
        query={"stream": "true", "starting_after": "2"},
    )
    assert replayed == events[3:]
    return checked


async def test_every_event_stream_is_as_documented(api: Api) -> None:
    bridge = LiveBridge(str(api.client.make_url("")).rstrip("/"), api.token)
    try:
        checked = await asyncio.to_thread(check_streams, bridge)
    finally:
        bridge.http.close()
    assert len(checked) == 4


async def test_schemathesis_finds_no_server_error_and_no_undocumented_response(api: Api) -> None:
    bridge = LiveBridge(str(api.client.make_url("")).rstrip("/"), api.token)
    try:
        # schemathesis is synchronous (requests): it runs in a thread while
        # this event loop serves the bridge and the reference AI server.
        tried = await asyncio.to_thread(fuzz_every_operation, bridge)
    finally:
        bridge.http.close()
    print(f"\nschemathesis: {bridge.calls} requests over {len(tried)} operation/mode runs")

    # Every client operation got valid and invalid requests. (schemathesis
    # leaves out the operation that serves the document it loaded.)
    client_operations = {f"{m} {p}" for m, p in documented_operations() if p.startswith("/v1/")}
    for mode in ("positive", "negative"):
        assert {f"{label} {mode}" for label in client_operations} <= set(tried), tried
    # The run is bounded by max_examples, not by the clock.
    assert bridge.calls <= len(tried) * MAX_EXAMPLES

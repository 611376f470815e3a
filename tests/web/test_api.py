"""The client API (/v1): shapes, validation, authentication, ownership, pagination, errors.

Every test runs the real bridge on a loopback socket against the reference AI
server, and asserts on what a client sees (status, problem+json, headers,
bodies) or on the AI server's own counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import ClientResponse

from sessionbridge.config import Settings
from sessionbridge.reference.seed_server import DevServerState
from sessionbridge.store.sqlite import SqliteStore
from sessionbridge.web.appkeys import STORE
from tests.conftest import Api, MakeApi, issue_token, problem
from tests.doubles import ServerGate, wait_until

SESSION_FIELDS = {"id", "title", "scenario", "max_tokens", "created_at", "updated_at",
                  "message_count"}
MESSAGE_FIELDS = {"id", "seq", "role", "content", "status", "created_at"}
RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")


async def invalid_fields(response: ClientResponse) -> list[str]:
    """Assert a 422 invalid_field problem; return the fields it names."""
    body = await problem(response, 422, "invalid_field")
    assert all(error["message"] for error in body["errors"])
    return [error["field"] for error in body["errors"]]


def assert_utc_time(value: str) -> None:
    assert RFC3339_UTC.match(value), value
    assert datetime.fromisoformat(value).utcoffset() == UTC.utcoffset(None)


async def create(api: Api, body: Any = None, *, data: bytes | None = None) -> ClientResponse:
    if data is not None:
        return await api.request("POST", "/v1/sessions", data=data)
    return await api.request("POST", "/v1/sessions", json=body)


async def post_message(api: Api, session_id: str, body: Any = None, *,
                       data: bytes | None = None) -> ClientResponse:
    path = f"/v1/sessions/{session_id}/messages"
    if data is not None:
        return await api.request("POST", path, data=data)
    return await api.request("POST", path, json=body)


# -- creating and reading sessions -------------------------------------------------------


async def test_create_session_returns_201_with_every_field_and_location(api: Api) -> None:
    response = await create(api, {"scenario": "You are a tutor.", "title": "Maths",
                                  "max_tokens": 123})

    assert response.status == 201, await response.text()
    session = await response.json()
    assert set(session) == SESSION_FIELDS
    assert session["scenario"] == "You are a tutor."
    assert session["title"] == "Maths"
    assert session["max_tokens"] == 123
    assert session["message_count"] == 0
    assert_utc_time(session["created_at"])
    assert session["updated_at"] == session["created_at"]
    assert response.headers["Location"] == f"/v1/sessions/{session['id']}"


async def test_location_header_leads_to_the_created_session(api: Api) -> None:
    created = await create(api, {"scenario": "You are a tutor."})

    fetched = await api.request("GET", created.headers["Location"])

    assert fetched.status == 200
    assert await fetched.json() == await created.json()


async def test_session_without_max_tokens_gets_the_configured_default(
    api: Api, settings: Settings
) -> None:
    response = await create(api, {"scenario": "You are a tutor."})

    session = await response.json()
    assert session["max_tokens"] == settings.session_max_tokens_default
    assert session["max_tokens"] in settings.upstream_max_tokens
    assert session["title"] is None


async def test_max_tokens_at_both_ends_of_the_range_is_accepted(
    api: Api, settings: Settings
) -> None:
    limits = settings.upstream_max_tokens
    for value in (limits.low, limits.high):
        response = await create(api, {"scenario": "s", "max_tokens": value})
        assert response.status == 201, await response.text()
        assert (await response.json())["max_tokens"] == value


async def test_get_unknown_session_is_404(api: Api) -> None:
    response = await api.request("GET", "/v1/sessions/00000000-0000-0000-0000-000000000000")

    await problem(response, 404, "not_found")


async def test_ai_session_id_never_appears_in_any_response(
    api: Api, ai_state: DevServerState
) -> None:
    session_id = await api.new_session()
    sent = await api.send(session_id, "hello")
    sent_again = await api.send(session_id, "again")
    responses = [
        sent,
        sent_again,
        await api.request("GET", f"/v1/sessions/{session_id}"),
        await api.request("GET", "/v1/sessions"),
        await api.request("GET", f"/v1/sessions/{session_id}/messages"),
        await create(api, {"scenario": "another"}),
    ]

    (ai_session_id,) = ai_state.sessions  # the bridge did create one upstream
    for response in responses:
        assert response.status in (200, 201)
        text = await response.text()
        assert "ai_session_id" not in text
        assert ai_session_id not in text


# -- validation of session bodies ----------------------------------------------------------


INVALID_SESSION_BODIES: list[tuple[dict[str, Any], str]] = [
    ({}, "scenario"),
    ({"scenario": None}, "scenario"),
    ({"scenario": 42}, "scenario"),
    ({"scenario": ["a"]}, "scenario"),
    ({"scenario": ""}, "scenario"),
    ({"scenario": " \t\n "}, "scenario"),
    ({"scenario": "a\x00b"}, "scenario"),
    ({"scenario": "s", "title": 5}, "title"),
    ({"scenario": "s", "title": {"x": 1}}, "title"),
    ({"scenario": "s", "max_tokens": True}, "max_tokens"),
    ({"scenario": "s", "max_tokens": 100.0}, "max_tokens"),
    ({"scenario": "s", "max_tokens": 100.5}, "max_tokens"),
    ({"scenario": "s", "max_tokens": "100"}, "max_tokens"),
    ({"scenario": "s", "max_tokens": -1}, "max_tokens"),
    ({"scenario": "s", "max_tokens": 10**30}, "max_tokens"),
]


async def test_invalid_session_field_is_422_naming_the_field(
    api: Api, settings: Settings
) -> None:
    limits = settings.upstream_max_tokens
    cases = [
        *INVALID_SESSION_BODIES,
        ({"scenario": "s", "title": "t" * (settings.max_title_chars + 1)}, "title"),
        ({"scenario": "s", "max_tokens": limits.low - 1}, "max_tokens"),
        ({"scenario": "s", "max_tokens": limits.high + 1}, "max_tokens"),
    ]

    for body, field in cases:
        response = await create(api, body)

        assert await invalid_fields(response) == [field], body

    listed = await (await api.request("GET", "/v1/sessions")).json()
    assert listed["sessions"] == []


async def test_scenario_over_configured_maximum_is_422(make_api: MakeApi) -> None:
    api = await make_api(max_scenario_chars=10)

    at_limit = await create(api, {"scenario": "x" * 10})
    over_limit = await create(api, {"scenario": "x" * 11})

    assert at_limit.status == 201
    assert await invalid_fields(over_limit) == ["scenario"]


async def test_lone_surrogate_in_scenario_is_422(api: Api) -> None:
    response = await create(api, data=b'{"scenario": "\\ud800"}')

    assert await invalid_fields(response) == ["scenario"]


async def test_every_invalid_field_is_reported_at_once(api: Api) -> None:
    response = await create(api, {"scenario": 1, "title": 2, "max_tokens": "many"})

    assert sorted(await invalid_fields(response)) == ["max_tokens", "scenario", "title"]


# -- bodies that are not a JSON object ---------------------------------------------------


NOT_JSON_OBJECTS = {
    "empty": b"",
    "not JSON": b"scenario=hello",
    "truncated": b'{"scenario": "x"',
    "array": b'["scenario"]',
    "string": b'"scenario"',
    "number": b"42",
    "null": b"null",
    "invalid UTF-8": b'{"scenario": "caf\xe9"}',
}


async def test_body_that_is_not_a_json_object_is_400_invalid_json(api: Api) -> None:
    for what, raw in NOT_JSON_OBJECTS.items():
        response = await create(api, data=raw)

        assert response.status == 400, what
        await problem(response, 400, "invalid_json")


async def test_deeply_nested_json_is_400_invalid_json(make_api: MakeApi) -> None:
    # A body limit above the body's size, so that the parser, not the size check, refuses it.
    api = await make_api(max_body=200_000)

    response = await create(api, data=b"[" * 100_000)

    await problem(response, 400, "invalid_json")


async def test_message_body_that_is_not_a_json_object_is_400(api: Api) -> None:
    session_id = await api.new_session()

    response = await post_message(api, session_id, data=b"[1, 2]")

    await problem(response, 400, "invalid_json")


async def test_bridge_keeps_serving_after_a_deeply_nested_body(api: Api) -> None:
    await create(api, data=b'{"a":' * 12_000)

    response = await create(api, {"scenario": "still here"})

    assert response.status == 201


# -- body size -------------------------------------------------------------------------------


async def test_body_over_max_body_is_413_too_large(make_api: MakeApi) -> None:
    api = await make_api(max_body=1024)

    response = await create(api, {"scenario": "x" * 2000})

    await problem(response, 413, "too_large")


async def test_chunked_body_over_max_body_is_413_too_large(make_api: MakeApi) -> None:
    api = await make_api(max_body=1024)

    async def chunks() -> AsyncIterator[bytes]:
        # No Content-Length: the limit must hold while the body streams in.
        yield b'{"scenario": "'
        for _ in range(10):
            yield b"x" * 200
        yield b'"}'

    response = await api.request("POST", "/v1/sessions", data=chunks())

    await problem(response, 413, "too_large")


async def test_message_body_over_max_body_is_413_and_calls_no_ai_server(
    make_api: MakeApi, ai_state: DevServerState
) -> None:
    api = await make_api(max_body=1024)
    session_id = await api.new_session()

    response = await post_message(api, session_id, {"content": "x" * 2000})

    await problem(response, 413, "too_large")
    assert ai_state.calls["chat"] == 0
    assert await api.messages(session_id) == []


async def test_body_just_under_max_body_is_accepted(make_api: MakeApi) -> None:
    api = await make_api(max_body=1024)

    response = await create(api, {"scenario": "x" * 900})

    assert response.status == 201


# -- authentication ---------------------------------------------------------------------------


BAD_AUTHORIZATION = {
    "no header": None,
    "empty": "",
    "no token": "Bearer",
    "blank token": "Bearer   ",
    "basic scheme": "Basic dGVzdDp0ZXN0",
    "other scheme": "Token sb_whatever",
    "unknown token": "Bearer sb_not-a-token-anyone-was-given",
}


async def test_request_without_valid_token_is_401_with_www_authenticate(api: Api) -> None:
    for what, authorization in BAD_AUTHORIZATION.items():
        headers = {} if authorization is None else {"Authorization": authorization}

        response = await api.client.request("GET", "/v1/sessions", headers=headers)

        assert response.status == 401, what
        await problem(response, 401, "unauthorized")
        assert response.headers["WWW-Authenticate"].startswith("Bearer"), what


async def test_revoked_token_is_401(api: Api) -> None:
    session_id = await api.new_session()

    assert await api.app[STORE].revoke_key("test")
    listed = await api.request("GET", "/v1/sessions")
    fetched = await api.request("GET", f"/v1/sessions/{session_id}")

    await problem(listed, 401, "unauthorized")
    await problem(fetched, 401, "unauthorized")
    assert "WWW-Authenticate" in listed.headers


async def test_unauthorized_post_stores_nothing_and_calls_no_ai_server(
    api: Api, ai_state: DevServerState
) -> None:
    session_id = await api.new_session()

    response = await api.client.post(
        f"/v1/sessions/{session_id}/messages", json={"content": "hi"}
    )

    await problem(response, 401, "unauthorized")
    assert ai_state.calls["chat"] == ai_state.calls["scenario"] == 0
    assert await api.messages(session_id) == []


async def test_bearer_scheme_is_case_insensitive(api: Api) -> None:
    response = await api.client.get(
        "/v1/sessions", headers={"Authorization": f"bearer {api.token}"}
    )

    assert response.status == 200


async def test_operator_routes_need_no_token(api: Api) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        response = await api.client.get(path)

        assert response.status == 200, (path, await response.text())


# -- one key cannot see another key's sessions ------------------------------------------


async def test_another_key_gets_404_for_a_session(api: Api, ai_state: DevServerState) -> None:
    session_id = await api.new_session()
    await api.say(session_id, "mine")
    chats = ai_state.calls["chat"]
    intruder = Api(api.client, await issue_token(api.app, "other"))
    path = f"/v1/sessions/{session_id}"

    attempts = [
        await intruder.request("GET", path),
        await intruder.request("GET", f"{path}/messages"),
        await intruder.request("POST", f"{path}/messages", json={"content": "let me in"}),
        await intruder.request("DELETE", path),
    ]

    for response in attempts:
        await problem(response, 404, "not_found")
    assert ai_state.calls["chat"] == chats
    owner_view = await api.request("GET", path)
    assert owner_view.status == 200
    assert (await owner_view.json())["message_count"] == 2
    assert len(await api.messages(session_id)) == 2


async def test_another_keys_list_does_not_contain_the_session(api: Api) -> None:
    mine = await api.new_session()
    other = Api(api.client, await issue_token(api.app, "other"))
    theirs = await other.new_session()

    listed = await (await other.request("GET", "/v1/sessions")).json()

    assert [s["id"] for s in listed["sessions"]] == [theirs]
    assert mine not in str(listed)


async def test_cursor_of_one_key_shows_another_key_only_its_own_sessions(api: Api) -> None:
    other = Api(api.client, await issue_token(api.app, "other"))
    # The other key's sessions are older than the cursor, so they are what it finds.
    theirs = [await other.new_session(f"theirs {i}") for i in range(2)]
    mine = [await api.new_session(f"mine {i}") for i in range(5)]
    first_page = await (await api.request("GET", "/v1/sessions?limit=2")).json()
    cursor = first_page["next_cursor"]
    assert cursor is not None

    response = await other.request("GET", f"/v1/sessions?limit=50&cursor={cursor}")

    assert response.status == 200
    ids = [s["id"] for s in (await response.json())["sessions"]]
    assert ids == list(reversed(theirs))
    assert not set(ids) & set(mine)


# -- pagination ---------------------------------------------------------------------------------


async def test_sessions_are_listed_newest_first_in_pages(api: Api) -> None:
    created = [await api.new_session(f"scenario {i}") for i in range(7)]

    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        query = "limit=3" + (f"&cursor={cursor}" if cursor else "")
        response = await api.request("GET", f"/v1/sessions?{query}")
        assert response.status == 200
        body = await response.json()
        assert all(set(s) == SESSION_FIELDS for s in body["sessions"])
        pages.append([s["id"] for s in body["sessions"]])
        cursor = body["next_cursor"]
        if cursor is None:
            break
        assert len(pages) < 5, "pagination does not end"

    assert [len(page) for page in pages] == [3, 3, 1]
    assert [sid for page in pages for sid in page] == list(reversed(created))


async def test_last_full_page_has_no_next_cursor(api: Api) -> None:
    for i in range(3):
        await api.new_session(f"scenario {i}")

    body = await (await api.request("GET", "/v1/sessions?limit=3")).json()

    assert len(body["sessions"]) == 3
    assert body["next_cursor"] is None


async def test_empty_session_list(api: Api) -> None:
    body = await (await api.request("GET", "/v1/sessions")).json()

    assert body == {"sessions": [], "next_cursor": None}


async def test_default_page_is_50_sessions(api: Api) -> None:
    for i in range(51):
        await api.request("POST", "/v1/sessions", json={"scenario": f"s{i}"})

    body = await (await api.request("GET", "/v1/sessions")).json()

    assert len(body["sessions"]) == 50
    assert body["next_cursor"] is not None


async def test_messages_are_listed_oldest_first_in_pages(api: Api) -> None:
    session_id = await api.new_session()
    for text in ("one", "two", "three"):
        await api.say(session_id, text)

    seen: list[dict[str, Any]] = []
    cursor: str | None = None
    page_sizes = []
    while True:
        query = "limit=4" + (f"&cursor={cursor}" if cursor else "")
        path = f"/v1/sessions/{session_id}/messages?{query}"
        body = await (await api.request("GET", path)).json()
        page_sizes.append(len(body["messages"]))
        seen.extend(body["messages"])
        cursor = body["next_cursor"]
        if cursor is None:
            break
        assert len(page_sizes) < 5, "pagination does not end"

    assert page_sizes == [4, 2]
    assert [m["seq"] for m in seen] == [1, 2, 3, 4, 5, 6]
    assert len({m["id"] for m in seen}) == 6
    assert [m["role"] for m in seen] == ["user", "assistant"] * 3
    assert [m["content"] for m in seen[::2]] == ["one", "two", "three"]


@pytest.mark.parametrize("listing", ["sessions", "messages"])
async def test_limit_out_of_range_is_422_field_limit(api: Api, listing: str) -> None:
    session_id = await api.new_session()
    path = "/v1/sessions" if listing == "sessions" else f"/v1/sessions/{session_id}/messages"

    for limit in ("0", "201", "-1", "abc", "1.5", "", "%C2%B2", "10000000000000000000000"):
        response = await api.request("GET", f"{path}?limit={limit}")
        assert await invalid_fields(response) == ["limit"], limit


async def test_limit_at_both_ends_is_accepted(api: Api) -> None:
    for limit in ("1", "200"):
        response = await api.request("GET", f"/v1/sessions?limit={limit}")

        assert response.status == 200, limit


async def test_garbage_cursor_is_422_field_cursor(api: Api) -> None:
    cursors = {
        "garbage": "garbage",
        "not base64": "!!!!",
        "not ascii": "%FF%FE",
        "s:abc": "czphYmM",
        "a messages cursor, m:1": "bTox",
        "s: and 22 digits": "czo5OTk5OTk5OTk5OTk5OTk5OTk5OTk5",
    }
    for what, cursor in cursors.items():
        response = await api.request("GET", f"/v1/sessions?cursor={cursor}")
        assert await invalid_fields(response) == ["cursor"], what


async def test_sessions_cursor_used_on_messages_is_422_field_cursor(api: Api) -> None:
    session_id = await api.new_session()
    for i in range(2):
        await api.new_session(f"more {i}")
    sessions_cursor = (await (await api.request("GET", "/v1/sessions?limit=1")).json())[
        "next_cursor"
    ]
    assert sessions_cursor is not None

    response = await api.request(
        "GET", f"/v1/sessions/{session_id}/messages?cursor={sessions_cursor}"
    )

    assert await invalid_fields(response) == ["cursor"]


async def test_messages_cursor_used_on_sessions_is_422_field_cursor(api: Api) -> None:
    session_id = await api.new_session()
    await api.say(session_id, "one")
    messages_cursor = (
        await (await api.request("GET", f"/v1/sessions/{session_id}/messages?limit=1")).json()
    )["next_cursor"]
    assert messages_cursor is not None

    response = await api.request("GET", f"/v1/sessions?cursor={messages_cursor}")

    assert await invalid_fields(response) == ["cursor"]


# -- deleting ---------------------------------------------------------------------------------


async def test_delete_session_is_204_and_takes_its_messages(api: Api) -> None:
    session_id = await api.new_session()
    await api.say(session_id, "hello")
    kept = await api.new_session("kept")

    deleted = await api.request("DELETE", f"/v1/sessions/{session_id}")

    assert deleted.status == 204
    assert await deleted.read() == b""
    await problem(await api.request("GET", f"/v1/sessions/{session_id}"), 404, "not_found")
    await problem(
        await api.request("GET", f"/v1/sessions/{session_id}/messages"), 404, "not_found"
    )
    listed = await (await api.request("GET", "/v1/sessions")).json()
    assert [s["id"] for s in listed["sessions"]] == [kept]


async def test_delete_twice_is_404_the_second_time(api: Api) -> None:
    session_id = await api.new_session()
    await api.request("DELETE", f"/v1/sessions/{session_id}")

    again = await api.request("DELETE", f"/v1/sessions/{session_id}")

    await problem(again, 404, "not_found")


async def test_message_to_deleted_session_is_404_and_calls_no_ai_server(
    api: Api, ai_state: DevServerState
) -> None:
    session_id = await api.new_session()
    await api.request("DELETE", f"/v1/sessions/{session_id}")

    response = await api.send(session_id, "anyone there?")

    await problem(response, 404, "not_found")
    assert ai_state.calls["scenario"] == ai_state.calls["chat"] == 0


# -- routing errors ------------------------------------------------------------------------


async def test_unknown_route_is_404_problem(api: Api) -> None:
    for path in ("/nope", "/v1/nope", "/v1/sessions/x/y/z"):
        response = await api.request("GET", path)

        assert response.status == 404, path
        await problem(response, 404, "not_found")


WRONG_METHODS = [
    ("PUT", "/v1/sessions", {"GET", "POST"}),
    ("PATCH", "/v1/sessions/some-id", {"GET", "DELETE"}),
    ("DELETE", "/v1/sessions/some-id/messages", {"GET", "POST"}),
    ("POST", "/healthz", {"GET"}),
]


async def test_wrong_method_is_405_problem_with_allow(api: Api) -> None:
    for method, path, allowed in WRONG_METHODS:
        response = await api.request(method, path)

        assert response.status == 405, (method, path)
        await problem(response, 405, "method_not_allowed")
        allow = {m.strip() for m in response.headers["Allow"].split(",")}
        assert allowed <= allow, (method, path, allow)
        assert method not in allow


# -- messages -------------------------------------------------------------------------------


async def test_turn_returns_question_and_reply_with_consecutive_seq(
    api: Api, ai_state: DevServerState
) -> None:
    session_id = await api.new_session()

    response = await post_message(api, session_id, {"content": "What is 2+2?"})

    assert response.status == 200, await response.text()
    body = await response.json()
    assert set(body) == {"user_message", "reply", "ai_session"}
    question, reply = body["user_message"], body["reply"]
    assert set(question) == MESSAGE_FIELDS
    # An answer also says how its turn got its AI session (the seed protocol reports no usage).
    assert set(reply) == MESSAGE_FIELDS | {"ai_session"}
    assert reply["ai_session"] == body["ai_session"] == "created"
    assert (question["seq"], question["role"], question["status"]) == (1, "user", "answered")
    assert (reply["seq"], reply["role"], reply["status"]) == (2, "assistant", "answered")
    assert question["content"] == "What is 2+2?"
    assert "What is 2+2?" in reply["content"]  # the reference server echoes the message
    assert question["id"] != reply["id"]
    assert_utc_time(question["created_at"])
    assert_utc_time(reply["created_at"])
    assert body["ai_session"] == "created"
    assert ai_state.calls["scenario"] == ai_state.calls["chat"] == 1


async def test_listed_messages_match_what_the_turns_returned(api: Api) -> None:
    session_id = await api.new_session()
    first = await api.say(session_id, "first")
    second = await api.say(session_id, "second")

    listed = await api.messages(session_id)

    assert listed == [
        first["user_message"], first["reply"], second["user_message"], second["reply"]
    ]
    assert [m["seq"] for m in listed] == [1, 2, 3, 4]
    assert second["ai_session"] == "reused"
    for message in listed:
        assert message["status"] == "answered"
        assert_utc_time(message["created_at"])


async def test_turn_updates_message_count_and_updated_at(api: Api) -> None:
    created = await (await create(api, {"scenario": "You are a tutor."})).json()
    # Times are kept to the millisecond: the turn comes in a later one.
    created_at = datetime.fromisoformat(created["updated_at"])
    await wait_until(lambda: datetime.now(UTC) - created_at >= timedelta(milliseconds=1))

    await api.say(created["id"], "hello")

    after = await (await api.request("GET", f"/v1/sessions/{created['id']}")).json()
    assert after["message_count"] == 2
    assert after["updated_at"] > created["updated_at"]
    assert after["created_at"] == created["created_at"]
    assert_utc_time(after["updated_at"])


async def held_turn(
    api: Api, ai_gate: ServerGate, content: str
) -> tuple[str, asyncio.Task[ClientResponse]]:
    """A new session and its first turn, held inside the AI server."""
    session_id = await api.new_session()
    ai_gate.hold()
    turn = asyncio.create_task(api.send(session_id, content))
    await ai_gate.wait_held()
    return session_id, turn


async def test_question_is_pending_while_the_ai_server_answers(
    api: Api, ai_gate: ServerGate
) -> None:
    session_id, turn = await held_turn(api, ai_gate, "hello")

    during = await api.messages(session_id)
    session = await (await api.request("GET", f"/v1/sessions/{session_id}")).json()

    assert [(m["seq"], m["role"], m["status"]) for m in during] == [(1, "user", "pending")]
    assert session["message_count"] == 1
    ai_gate.release()
    assert (await turn).status == 200
    assert [m["status"] for m in await api.messages(session_id)] == ["answered", "answered"]


async def test_a_client_that_goes_away_does_not_stop_its_turn(
    api: Api, ai_gate: ServerGate
) -> None:
    # The turn runs in the request's own handler, which the server does not
    # cancel when the client leaves.
    session_id, turn = await held_turn(api, ai_gate, "still there?")
    turn.cancel()  # the client closes its connection
    with contextlib.suppress(asyncio.CancelledError):
        await turn

    ai_gate.release()

    async def answered() -> bool:
        return [m["status"] for m in await api.messages(session_id)] == ["answered", "answered"]

    await wait_until(answered)


async def test_session_with_most_recent_turn_is_not_reordered_in_the_list(api: Api) -> None:
    # The list is ordered by creation, so a turn does not move a session.
    older = await api.new_session("older")
    newer = await api.new_session("newer")
    await api.say(older, "bump")

    listed = await (await api.request("GET", "/v1/sessions")).json()

    assert [s["id"] for s in listed["sessions"]] == [newer, older]


INVALID_MESSAGE_BODIES: list[tuple[dict[str, Any], str]] = [
    ({}, "content"),
    ({"content": None}, "content"),
    ({"content": ""}, "content"),
    ({"content": "   \n"}, "content"),
    ({"content": 7}, "content"),
    ({"content": ["hi"]}, "content"),
    ({"content": "nul\x00here"}, "content"),
    ({"content": "hi", "max_tokens": False}, "max_tokens"),
    ({"content": "hi", "max_tokens": 50.0}, "max_tokens"),
    ({"content": "hi", "max_tokens": "50"}, "max_tokens"),
    ({"content": "hi", "max_tokens": 10**30}, "max_tokens"),
]


async def test_invalid_message_field_is_422_and_calls_no_ai_server(
    api: Api, ai_state: DevServerState, settings: Settings
) -> None:
    session_id = await api.new_session()
    limits = settings.upstream_max_tokens
    cases = [
        *INVALID_MESSAGE_BODIES,
        ({"content": "x" * (settings.max_content_chars + 1)}, "content"),
        ({"content": "hi", "max_tokens": limits.low - 1}, "max_tokens"),
        ({"content": "hi", "max_tokens": limits.high + 1}, "max_tokens"),
    ]

    for body, field in cases:
        response = await post_message(api, session_id, body)

        assert await invalid_fields(response) == [field], body

    assert ai_state.calls["scenario"] == ai_state.calls["chat"] == 0
    assert await api.messages(session_id) == []


async def test_content_at_configured_maximum_is_accepted(make_api: MakeApi) -> None:
    api = await make_api(max_content_chars=20)
    session_id = await api.new_session()

    at_limit = await api.send(session_id, "x" * 20)
    over_limit = await api.send(session_id, "x" * 21)

    assert at_limit.status == 200
    assert await invalid_fields(over_limit) == ["content"]


async def test_lone_surrogate_in_content_is_422(api: Api, ai_state: DevServerState) -> None:
    session_id = await api.new_session()

    response = await post_message(api, session_id, data=b'{"content": "\\ud800"}')

    assert await invalid_fields(response) == ["content"]
    assert ai_state.calls["chat"] == 0


async def test_paired_surrogate_escape_is_accepted(api: Api) -> None:
    session_id = await api.new_session()

    response = await post_message(api, session_id, data=b'{"content": "smile \\ud83d\\ude00"}')

    assert response.status == 200, await response.text()
    assert (await response.json())["user_message"]["content"] == "smile \U0001f600"


async def test_message_with_several_invalid_fields_reports_them_all(api: Api) -> None:
    session_id = await api.new_session()

    response = await api.request(
        "POST",
        f"/v1/sessions/{session_id}/messages",
        json={"content": "", "max_tokens": 0},
        headers={"Idempotency-Key": "k" * 256},
    )

    assert sorted(await invalid_fields(response)) == ["Idempotency-Key", "content", "max_tokens"]


async def test_message_to_unknown_session_is_404(api: Api, ai_state: DevServerState) -> None:
    response = await api.send("00000000-0000-0000-0000-000000000000", "hello")

    await problem(response, 404, "not_found")
    assert ai_state.calls["chat"] == 0


async def test_idempotency_key_over_255_characters_is_422(
    api: Api, ai_state: DevServerState
) -> None:
    session_id = await api.new_session()

    too_long = await api.send(session_id, "hi", headers={"Idempotency-Key": "k" * 256})
    at_limit = await api.send(session_id, "hi", headers={"Idempotency-Key": "k" * 255})

    assert await invalid_fields(too_long) == ["Idempotency-Key"]
    assert at_limit.status == 200
    assert ai_state.calls["chat"] == 1


async def test_an_integer_too_long_to_parse_is_reported_on_its_field(api: Api) -> None:
    body = b'{"scenario": "s", "max_tokens": 1' + b"0" * 5000 + b"}"

    response = await api.request("POST", "/v1/sessions", data=body)

    assert response.status == 422
    assert [e["field"] for e in (await response.json())["errors"]] == ["max_tokens"]


async def test_a_body_that_is_not_utf8_is_invalid_json(api: Api) -> None:
    body = '{"scenario": "s"}'.encode("utf-16")

    response = await api.request("POST", "/v1/sessions", data=body)

    assert response.status == 400
    assert (await response.json())["code"] == "invalid_json"


async def test_a_revocation_by_another_connection_takes_effect_within_the_key_cache(
    make_api: MakeApi, settings: Settings
) -> None:
    api = await make_api(key_cache_seconds=0.3)
    assert (await api.request("GET", "/v1/sessions")).status == 200
    other = await SqliteStore.open(settings.db)  # as `sessionbridge keys revoke` would
    try:
        assert await other.revoke_key("test")
    finally:
        await other.close()

    cached = await api.request("GET", "/v1/sessions")
    assert cached.status == 200  # still within the cache's 0.3 s

    # The cached key expires: the revocation takes effect without a restart.
    async def refused() -> bool:
        return (await api.request("GET", "/v1/sessions")).status == 401

    await wait_until(refused)
    await problem(await api.request("GET", "/v1/sessions"), 401, "unauthorized")

"""Nothing secret reaches a log line: tokens, AI session ids, AI-server credentials."""

from __future__ import annotations

import logging

import pytest

from sessionbridge.cli import quiet_library_loggers
from sessionbridge.reference.seed_server import DevServerState
from sessionbridge.tokens import hash_token
from sessionbridge.web.appkeys import STORE
from tests.conftest import MakeApi


async def test_a_busy_run_logs_no_token_cookie_or_password(
    make_api: MakeApi, ai_state: DevServerState, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    quiet_library_loggers()  # as the command line sets up logging
    api = await make_api(empty_reply_retries=0)
    session_id = await api.new_session()
    await api.say(session_id, "hello")
    ai_state.forget_sessions()
    await api.say(session_id, "recover")  # a recovery
    ai_state.empty_replies = 1
    await api.send(session_id, "empty")  # a failure
    await api.request("GET", "/v1/sessions", headers={"Authorization": "Bearer sb_wrongtoken"})
    key = await api.app[STORE].key_for_token_hash(hash_token(api.token))
    assert key is not None
    session = await api.app[STORE].get_session(key.id, session_id)
    assert session is not None and session.ai_session_id

    # The reference AI server's own log may name its sessions: it is the AI server.
    logged = "\n".join(
        record.getMessage()
        for record in caplog.records
        if not record.name.startswith("sessionbridge.reference.seed_server")
    )

    assert "event=upstream_call" in logged  # the run did log
    assert api.token not in logged
    assert "sb_wrongtoken" not in logged
    assert session.ai_session_id not in logged
    for ai_session_id in ai_state.sessions:
        assert ai_session_id not in logged
    assert ai_state.password not in logged.replace("password", "")

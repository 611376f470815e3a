"""SESSIONBRIDGE_UPSTREAM_URL with several servers: parsed, checked, and what connect builds."""

from __future__ import annotations

import aiohttp
import pytest

from sessionbridge.config import ConfigError, Settings, load_settings
from sessionbridge.metrics import Metrics
from sessionbridge.upstream.connect import connect, replica_id, shown
from sessionbridge.upstream.openai import OpenAIClient
from sessionbridge.upstream.replicas import ReplicaPool
from sessionbridge.upstream.sessions import SessionServerClient


def test_several_urls_are_read_comma_separated() -> None:
    settings = load_settings(environ={
        "SESSIONBRIDGE_UPSTREAM_URL": " http://10.0.0.1:8000/ ,http://10.0.0.2:8000,,",
    })

    assert settings.upstream_urls == ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]
    assert Settings(upstream_url="http://10.0.0.1:8000").upstream_urls == ["http://10.0.0.1:8000"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"upstream_url": "http://a:1,http://a:1/"}, "twice"),
        ({"upstream_url": " , "}, "no AI server"),
        ({"replica_load_factor": 0.5}, "replica_load_factor"),
    ],
)
def test_unusable_settings_are_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings(**changes)  # type: ignore[arg-type]


def test_replicas_are_shown_and_named_without_their_credentials() -> None:
    assert shown("http://user:secret@10.0.0.1:8000/v1") == "http://10.0.0.1:8000/v1"
    assert shown("http://10.0.0.1:8000/v1") == "http://10.0.0.1:8000/v1"
    assert replica_id("http://10.0.0.1:8000") == replica_id("http://10.0.0.1:8000")
    assert len(replica_id("http://10.0.0.1:8000")) == 8


@pytest.mark.parametrize("flavor", ["scenario", "init-session", "openai"])
async def test_one_url_gets_its_flavors_adapter_and_several_a_pool(flavor: str) -> None:
    async with aiohttp.ClientSession() as http:
        one = connect(http, Settings(upstream_url="http://10.0.0.1:8000", upstream_flavor=flavor),
                      Metrics())
        several = connect(
            http,
            Settings(upstream_url="http://10.0.0.1:8000,http://10.0.0.2:8000",
                     upstream_flavor=flavor),
            Metrics(),
        )

    adapter = OpenAIClient if flavor == "openai" else SessionServerClient
    assert type(one) is adapter
    assert isinstance(several, ReplicaPool)
    assert [type(r.adapter) for r in several.replicas] == [adapter, adapter]
    assert [r.url for r in several.replicas] == ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]

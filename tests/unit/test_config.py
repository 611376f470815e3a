"""Settings from defaults, a TOML file, the environment and flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from sessionbridge.config import ConfigError, Settings, TokenRange, load_settings


def test_defaults_listen_on_loopback_8080() -> None:
    settings = load_settings(environ={})

    assert (settings.host, settings.port) == ("127.0.0.1", 8080)
    assert settings.upstream_max_tokens == TokenRange(10, 500)
    assert settings.upstream_timeout > 30


def test_flags_beat_environment_beat_file(tmp_path: Path) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text(
        'port = 9001\nhost = "0.0.0.0"\nupstream_url = "http://file"\nrecovery_budget = 10\n'
    )
    environ = {"SESSIONBRIDGE_PORT": "9002", "SESSIONBRIDGE_UPSTREAM_URL": "http://env"}

    settings = load_settings({"port": 9003, "db": None}, config_file=config, environ=environ)

    assert settings.port == 9003
    assert settings.upstream_url == "http://env"
    assert settings.host == "0.0.0.0"
    assert settings.recovery_budget == 10


def test_documented_environment_names_are_read() -> None:
    environ = {
        "SESSIONBRIDGE_UPSTREAM_FLAVOR": "init-session",
        "SESSIONBRIDGE_UPSTREAM_MAX_TOKENS": "50-1000",
        "SESSIONBRIDGE_UPSTREAM_TIMEOUT": "45.5",
        "SESSIONBRIDGE_EMPTY_REPLY_RETRIES": "3",
        "SESSIONBRIDGE_RECOVERY_BUDGET": "1234",
        "SESSIONBRIDGE_MAX_BODY": "2048",
        "SESSIONBRIDGE_SESSION_QUEUE": "4",
        "SESSIONBRIDGE_MAX_INFLIGHT": "7",
        "SESSIONBRIDGE_SHUTDOWN_GRACE": "9",
        "SESSIONBRIDGE_UPSTREAM_USER": "u",
        "SESSIONBRIDGE_UPSTREAM_PASSWORD": "secret",
    }

    settings = load_settings(environ=environ)

    assert settings.upstream_flavor == "init-session"
    assert settings.upstream_max_tokens == TokenRange(50, 1000)
    assert settings.upstream_timeout == 45.5
    assert (settings.empty_reply_retries, settings.recovery_budget) == (3, 1234)
    assert (settings.max_body, settings.session_queue, settings.max_inflight) == (2048, 4, 7)
    assert settings.shutdown_grace == 9
    assert settings.session_max_tokens_default == 256
    assert "secret" not in repr(settings)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SESSIONBRIDGE_UPSTREAM_FLAVOR", "v3"),
        ("SESSIONBRIDGE_UPSTREAM_MAX_TOKENS", "500-10"),
        ("SESSIONBRIDGE_UPSTREAM_MAX_TOKENS", "ten"),
        ("SESSIONBRIDGE_PORT", "http"),
        ("SESSIONBRIDGE_PORT", "70000"),
        ("SESSIONBRIDGE_MAX_INFLIGHT", "0"),
        ("SESSIONBRIDGE_DB_SYNCHRONOUS", "OFF"),
    ],
)
def test_bad_values_are_config_errors(name: str, value: str) -> None:
    with pytest.raises(ConfigError):
        load_settings(environ={name: value})


def test_unknown_file_setting_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text("prot = 1\n")

    with pytest.raises(ConfigError, match="prot"):
        load_settings(config_file=config, environ={})


def test_default_max_tokens_stays_inside_a_narrow_range() -> None:
    assert Settings(upstream_max_tokens=TokenRange(10, 100)).session_max_tokens_default == 100
    assert Settings(upstream_max_tokens=TokenRange(300, 1000)).session_max_tokens_default == 300

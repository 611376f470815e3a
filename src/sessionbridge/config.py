"""Settings: defaults, an optional TOML file, the environment and command-line flags.

Precedence, lowest to highest: built-in defaults, the TOML file (``--config``),
``SESSIONBRIDGE_*`` environment variables, command-line flags. Every setting has
one name; the environment variable is ``SESSIONBRIDGE_`` + the name in upper
case, and the TOML key is the name itself (``upstream_url = "..."``).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "SESSIONBRIDGE_"
FLAVORS = ("scenario", "init-session", "openai")
SLOT_SAVE_MODES = ("off", "on")
EVENT_LOOPS = ("asyncio", "uvloop")
SYNCHRONOUS_MODES = ("NORMAL", "FULL")


class ConfigError(ValueError):
    """A setting has a value the bridge cannot run with."""


@dataclass(frozen=True)
class TokenRange:
    low: int
    high: int

    def __contains__(self, value: object) -> bool:
        return isinstance(value, int) and self.low <= value <= self.high

    def __str__(self) -> str:
        return f"{self.low}-{self.high}"

    def clamp(self, value: int) -> int:
        """The nearest value inside the range."""
        return min(max(value, self.low), self.high)

    @classmethod
    def parse(cls, text: str) -> TokenRange:
        low_text, sep, high_text = text.partition("-")
        try:
            low, high = int(low_text), int(high_text)
        except ValueError:
            raise ConfigError(f"max tokens range must look like 10-500, not {text!r}") from None
        if not sep or low < 1 or high < low:
            raise ConfigError(f"max tokens range must look like 10-500, not {text!r}")
        return cls(low, high)


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    db: str = "sessionbridge.db"
    # Durability of a commit: NORMAL survives a crash of the process (kill -9);
    # FULL also survives power loss, at one fsync per commit.
    db_synchronous: str = "NORMAL"
    # One AI server's base URL, or several replicas of one, comma-separated
    # (docs/ai-servers.md#several-ai-servers).
    upstream_url: str = ""
    upstream_user: str = ""
    upstream_password: str = field(default="", repr=False)
    upstream_flavor: str = "scenario"
    # OpenAI-compatible servers (flavor "openai"): the model (empty: the first
    # that GET /models lists), a bearer key, and the context budget in tokens
    # (0: what the server reports, else 4096).
    upstream_model: str = ""
    upstream_api_key: str = field(default="", repr=False)
    context_tokens: int = 0
    # llama.cpp slot files (its --slot-save-path): "on" saves a conversation's
    # slot after each turn and restores it when the conversation comes back.
    # slot_dir is that folder as the bridge sees it, so it can remove a
    # deleted session's file and keep at most slot_files of them.
    slot_save: str = "off"
    slot_dir: str = ""
    slot_files: int = 64
    # The largest answer read from the AI server; a reply is refused while it
    # is being read past it. Replies are at most a few thousand tokens, and a
    # JSON body escapes each character to at most 12 bytes.
    max_reply_bytes: int = 256 * 1024
    upstream_max_tokens: TokenRange = TokenRange(10, 500)
    # Several replicas: a replica already running this many times its fair
    # share of this bridge's running turns (and at least 2) is passed over for
    # the conversation's next choice; 0 turns the bound off.
    replica_load_factor: float = 1.25
    # A real model takes seconds to minutes; the later generation alone caps
    # generation at 30 s, so the default sits well above that.
    upstream_timeout: float = 120.0
    # How long /readyz waits for the AI server's /health before it decides.
    health_timeout: float = 2.0
    # A /health that times out still counts as ready when an AI-server call
    # succeeded this recently: the server answers one request at a time.
    ready_grace: float = 300.0
    # How often the background readiness probe asks the database and the AI
    # server (/readyz reports the latest answer, at once).
    ready_interval: float = 1.0
    # Slow clients (connections.py). A client has header_timeout seconds from
    # connecting to send its first request's head; a kept-alive connection
    # closes after keepalive_timeout idle seconds (above the 60 s a proxy such
    # as nginx keeps idle upstream connections, so the bridge never closes one
    # a proxy is about to reuse); at most max_connections are open at once
    # (and fewer if the descriptor limit leaves less room; see the unit's
    # LimitNOFILE).
    header_timeout: float = 10.0
    keepalive_timeout: float = 75.0
    max_connections: int = 1024
    default_max_tokens: int = 256
    empty_reply_retries: int = 2
    recovery_budget: int = 6000
    max_body: int = 64 * 1024
    max_scenario_chars: int = 16_000
    max_content_chars: int = 16_000
    max_title_chars: int = 200
    session_queue: int = 8
    max_inflight: int = 32
    shutdown_grace: float = 30.0
    # A comment line goes out on an idle event stream this often (docs/streaming.md: at most 15 s).
    sse_keepalive: float = 15.0
    idempotency_ttl: float = 24 * 3600.0
    # How long a live API key is trusted without asking the database again;
    # a `keys revoke` from another process takes effect within it (0: at once).
    key_cache_seconds: float = 1.0
    # Several bridges on one PostgreSQL database: a turn holds its session
    # under a lease its bridge renews every third of this many seconds, so a
    # bridge killed mid-turn holds its session at most this long (SQLite: unused).
    turn_lease: float = 30.0
    log_level: str = "INFO"
    # The event loop serve runs on: asyncio's own, or uvloop (the ``uvloop``
    # extra), which costs a turn a little less CPU (bench/README.md).
    event_loop: str = "asyncio"

    def __post_init__(self) -> None:
        if self.upstream_flavor not in FLAVORS:
            raise ConfigError(f"upstream_flavor must be one of {', '.join(FLAVORS)}")
        if self.event_loop not in EVENT_LOOPS:
            raise ConfigError(f"event_loop must be one of {', '.join(EVENT_LOOPS)}")
        if self.slot_save not in SLOT_SAVE_MODES:
            raise ConfigError("slot_save must be on or off")
        if self.slot_save == "on" and not self.slot_dir:
            raise ConfigError(
                "slot_save=on needs slot_dir: the llama.cpp server's --slot-save-path"
                " as this bridge sees it, so that slot files stay bounded"
            )
        urls = self.upstream_urls
        if len(set(urls)) != len(urls):
            raise ConfigError("upstream_url names the same AI server twice")
        if self.upstream_url.strip() and not urls:
            raise ConfigError("upstream_url names no AI server")
        if self.replica_load_factor != 0 and self.replica_load_factor < 1:
            raise ConfigError("replica_load_factor must be 0 (no bound) or at least 1")
        if self.db_synchronous not in SYNCHRONOUS_MODES:
            raise ConfigError("db_synchronous must be NORMAL or FULL")
        if not 0 < self.port < 65536:
            raise ConfigError("port must be between 1 and 65535")
        for name in ("upstream_timeout", "health_timeout", "max_body", "max_inflight",
                     "sse_keepalive", "max_reply_bytes", "slot_files"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        for name in ("empty_reply_retries", "recovery_budget", "session_queue",
                     "shutdown_grace", "ready_grace", "key_cache_seconds", "context_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative")
        for name in ("ready_interval", "header_timeout", "keepalive_timeout", "max_connections",
                     "turn_lease"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")

    @property
    def upstream_urls(self) -> list[str]:
        """The AI servers ``upstream_url`` names: one, or several replicas of one."""
        return [url.strip().rstrip("/") for url in self.upstream_url.split(",") if url.strip()]

    @property
    def session_max_tokens_default(self) -> int:
        """The max_tokens a session gets when its creator names none, kept inside the range."""
        return self.upstream_max_tokens.clamp(self.default_max_tokens)


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def _convert(name: str, raw: Any) -> Any:
    kind = _FIELDS[name].type
    try:
        if kind == "TokenRange":
            return raw if isinstance(raw, TokenRange) else TokenRange.parse(str(raw))
        if kind == "int":
            if isinstance(raw, bool):
                raise ValueError
            return int(raw)
        if kind == "float":
            return float(raw)
        if name == "db_synchronous":
            return str(raw).upper()
        if name in ("slot_save", "event_loop"):
            return str(raw).lower()
        return str(raw)
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not a valid {kind}") from None


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    *,
    config_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build Settings from the TOML file, then the environment, then ``overrides`` (flags).

    ``overrides`` entries that are None are ignored, so argparse results can be
    passed as they are.
    """
    values: dict[str, Any] = {}
    env = os.environ if environ is None else environ
    path = config_file or env.get(ENV_PREFIX + "CONFIG")
    if path:
        try:
            with Path(path).open("rb") as handle:
                document = tomllib.load(handle)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        for key, raw in document.items():
            name = key.replace("-", "_")
            if name not in _FIELDS:
                raise ConfigError(f"unknown setting {key!r} in {path}")
            values[name] = _convert(name, raw)
    for name in _FIELDS:
        raw_env = env.get(ENV_PREFIX + name.upper())
        if raw_env is not None and raw_env != "":
            values[name] = _convert(name, raw_env)
    for name, raw in (overrides or {}).items():
        if raw is not None:
            values[name] = _convert(name, raw)
    return Settings(**values)

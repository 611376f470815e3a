"""The command line: serve, demo, migrate, keys."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage

from .app import RUNNER_OPTIONS, create_app
from .config import ConfigError, Settings, TokenRange, load_settings
from .notify import feed_watchdog, notify, watchdog_interval
from .store import DuplicateKeyName, MissingDriver, database, migrate, open_store
from .store.schema import MigrationsMissing
from .tokens import hash_token, new_token
from .web.appkeys import CONVERSATIONS
from .web.connections import (
    ConnectionGuard,
    condense_accept_errors,
    descriptor_reserve,
    effective_cap,
)

log = logging.getLogger("sessionbridge")

# aiohttp waits this long twice for handlers that outlived the grace (then
# cancels them); the database cleanup marks whatever they left pending as failed.
_CANCEL_WAIT = 0.1
# Connections the kernel may hold before the bridge accepts them (aiohttp's default).
LISTEN_BACKLOG = 128


T = TypeVar("T")


# -- serving -------------------------------------------------------------------------------

# Objects the young generation may gather before a collection runs. The
# turns in flight keep about 2 000 objects alive at once; at the default of
# 700 every collection walked them all, every ~15 turns (read from the bench's
# profile: 6-9 % of a turn's CPU and 20-30 ms pauses).
GC_YOUNG_THRESHOLD = 20_000


def tune_garbage_collector() -> None:
    """Set the collector for a long-running server, once everything it starts with exists.

    What is made at start (modules, the app, its routes) lives as long as the
    process: frozen, the collector never walks it again. Garbage is still
    collected, in bigger batches; memory stays bounded by the threshold.
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def run_loop(settings: Settings, main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on the configured event loop (``event_loop``)."""
    if settings.event_loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise MissingDriver(
                "event_loop: uvloop is not installed: pip install 'sessionbridge[uvloop]'"
            ) from None
        return uvloop.run(main)
    return asyncio.run(main)


async def serve(settings: Settings, banner: str | None = None) -> None:
    """Run the bridge until SIGTERM or SIGINT, then stop gracefully."""
    app = create_app(settings)
    # The grace period is kept below, by waiting for the turns themselves;
    # aiohttp's shutdown timeout only bounds the wait after the grace.
    runner = web.AppRunner(
        app, shutdown_timeout=_CANCEL_WAIT, access_log=None, handle_signals=False,
        keepalive_timeout=settings.keepalive_timeout, **RUNNER_OPTIONS,
    )
    # setup() runs the startup half of every cleanup context: migrations and
    # the database are ready before the socket accepts anything.
    await runner.setup()
    tune_garbage_collector()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    watchdog: asyncio.Task[None] | None = None
    listener: asyncio.Server | None = None
    try:
        assert runner.server is not None
        # aiohttp's web.Server is a protocol factory; the guard wraps it with
        # the connection cap and the header deadline (connections.py).
        guard = ConnectionGuard(
            runner.server,
            cap=effective_cap(
                settings.max_connections,
                descriptor_reserve(upstream_pool=settings.max_inflight + 8),
            ),
            header_timeout=settings.header_timeout,
        )
        condense_accept_errors(loop)
        listener = await loop.create_server(
            guard, settings.host, settings.port, backlog=LISTEN_BACKLOG, reuse_address=True
        )
        # Ready only now that the database is migrated and the port listens.
        notify("READY=1")
        log.info(
            "event=listening url=http://%s:%d upstream=%s flavor=%s db=%s",
            settings.host, settings.port, settings.upstream_url, settings.upstream_flavor,
            database(settings.db),  # a PostgreSQL URL without its password
        )
        if banner:
            print(banner, flush=True)
        interval = watchdog_interval()
        if interval:
            watchdog = asyncio.create_task(feed_watchdog(interval))
        await stop.wait()
        notify("STOPPING=1")
        log.info("event=stopping grace_seconds=%s", settings.shutdown_grace)
        # Stop accepting: close the listening socket and make keep-alive
        # connections close after their current request.
        listener.close()
        if runner.server is not None:
            runner.server.pre_shutdown()
        drained = await app[CONVERSATIONS].wait_idle(settings.shutdown_grace)
        if not drained:
            log.warning("event=grace_expired turns_cut_off=%d", len(app[CONVERSATIONS].locks))
        # Cut off what outlived the grace before the handlers are stopped, so
        # each cut-off turn's stream still ends with its turn.failed event.
        await app[CONVERSATIONS].stop()
        await asyncio.sleep(_CANCEL_WAIT / 2)
    finally:
        if watchdog is not None:
            watchdog.cancel()
        if listener is not None:
            listener.close()
        # Cancels what still runs (those turns record themselves as failed),
        # then closes the AI-server client and the database.
        await runner.cleanup()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    log.info("event=stopped")


@contextlib.asynccontextmanager
async def reference_upstream(settings: Settings) -> AsyncIterator[Settings]:
    """Start a built-in reference AI server (a test double) on a free loopback port.

    The seed protocol's by default; the OpenAI-compatible one (with pieces
    streamed a little apart, so a reply is seen arriving) when the flavor is
    ``openai``.
    """
    from .reference.openai_server import OpenAIReferenceState, create_openai_reference_app
    from .reference.seed_server import DevServerState, create_devserver_app

    if settings.upstream_flavor == "openai":
        app = create_openai_reference_app(OpenAIReferenceState(piece_delay=0.05))
    else:
        state = DevServerState(password="demo-" + os.urandom(8).hex())
        app = create_devserver_app(state)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    # Binding the socket here tells us the free port the system picked.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    await web.SockSite(runner, sock).start()
    if settings.upstream_flavor == "openai":
        reference = dataclasses.replace(
            settings, upstream_url=f"http://127.0.0.1:{port}/v1",
            upstream_max_tokens=TokenRange(1, 500),
        )
    else:
        reference = dataclasses.replace(
            settings,
            upstream_url=f"http://127.0.0.1:{port}",
            upstream_user=state.user,
            upstream_password=state.password,
            upstream_flavor=state.flavor,
        )
    try:
        yield reference
    finally:
        await runner.cleanup()


async def demo_token(settings: Settings) -> str:
    """The demo key's token, kept in a file beside the database (only its hash is in it)."""
    db = database(settings.db)
    # A PostgreSQL URL is no place for a file: the token goes in the current folder.
    token_file = Path(db.target + ".demo-token" if db.kind == "sqlite" else "demo-token")
    async with open_store(settings) as store:
        if token_file.exists():
            token = token_file.read_text().strip()
            if await store.key_for_token_hash(hash_token(token)) is not None:
                return token
        await store.revoke_key("demo")  # its token was lost with the file
        token = new_token()
        await store.create_key("demo", hash_token(token))
    token_file.touch(mode=0o600)
    token_file.write_text(token + "\n")
    return token


def demo_banner(settings: Settings, token: str, reference: bool) -> str:
    base = f"http://{settings.host}:{settings.port}"
    ai = "the built-in reference AI server (a test double, not a model)" if reference \
        else settings.upstream_url
    return f"""
sessionbridge is listening on {base}
AI server: {ai}
Demo API key: {token}

Try a conversation (paste into another terminal):

  export SB={base} TOKEN={token}
  SESSION=$(curl -s -X POST $SB/v1/sessions -H "Authorization: Bearer $TOKEN" \\
      -d '{{"scenario": "You are a friendly travel guide."}}' \\
      | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
  curl -s -X POST $SB/v1/sessions/$SESSION/messages -H "Authorization: Bearer $TOKEN" \\
      -d '{{"content": "Hello!"}}'
  curl -s -X POST $SB/v1/sessions/$SESSION/messages -H "Authorization: Bearer $TOKEN" \\
      -d '{{"content": "And tomorrow?"}}'
  curl -N -X POST $SB/v1/sessions/$SESSION/messages -H "Authorization: Bearer $TOKEN" \\
      -H "Accept: text/event-stream" -d '{{"content": "Stream the next one"}}'
  curl -s $SB/v1/sessions/$SESSION/messages -H "Authorization: Bearer $TOKEN"

Or open {base}/ in a browser and paste the key.

Stop with Ctrl-C.
"""


async def demo(settings: Settings) -> None:
    token = await demo_token(settings)
    if settings.upstream_url:
        await serve(settings, demo_banner(settings, token, reference=False))
        return
    async with reference_upstream(settings) as with_reference:
        await serve(with_reference, demo_banner(with_reference, token, reference=True))


# -- keys --------------------------------------------------------------------------------------


async def keys_command(settings: Settings, action: str, name: str | None) -> int:
    async with open_store(settings) as store:
        if action == "create":
            assert name is not None
            token = new_token()
            try:
                await store.create_key(name, hash_token(token))
            except DuplicateKeyName:
                print(f"a live key named {name!r} exists; revoke it first", file=sys.stderr)
                return 1
            print(f"created API key {name!r}; the token is shown once, store it now:")
            print(token)
            return 0
        if action == "list":
            for key in await store.list_keys():
                state = f"revoked {key.revoked_at}" if key.revoked_at else "live"
                print(f"{key.name}\tcreated {key.created_at}\t{state}")
            return 0
        assert name is not None
        if not await store.revoke_key(name):
            print(f"no live key named {name!r}", file=sys.stderr)
            return 1
        print(f"revoked API key {name!r}")
        return 0


class MalformedRequestFilter(logging.Filter):
    """Turns the HTTP parser's traceback for a malformed request into one line.

    A request that is not valid HTTP is the client's fault and is already
    answered 400; a traceback per such request would let anyone flood the log.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, BadHttpMessage):
            return True
        record.msg = "event=malformed_request error=%s"
        record.args = (type(error).__name__,)
        record.exc_info = None
        record.exc_text = None
        record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def quiet_library_loggers() -> None:
    # aiosqlite's debug trace prints every statement with its parameters
    # (message text, AI session ids); yoyo narrates each migration step.
    logging.getLogger("aiosqlite").setLevel(logging.WARNING)
    logging.getLogger("yoyo").setLevel(logging.WARNING)
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequestFilter) for f in server_log.filters):
        server_log.addFilter(MalformedRequestFilter())


# -- argument parsing ----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sessionbridge", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="TOML file of settings (SESSIONBRIDGE_CONFIG)")
    common.add_argument("--db", help="SQLite path or postgresql:// URL (SESSIONBRIDGE_DB)")
    common.add_argument("--log-level", dest="log_level", help="DEBUG, INFO, WARNING ...")
    serving = argparse.ArgumentParser(add_help=False)
    serving.add_argument("--host", help="address to listen on (SESSIONBRIDGE_HOST)")
    serving.add_argument("--port", type=int, help="port to listen on (SESSIONBRIDGE_PORT)")
    serving.add_argument("--upstream", dest="upstream_url",
                         help="AI server base URL (SESSIONBRIDGE_UPSTREAM_URL)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", parents=[common, serving], help="run the bridge")
    commands.add_parser(
        "demo", parents=[common, serving],
        help="run the bridge with a demo key, and the reference AI server unless one is set",
    )
    commands.add_parser("migrate", parents=[common], help="apply pending migrations")
    keys = commands.add_parser("keys", help="manage API keys")
    key_actions = keys.add_subparsers(dest="action", required=True)
    key_actions.add_parser("create", parents=[common]).add_argument("name")
    key_actions.add_parser("list", parents=[common])
    key_actions.add_parser("revoke", parents=[common]).add_argument("name")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = {
        name: getattr(args, name, None)
        for name in ("host", "port", "db", "upstream_url", "log_level")
    }
    try:
        settings = load_settings(overrides, config_file=args.config)
    except ConfigError as exc:
        print(f"sessionbridge: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    quiet_library_loggers()
    try:
        return _run(args, settings)
    except (ConfigError, MigrationsMissing, MissingDriver) as exc:
        # A broken install, a database the bridge cannot use, or one whose driver is an
        # extra not installed: say so in one line and exit, never serve on it.
        print(f"sessionbridge: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "serve":
        if not settings.upstream_url:
            print(
                "sessionbridge: no AI server configured: set SESSIONBRIDGE_UPSTREAM_URL or"
                " --upstream (or try `sessionbridge demo`)",
                file=sys.stderr,
            )
            return 2
        run_loop(settings, serve(settings))
        return 0
    if args.command == "demo":
        run_loop(settings, demo(settings))
        return 0
    if args.command == "migrate":
        applied = migrate(settings.db)
        print(f"applied {applied} migration(s) to {database(settings.db)}")
        return 0
    return asyncio.run(keys_command(settings, args.action, getattr(args, "name", None)))


if __name__ == "__main__":
    sys.exit(main())

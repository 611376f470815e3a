"""A real PostgreSQL server for the tests.

With ``SESSIONBRIDGE_TEST_POSTGRES=postgresql://...`` the tests use that server
(its user needs CREATEDB). Otherwise one server is started for the session
from Debian's ``postgresql`` package: ``initdb`` in a temporary directory,
listening on a free loopback port with its Unix socket in that directory.
initdb refuses to run as root, so as root the server runs as the ``postgres``
system user in a directory that user owns. Each test gets a database of its
own: ``postgres_dsn`` an empty one, ``migrated_postgres_dsn`` a copy of a
template the migrations were applied to once (copying is much faster than
migrating).

When no server can be had, the PostgreSQL tests are skipped with the reason,
unless ``SESSIONBRIDGE_REQUIRE_POSTGRES=1``, which makes that an error (so a
CI run cannot pass without them).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

ENV_SERVER = "SESSIONBRIDGE_TEST_POSTGRES"
ENV_REQUIRE = "SESSIONBRIDGE_REQUIRE_POSTGRES"
TEMPLATE = "sessionbridge_template"

_database_numbers = itertools.count(1)


class NoPostgres(Exception):
    """No PostgreSQL server can be started or reached here."""


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


def _admin(dsn: str, *statements: str) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as connection:
        for statement in statements:
            connection.execute(statement)  # type: ignore[arg-type]


def _bindir() -> Path:
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda path: int(path.parent.parent.name) if path.parent.parent.name.isdigit() else 0,
    )
    if candidates:
        return candidates[-1].parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    raise NoPostgres("no initdb: install Debian's postgresql package (make system-deps)")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LocalServer:
    """A throwaway PostgreSQL cluster: initdb, pg_ctl start, pg_ctl stop."""

    bindir: Path
    root: Path
    port: int
    as_user: list[str]

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        result = subprocess.run(
            [*self.as_user, *args], capture_output=True, text=True, timeout=120, check=False
        )
        if result.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise NoPostgres(f"{Path(args[0]).name} failed: {result.stderr.strip()} {tail}")

    @classmethod
    def start(cls) -> LocalServer:
        bindir = _bindir()
        root = Path(tempfile.mkdtemp(prefix="sessionbridge-pg-"))
        as_user: list[str] = []
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            if runuser is None:
                raise NoPostgres("running as root without runuser to drop to the postgres user")
            try:
                shutil.chown(root, user="postgres", group="postgres")
            except (LookupError, OSError) as exc:
                raise NoPostgres(f"no postgres system user to run the server as: {exc}") from exc
            as_user = [runuser, "-u", "postgres", "--"]
        server = cls(bindir, root, _free_port(), as_user)
        try:
            server._run(
                str(bindir / "initdb"), "-D", str(server.data), "-U", "postgres",
                "--auth=trust", "--encoding=UTF8", "--no-sync", "--no-instructions",
            )
            server.resume()
        except (NoPostgres, OSError, subprocess.TimeoutExpired) as exc:
            shutil.rmtree(root, ignore_errors=True)
            raise NoPostgres(str(exc)) from exc
        return server

    def resume(self) -> None:
        """Start the server on its cluster (again)."""
        # Durability does not matter for a throwaway cluster; speed does.
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            " -c max_connections=200"
        )
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"),
            "-o", options, "-w", "-t", "60", "start",
        )

    def pause(self, mode: str = "fast") -> None:
        """Stop the server and keep its cluster ("immediate": as if it crashed)."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def stop(self) -> None:
        with contextlib.suppress(NoPostgres, OSError, subprocess.TimeoutExpired):
            self.pause()
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class Postgres:
    """The server the tests use, and the databases made on it."""

    dsn: str  # of a database to run administrative statements from
    local: LocalServer | None
    template_ready: bool = False

    def create_database(self, template: str | None = None) -> str:
        name = f"sessionbridge_test_{os.getpid()}_{next(_database_numbers)}"
        clause = f" TEMPLATE {template}" if template else ""
        _admin(self.dsn, f"CREATE DATABASE {name}{clause}")
        return name

    def drop_database(self, name: str) -> None:
        _admin(self.dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def migrated_template(self) -> str:
        if not self.template_ready:
            from sessionbridge.store.schema import apply_postgres_migrations

            self.drop_database(TEMPLATE)
            _admin(self.dsn, f"CREATE DATABASE {TEMPLATE}")
            apply_postgres_migrations(with_database(self.dsn, TEMPLATE))
            self.template_ready = True
        return TEMPLATE

    @contextlib.contextmanager
    def database(self, migrated: bool) -> Iterator[str]:
        name = self.create_database(self.migrated_template() if migrated else None)
        try:
            yield with_database(self.dsn, name)
        finally:
            self.drop_database(name)

    def close(self) -> None:
        if self.local is not None:
            self.local.stop()
        elif self.template_ready:
            with contextlib.suppress(Exception):
                self.drop_database(TEMPLATE)


def _connect() -> Postgres:
    given = os.environ.get(ENV_SERVER)
    if given:
        try:
            _admin(given, "SELECT 1")
        except Exception as exc:
            raise NoPostgres(f"{ENV_SERVER} does not answer: {type(exc).__name__}: {exc}") from exc
        return Postgres(given, None)
    local = LocalServer.start()
    return Postgres(local.dsn, local)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Postgres]:
    """One PostgreSQL server for the whole test session (skips when there is none)."""
    try:
        server = _connect()
    except NoPostgres as exc:
        if os.environ.get(ENV_REQUIRE) == "1":
            pytest.fail(f"PostgreSQL is required ({ENV_REQUIRE}=1) but: {exc}")
        pytest.skip(f"no PostgreSQL server: {exc}")
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def postgres_dsn(postgres_server: Postgres) -> Iterator[str]:
    """The URL of a fresh, empty database of this test's own."""
    with postgres_server.database(migrated=False) as dsn:
        yield dsn


@pytest.fixture
def migrated_postgres_dsn(postgres_server: Postgres) -> Iterator[str]:
    """The URL of a fresh database of this test's own, with every migration applied."""
    with postgres_server.database(migrated=True) as dsn:
        yield dsn


@pytest.fixture
def own_postgres(postgres_server: Postgres) -> Iterator[LocalServer]:
    """A PostgreSQL server of this test's own, to stop and start under a bridge."""
    if postgres_server.local is None:
        pytest.skip(f"stopping the server given by {ENV_SERVER} is not ours to do")
    try:
        server = LocalServer.start()
    except NoPostgres as exc:
        pytest.skip(f"no second PostgreSQL server: {exc}")
    try:
        yield server
    finally:
        server.stop()

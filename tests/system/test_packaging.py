"""The bridge as a user installs it: a wheel built from the source tree, in a fresh venv.

Every other test runs from the editable install, which reads migrations and
modules straight from the checkout; only a built wheel shows what the package
really ships. The wheel is built from a clean copy of the committed tree
(``git archive HEAD``: no build/, egg-info, venv or uncommitted file can slip
in, and a module that was never committed is missed as a user would miss it),
installed into a venv outside the source tree, and driven through its own
console script as real processes.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import tomllib
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from setuptools import find_packages

from tests.processes import (
    UPSTREAM_PASSWORD,
    UPSTREAM_USER,
    Processes,
    bridge_env,
    clean_env,
    free_port,
    wait_http_ok,
)

pytestmark = pytest.mark.packaging

ROOT = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT = 300


@dataclass(frozen=True)
class Installed:
    source: Path  # the clean copy the wheel was built from
    venv: Path
    workdir: Path  # outside the source tree: nothing can be imported from the checkout

    @property
    def script(self) -> str:
        return str(self.venv / "bin" / "sessionbridge")

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.script, *args], capture_output=True, text=True, env=clean_env(),
            cwd=self.workdir, timeout=60,
        )


def clean_copy(destination: Path) -> Path:
    """The committed tree, exactly: what a clone would hold."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", "HEAD"],
        cwd=ROOT, capture_output=True, check=True, timeout=60,
    ).stdout
    destination.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(destination)], input=archive, check=True, timeout=60)
    return destination


def checked(args: list[str], cwd: Path) -> None:
    done = subprocess.run(
        args, capture_output=True, text=True, env=clean_env(), cwd=cwd, timeout=BUILD_TIMEOUT
    )
    assert done.returncode == 0, f"{args}\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a checkout to know which files the package is built from")
    base = tmp_path_factory.mktemp("packaging")
    source = clean_copy(base / "source")
    dist = base / "dist"
    checked([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(dist), str(source)],
            base)
    wheels = list(dist.glob("sessionbridge-*.whl"))
    assert len(wheels) == 1, wheels
    venv = base / "venv"
    checked([sys.executable, "-m", "venv", str(venv)], base)
    # Dependencies come from the package index through pip's cache.
    checked([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheels[0])],
            base)
    workdir = base / "work"
    workdir.mkdir()
    return Installed(source, venv, workdir)


def test_every_committed_subpackage_is_shipped(installed: Installed) -> None:
    tree = installed.source
    configured = tomllib.loads((tree / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {f"sessionbridge.{name}" for name in find_packages(str(tree / "src" / "sessionbridge"))}

    assert found | {"sessionbridge"} <= set(configured["packages"])


def test_the_installed_package_is_not_the_checkout(installed: Installed) -> None:
    done = subprocess.run(
        [installed.python, "-c",
         "import sessionbridge.store.schema as s; print(s.migrations_dir())"],
        capture_output=True, text=True, env=clean_env(), cwd=installed.workdir, timeout=60,
    )

    assert done.returncode == 0, done.stderr
    shipped = Path(done.stdout.strip()).parent  # migrations/, from migrations/sqlite/
    assert shipped.is_relative_to(installed.venv), shipped
    source = installed.source / "migrations"
    for folder in [source, *(sub for sub in source.iterdir() if sub.is_dir())]:
        in_wheel = shipped / folder.relative_to(source)
        assert sorted(p.name for p in in_wheel.glob("*.sql")) == sorted(
            p.name for p in folder.glob("*.sql")
        ), folder


async def test_installed_wheel_migrates_makes_a_key_and_serves_a_conversation(
    installed: Installed, procs: Processes, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    db = tmp_path / "bridge.db"
    migrated = installed.run("migrate", "--db", str(db))
    assert migrated.returncode == 0, migrated.stderr
    expected = len([p for p in (installed.source / "migrations" / "sqlite").glob("*.sql")
                    if not p.name.endswith(".rollback.sql")])
    assert f"applied {expected} migration(s)" in migrated.stdout
    with closing(sqlite3.connect(db)) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert {"api_keys", "chat_sessions", "messages"} <= tables

    created = installed.run("keys", "create", "web", "--db", str(db))
    assert created.returncode == 0, created.stderr
    token = created.stdout.rstrip("\n").splitlines()[-1]

    ai_port = free_port()
    ai = procs.start(
        "reference-ai", ["-m", "sessionbridge.reference.seed_server", "--port",
                         str(ai_port), "--user", UPSTREAM_USER, "--password", UPSTREAM_PASSWORD],
        clean_env(), program=installed.python,
    )
    ai_url = f"http://127.0.0.1:{ai_port}"
    await wait_http_ok(ai_url + "/health", ai)
    port = free_port()
    bridge = procs.start(
        "bridge", ["serve", "--port", str(port), "--db", str(db), "--upstream", ai_url],
        bridge_env(), program=installed.script,
    )
    base = f"http://127.0.0.1:{port}"
    await wait_http_ok(base + "/readyz", bridge)

    auth = {"Authorization": f"Bearer {token}"}
    async with http.post(base + "/v1/sessions", json={"scenario": "A tutor."},
                         headers=auth) as response:
        assert response.status == 201, await response.text()
        session_id = (await response.json())["id"]
    kinds = []
    for content in ("Hello!", "And tomorrow?"):
        async with http.post(f"{base}/v1/sessions/{session_id}/messages",
                             json={"content": content}, headers=auth) as response:
            assert response.status == 200, await response.text()
            kinds.append((await response.json())["ai_session"])
    async with http.get(f"{base}/v1/sessions/{session_id}/messages", headers=auth) as response:
        assert response.status == 200
        messages = (await response.json())["messages"]

    assert kinds == ["created", "reused"]
    assert [(m["seq"], m["role"], m["status"]) for m in messages] == [
        (1, "user", "answered"), (2, "assistant", "answered"),
        (3, "user", "answered"), (4, "assistant", "answered"),
    ]
    assert "Traceback" not in bridge.stderr()


def test_an_install_without_migrations_refuses_to_start(
    installed: Installed, tmp_path: Path
) -> None:
    broken = tmp_path / "venv"
    shutil.copytree(installed.venv, broken, symlinks=True)
    for shipped in broken.glob("lib/python*/site-packages/sessionbridge/migrations"):
        shutil.rmtree(shipped)
    script = str(broken / "bin" / "sessionbridge")
    db = str(tmp_path / "x.db")
    for command in (["keys", "create", "web"], ["migrate"],
                    ["serve", "--port", str(free_port()), "--upstream", "http://127.0.0.1:9"]):
        # The copied script names the original venv's python: run it with the copy's.
        done = subprocess.run(
            [str(broken / "bin" / "python"), script, *command, "--db", db],
            capture_output=True, text=True, env=clean_env(), cwd=installed.workdir, timeout=60,
        )

        assert done.returncode == 2, (command, done.stdout + done.stderr)
        assert "no sqlite migrations found" in done.stderr
        assert "Traceback" not in done.stderr

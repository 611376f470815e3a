"""The layering holds by imports: the conversation rules load no HTTP, no SQL, no migrations."""

from __future__ import annotations

import subprocess
import sys

import pytest

FORBIDDEN = ("aiohttp", "asyncpg", "aiosqlite", "yoyo", "psycopg", "sqlite3")


def loaded_after_import(module: str) -> list[str]:
    """The forbidden top-level modules a fresh interpreter holds after importing ``module``."""
    code = (
        f"import sys, {module}\n"
        f"print(','.join(m for m in {FORBIDDEN!r} if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return [name for name in done.stdout.strip().split(",") if name]


@pytest.mark.parametrize(
    "module",
    [
        "sessionbridge.conversation",
        "sessionbridge.errors",
        "sessionbridge.records",
        "sessionbridge.turn_events",
        "sessionbridge.upstream.base",
        "sessionbridge.store.base",
        "sessionbridge.store.coordination",
    ],
)
def test_the_core_imports_no_http_library_driver_or_migration_tool(module: str) -> None:
    assert loaded_after_import(module) == []


def test_the_store_package_loads_no_driver_until_a_backend_is_chosen() -> None:
    assert loaded_after_import("sessionbridge.store") == []


def test_a_check_that_can_fail_does_fail() -> None:
    # The probe itself sees a driver when one is imported.
    assert "aiosqlite" in loaded_after_import("sessionbridge.store.sqlite")

"""The shipped systemd unit: it verifies cleanly and keeps its hardening."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sessionbridge.config import Settings
from sessionbridge.web.connections import descriptor_reserve

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "sessionbridge.service"
INSTALLED_BINARY = "/opt/sessionbridge/.venv/bin/sessionbridge"

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def installed_copy(tmp_path: Path) -> Path:
    # verify checks that ExecStart exists: point it at this checkout's script,
    # as installing under /opt would.
    binary = Path(sys.executable).parent / "sessionbridge"
    unit = tmp_path / "sessionbridge.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED_BINARY, str(binary)))
    return unit


def directives() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            name, _, value = line.partition("=")
            found.setdefault(name.strip(), []).append(value.strip())
    return found


def test_unit_is_a_hardened_notify_service() -> None:
    unit = directives()

    assert unit["Type"] == ["notify"]
    assert unit["ExecStart"] == [f"{INSTALLED_BINARY} serve"]
    for name, value in {
        "DynamicUser": "yes",
        "StateDirectory": "sessionbridge",
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
    }.items():
        assert unit[name] == [value], name
    assert "AF_UNIX" in unit["RestrictAddressFamilies"][0]  # for NOTIFY_SOCKET
    assert unit["SystemCallFilter"][0] == "@system-service"
    assert unit["EnvironmentFile"], "secrets come from an environment file"
    assert not any("PASSWORD" in value for value in unit.get("Environment", []))


def test_descriptor_limit_leaves_room_for_the_connection_cap() -> None:
    settings = Settings()
    needed = settings.max_connections + descriptor_reserve(settings.max_inflight + 8)

    (limit,) = directives()["LimitNOFILE"]

    # Room for the whole default cap, and not so much that the cap means nothing.
    assert needed <= int(limit) <= 4 * needed


@needs_systemd_analyze
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(installed_copy(tmp_path))],
        capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""


@needs_systemd_analyze
def test_security_exposure_is_low(tmp_path: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(installed_copy(tmp_path))],
        capture_output=True, text=True, timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)

    assert match, result.stdout + result.stderr
    print(f"systemd-analyze security exposure: {match.group(1)}")
    assert float(match.group(1)) <= 2.0

"""The service manager's notify protocol: READY=1, STOPPING=1 and WATCHDOG=1 datagrams.

It is a few lines over a Unix datagram socket, so it is written here rather
than taken as a dependency. Without NOTIFY_SOCKET every call does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send one notification; return whether a service manager was there to get it."""
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("event=notify_failed state=%s error=%s", state.split("=")[0], exc)
        return False
    return True


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Half the watchdog period the service manager asked for, or None."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None


async def feed_watchdog(interval: float) -> None:
    """Ping the watchdog every ``interval`` seconds for as long as the event loop turns."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)

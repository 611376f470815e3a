"""What the real-model parts (real, responses, replicas) share when run by themselves."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from llama_server import LlamaServerFailed


def run_part_alone(
    name: str,
    measure: Callable[[Path], Awaitable[dict[str, Any]]],
    print_report: Callable[[dict[str, Any]], None],
) -> tuple[int, dict[str, Any] | None]:
    """Run one part by itself (``python bench/<part>.py``): its exit status and figures.

    The work folder goes afterwards unless KEEP_WORKDIR is set.
    """
    workdir = Path(tempfile.mkdtemp(prefix=f"sessionbridge-{name.replace(' ', '-')}-"))
    try:
        result = asyncio.run(measure(workdir))
    except (LlamaServerFailed, RuntimeError, OSError, aiohttp.ClientError) as exc:
        print(f"{name}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1, None
    finally:
        if os.environ.get("KEEP_WORKDIR"):
            print(f"work folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print_report(result)
    return 0, result

"""llama.cpp slot files: one per conversation, bounded in number, removed with their session.

llama.cpp's server writes a slot's prompt cache to ``--slot-save-path`` on
``POST /slots/{id}?action=save`` and reads it back on ``action=restore``; a
restart of the server keeps these files while its memory is lost. The bridge
names each file after its conversation's id, so no conversation can ever be
given another's cache, and sees the same folder (``slot_dir``) so that it can
remove a deleted conversation's file and keep at most ``slot_files`` of them
(a file is the slot's tokens' cache: megabytes each).

With several replicas (``replicas.py``) each keeps its own files, named with
the replica's id as well (``sessionbridge-<session id>.<replica id>.slot``)
and bounded per replica: a file holds what that replica computed.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = "sessionbridge-"
SUFFIX = ".slot"
_SAFE = re.compile(r"[0-9a-f-]{36}")
_REPLICA = re.compile(r"[0-9a-f]{1,16}")


class SlotFiles:
    def __init__(self, folder: str, keep: int, replica: str = "") -> None:
        self._folder = Path(folder)
        self._keep = keep
        if replica and not _REPLICA.fullmatch(replica):
            raise ValueError(f"not a replica id: {replica!r}")
        self._tag = f".{replica}" if replica else ""

    def filename(self, session_id: str) -> str:
        # Session ids are UUIDs; anything else never names a file.
        if not _SAFE.fullmatch(session_id):
            raise ValueError(f"not a session id: {session_id!r}")
        return f"{PREFIX}{session_id}{self._tag}{SUFFIX}"

    def exists(self, filename: str) -> bool:
        return (self._folder / filename).is_file()

    def saved(self, filename: str) -> None:
        """A file was written: drop the oldest beyond the bound."""
        files = sorted(
            # This replica's files only (the pattern spells the session id's length).
            (entry for entry in self._folder.glob(f"{PREFIX}{'?' * 36}{self._tag}{SUFFIX}")
             if entry.is_file()),
            key=lambda entry: entry.stat().st_mtime,
        )
        for stale in files[: max(len(files) - self._keep, 0)]:
            if stale.name != filename:
                self._unlink(stale)

    def remove(self, filename: str) -> None:
        self._unlink(self._folder / filename)

    @staticmethod
    def _unlink(path: Path) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("event=slot_file_not_removed file=%s error=%s", path.name, exc)

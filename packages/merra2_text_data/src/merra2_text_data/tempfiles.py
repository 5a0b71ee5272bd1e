"""Temporary siblings of atomic writes on a local disk, named after their writer, and the removal of dead writers' ones.

An atomic local write goes to `<path>.tmp-<host>-<pid>-<random>` and is then renamed onto `<path>`. A writer killed
in between (`kill -9`, a crash, a power cut) leaves that sibling behind. `remove_stale_temps` deletes the siblings
whose writer ran on this host and is no longer alive, and never touches those of a live process or another host (a
folder shared over NFS), so a rerun cleans up after the dead build without racing a running one.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import uuid
from pathlib import Path

__all__ = ["is_stale_temp", "remove_stale_temps", "temp_sibling"]

logger = logging.getLogger(__name__)

_TEMP_RE = re.compile(r"\.tmp-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-(?P<tag>[0-9a-f]{8})$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def temp_sibling(path: str) -> str:
    """A fresh temporary name next to `path` that records this host and process."""
    return f"{path}.tmp-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def is_stale_temp(name: str) -> bool:
    """True for a `temp_sibling` name written on this host by a process that is no longer alive."""
    match = _TEMP_RE.search(name)
    if match is None or match["host"] != _host():
        return False
    pid = int(match["pid"])
    return pid != os.getpid() and not _alive(pid)


def remove_stale_temps(folder: str | Path, recursive: bool = True) -> list[str]:
    """Delete the stale temporary files and folders (`is_stale_temp`) under a local folder.

    Args:
        folder: a local folder (a missing one is fine).
        recursive: also look in sub-folders.

    Returns:
        The paths removed.
    """
    removed: list[str] = []
    root = Path(folder)
    if not root.is_dir():
        return removed
    for entry in sorted(root.iterdir()):
        if is_stale_temp(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(str(entry))
        elif recursive and entry.is_dir() and not entry.is_symlink():
            removed += remove_stale_temps(entry, recursive=True)
    if removed:
        logger.info("removed %d temporary file(s) of dead writers under %s", len(removed), root)
    return removed

"""One run per output folder: ``<run>/run.lock`` names the process (pid, host) writing there.

Two runs into one folder would delete each other's checkpoints. The lock file appears whole or not at
all (written aside, then hard-linked into place, which fails if it exists, also on NFS). A second run
is refused with a ``ValueError`` naming the holder; a lock left by a process that is gone (same host,
pid not running) is taken over. A lock of another host cannot be checked from here: it is honoured.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from .checkpoint import writing

LOCK = "run.lock"


def _alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:         # a process of another user
        return True
    return True


def _holder(path: Path) -> tuple[str, dict | None] | None:
    """(text, parsed lock or None if it is not one) of the lock at ``path``; None if there is none."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return text, None
    return text, holder if isinstance(holder, dict) and {"pid", "host"} <= set(holder) else None


def _remove_if_unchanged(path: Path, text: str) -> None:
    """Remove the lock at ``path`` if it still reads ``text`` (moved aside first, so a lock another process
    took meanwhile is put back rather than lost)."""
    aside = path.with_name(f"{LOCK}.stale.{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if aside.read_text() != text:
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
    aside.unlink()


def acquire_run_lock(folder: str | Path) -> Path:
    """Hold ``folder`` for this process until ``release_run_lock``; the lock file's path.

    A ``ValueError`` naming the holder if another live process holds it; an ``OSError`` naming the
    file if the folder cannot be written."""
    folder = Path(folder)
    path, mine = folder / LOCK, {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    draft = folder / f"{LOCK}.{os.getpid()}.tmp"
    with writing(draft):
        folder.mkdir(parents=True, exist_ok=True)
        draft.write_text(json.dumps(mine))
    try:
        for _ in range(10):
            try:
                os.link(draft, path)
                return path
            except FileExistsError:
                pass
            held = _holder(path)
            if held is None:                # released meanwhile
                continue
            text, holder = held
            if holder is None or _alive(holder):
                who = (f"process {holder['pid']} on {holder['host']}" if holder
                       else f"an unreadable lock file ({text[:80]!r})")
                raise ValueError(f"run.output_dir {folder} is in use by {who} ({path}): wait for that run to end "
                                 f"or set run.output_dir to another folder (delete {path} only if no run uses it)")
            print(f"{path}: taking over the lock of process {holder['pid']}, which is no longer running")
            _remove_if_unchanged(path, text)
        raise ValueError(f"could not take the lock {path}: other processes keep taking it")
    finally:
        draft.unlink(missing_ok=True)


def release_run_lock(path: Path) -> None:
    """Remove the lock file ``acquire_run_lock`` returned, if this process still holds it."""
    held = _holder(path)
    if held and held[1] and held[1]["pid"] == os.getpid() and held[1]["host"] == socket.gethostname():
        path.unlink(missing_ok=True)

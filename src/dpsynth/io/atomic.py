"""Atomic outputs: a stage builds its output next to the target and renames it
into place, so a crash never leaves a half artifact that a later stage or DVC
would take as done (DESIGN.md "Artifacts").

A SIGKILL runs no cleanup, so a killed writer's temporary (or moved-aside old)
folder stays behind. Its name says who wrote it (process id, host), and the next
successful publish of the same target removes those whose writer is gone.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any, Iterator

# a short tag of this machine: a process id means something only on its own host
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _sibling(target: Path, kind: str) -> Path:
    """`.<name>.<kind>-<random>-<pid>-<host>` beside `target`: hidden, unique, and
    naming its writer, so that a later writer can tell it from a live one's."""
    return target.parent / f".{target.name}.{kind}-{uuid.uuid4().hex[:8]}-{os.getpid()}-{_HOST}"


def _writer_gone(path: Path, target: Path) -> bool:
    """Whether `path` is a temporary or old folder of `target` whose writer died.

    Only a writer on this host can be asked; another machine's (a shared disk),
    names that carry no writer, and this process's own (nested `atomic_dir`
    calls on one target) are left alone."""
    pattern = rf"\.{re.escape(target.name)}\.(?:tmp|old)-[0-9a-f]{{8}}-(\d+)-([0-9a-f]{{8}})"
    m = re.fullmatch(pattern, path.name)
    if m is None or m[2] != _HOST or int(m[1]) == os.getpid():
        return False
    try:
        os.kill(int(m[1]), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, as another user's process
        return False
    return False


def _remove_stale(target: Path) -> None:
    """Remove the temporary and moved-aside folders of `target` left by writers
    that died (SIGKILL, OOM kill, power loss: no cleanup code ran)."""
    for path in target.parent.glob(f".{glob.escape(target.name)}.*"):
        if _writer_gone(path, target):
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces `target` on success.

    On an exception the temporary folder is removed and `target` is untouched.
    On success, what killed writers of `target` left behind is removed too.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(target, "tmp")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = _sibling(target, "old")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    # a resumed stage is usually the one whose killed attempt left these
    _remove_stale(target)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file, fsync and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())

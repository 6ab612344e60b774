"""One run per output: `.<name>.lock` beside the output directory, held for the run, stale when its process is gone.

The lock file holds the holder's pid, host, start time and the kernel's start tick of that pid (Linux
/proc/<pid>/stat field 22), so a recycled pid is not mistaken for the holder. A lock from another host cannot be
checked and is treated as held (the message says how to remove it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from ..core.errors import ConfigError

log = logging.getLogger(__name__)


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def start_tick(pid: int) -> str:
    """When process pid started, in clock ticks since boot (/proc/<pid>/stat field 22; "" where unreadable): with the
    pid, it tells a live lock holder from a recycled pid. A lock file records its writer's."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _held(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True
    pid = int(holder.get("pid", 0))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not holder.get("tick") or start_tick(pid) == holder["tick"]


def _age(p: Path) -> float:
    try:
        return time.time() - p.stat().st_mtime
    except OSError:
        return 0.0


# A lock file without its JSON is one being written this instant, or one whose writer was killed between creating
# and writing it (a SIGKILL in that microsecond): it is waited for until it is this many seconds old, then stale.
EMPTY_LOCK_GRACE_S = 5.0


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[Path]:
    """Hold out's lock for the with-block; a live holder is a one-line ConfigError naming it. An empty lock is waited
    for (at most EMPTY_LOCK_GRACE_S + 1 seconds in all), then removed as stale."""
    lock = lock_path(out)
    created = [p for p in (lock.parent, *lock.parent.parents) if not p.exists()]
    lock.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + EMPTY_LOCK_GRACE_S + 1
    while time.monotonic() < deadline:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
            except (OSError, ValueError):
                holder = {}
            if not holder and _age(lock) < EMPTY_LOCK_GRACE_S:  # being written, or its writer was killed: wait
                time.sleep(0.2)
                continue
            if holder and _held(holder):
                raise ConfigError(f"{out} is being written by another inf-quant run (pid {holder.get('pid')} on "
                                  f"{holder.get('host')}, since {holder.get('started')}); wait for it or choose "
                                  f"another output (if that run is gone, delete {lock})") from None
            log.info("removing the stale lock %s (its run, pid %s, is gone)", lock, holder.get("pid"))
            lock.unlink(missing_ok=True)
    else:
        raise ConfigError(f"{lock}: cannot take the output lock; delete it if no inf-quant run is writing {out}")
    pid = os.getpid()
    os.write(fd, json.dumps({"pid": pid, "host": socket.gethostname(), "tick": start_tick(pid),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
    os.close(fd)
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)
        for p in created:  # parents made only for the lock, left empty by a failed run
            with contextlib.suppress(OSError):
                p.rmdir()

"""Child processes that die with their parent: bench workers and torchrun ranks must not go on writing
results after the command that started them was killed (kill -9, an OOM kill, a closed terminal).

Two mechanisms, both cheap: on Linux ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` asks the kernel to signal this
process when its parent dies; and a daemon thread polls a named ancestor (``WATCH_ENV``: the pid of the
command the user ran, which may be the grandparent, e.g. above the torchrun agent) once a second.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

WATCH_ENV = "PROMPTDELTA_WATCH_PID"
_PR_SET_PDEATHSIG = 1


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # it exists, owned by another user
        pass
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):    # no /proc (not Linux): os.kill said it exists
        return True


def _set_pdeathsig(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(pid: int, interval: float) -> None:
    while pid_alive(pid):
        time.sleep(interval)
    logger.warning("the process %d that started this one is gone; stopping", pid)
    os.kill(os.getpid(), signal.SIGTERM)


def die_with_parent(watch_pid: int | None = None, interval: float = 1.0) -> None:
    """Make this process end (SIGTERM) when its parent dies, or when ``watch_pid`` (default: the pid in
    ``$PROMPTDELTA_WATCH_PID``, if set) is gone."""
    _set_pdeathsig(signal.SIGTERM)     # a parent that died before this call is caught by the watch below
    if watch_pid is None and os.environ.get(WATCH_ENV, "").isdigit():
        watch_pid = int(os.environ[WATCH_ENV])
    if watch_pid is not None and watch_pid != os.getpid():
        threading.Thread(target=_watch, args=(watch_pid, interval), daemon=True,
                         name="promptdelta-parent-watch").start()

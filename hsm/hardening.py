"""Process hardening while the daemon may hold keys.

The master key lives in this process's memory once unsealed; a core dump
would write it to disk. We set the core-file limit to zero and, on Linux,
mark the process non-dumpable (prctl PR_SET_DUMPABLE 0), which also stops
unprivileged ptrace attach by the same user. Root can still read memory:
README's threat model says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import resource
import signal
import sys

_PR_SET_PDEATHSIG = 1
_PR_GET_PDEATHSIG = 2
_PR_SET_DUMPABLE = 4
_PR_GET_DUMPABLE = 3

log = logging.getLogger(__name__)


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name, use_errno=True) if name else None


def refuse_core_dumps() -> bool:
    """Disable core files and make the process non-dumpable; True if both took."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc = _libc()
    if libc is None:
        log.warning("cannot mark the process non-dumpable on this platform")
        return False
    if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_DUMPABLE, 0) failed, errno %d", ctypes.get_errno())
        return False
    return is_non_dumpable()


def is_non_dumpable() -> bool:
    """Whether the kernel considers this process non-dumpable and core files are off."""
    libc = _libc()
    dumpable = libc.prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0) if libc is not None else 1
    return dumpable == 0 and resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)


def die_with_parent(parent: int) -> bool:
    """Be killed (SIGKILL) when the parent process ends; False if that cannot be arranged.

    For `server run`'s worker processes (hsm/services/worker.py): a worker
    holds tenant keys and must not outlive the daemon that gave them. The
    parent may have ended before the request took effect, so the parent's
    pid is checked afterwards.
    """
    libc = _libc()
    if libc is None:
        return False
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed, errno %d", ctypes.get_errno())
        return False
    return os.getppid() == parent


def parent_death_signal() -> int:
    """The signal this process gets when its parent ends (0: none)."""
    libc = _libc()
    if libc is None:
        return 0
    value = ctypes.c_int(0)
    libc.prctl(_PR_GET_PDEATHSIG, ctypes.byref(value), 0, 0, 0)
    return value.value

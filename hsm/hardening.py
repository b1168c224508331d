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
import resource
import sys

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

"""The daemon's governance core: one replica of the key-custody service over one store.

`Daemon` (daemon.py) composes the parts; see its module docstring for the map.
"""

from keyquorum.hsm.daemon.ceremony import EncryptedShareView, origin_for
from keyquorum.hsm.daemon.daemon import Daemon
from keyquorum.hsm.daemon.unseal import Progress, SessionView
from keyquorum.hsm.daemon.views import (
    CustodianView,
    ProposalView,
    StatusView,
    TenantView,
    VerdictView,
)

__all__ = [
    "CustodianView",
    "Daemon",
    "EncryptedShareView",
    "Progress",
    "ProposalView",
    "SessionView",
    "StatusView",
    "TenantView",
    "VerdictView",
    "origin_for",
]

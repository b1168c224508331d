"""The daemon's governance core: one replica of the key-custody service over one store."""

from keyquorum.hsm.daemon.core import (
    CustodianView,
    Daemon,
    EncryptedShareView,
    Progress,
    ProposalView,
    SessionView,
    StatusView,
    TenantView,
    VerdictView,
    origin_for,
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

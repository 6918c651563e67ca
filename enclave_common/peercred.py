"""Who is on the other end of a Unix socket: SO_PEERCRED and SO_PEERGROUPS.

The kernel fills ``struct ucred {pid_t pid; uid_t uid; gid_t gid;}`` for a connected
Unix socket with the credentials the peer had when it called connect(); the peer
cannot forge them. Mechanics only: the agent decides who may call it
(``enclave_agent.runtime.peercred``), both processes count shares per uid.
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass
from typing import Protocol

_UCRED = struct.Struct("iII")  # pid_t (signed), uid_t, gid_t
# Linux's value; the socket module exposes it on Linux, the fallback keeps mypy and
# other platforms honest about where it comes from.
SO_PEERCRED = getattr(socket, "SO_PEERCRED", 17)
# Linux 4.13+: the peer's supplementary groups as of connect(); Python has no name for it.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_GID = struct.Struct("I")
_MAX_GROUPS = 65536  # NGROUPS_MAX


class PeerCredError(OSError):
    """The kernel gave no credentials (not a Unix socket, or the peer is gone)."""


class _HasGetsockopt(Protocol):
    def getsockopt(self, level: int, optname: int, buflen: int) -> bytes: ...


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()  # supplementary groups (empty if unknown)


def peer_credentials(sock: _HasGetsockopt) -> PeerCred:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERCRED, _UCRED.size)
    except OSError as exc:
        raise PeerCredError(exc.errno, f"SO_PEERCRED failed: {exc.strerror}") from exc
    if len(raw) != _UCRED.size:
        raise PeerCredError(f"SO_PEERCRED returned {len(raw)} bytes, expected {_UCRED.size}")
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCred(pid=pid, uid=uid, gid=gid, groups=peer_groups(sock))


def peer_groups(sock: _HasGetsockopt) -> frozenset[int]:
    """The peer's supplementary groups (SO_PEERGROUPS); empty where the kernel has
    none to give, so a gid rule then matches the primary gid only (fails closed)."""
    for count in (64, _MAX_GROUPS):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, count * _GID.size)
        except OSError as exc:
            if exc.errno == errno.ERANGE:  # more groups than the buffer holds
                continue
            return frozenset()
        usable = len(raw) - len(raw) % _GID.size
        return frozenset(gid for (gid,) in _GID.iter_unpack(raw[:usable]))
    return frozenset()

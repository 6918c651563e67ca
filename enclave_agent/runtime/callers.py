"""Who is calling, on each listener, decided before a byte of the request is read.

- Unix socket: the kernel's SO_PEERCRED (uid, gid, pid) and SO_PEERGROUPS.
- TCP listener, checked (the default): the kernel's inet_diag names the uid owning
  the client's socket (``enclave_common.tcp_peercred``: exact 4-tuple, ESTABLISHED);
  its groups come from the group database (``peercred.is_uid_allowed``). A
  connection the kernel cannot attribute (gone already, no such socket, a wrong or
  no answer) is refused, never guessed.
- TCP listener, open (``[listen] tcp_open = true`` on a kernel that cannot name
  callers): every connection is one shared caller, ``TCP_CALLERS``, allowed.

Either listener applies the same ``[access]`` rules, and a refused caller gets the
same ``AccessDeniedException`` and a ``caller_refused`` log event naming the listener.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import trio

from enclave_agent.runtime.admission import TCP_CALLERS, UNKNOWN_CALLER, Caller
from enclave_agent.runtime.config import AccessConfig
from enclave_agent.runtime.peercred import is_allowed, is_uid_allowed
from enclave_common.address import describe_peer
from enclave_common.inet_diag import NotAttributed
from enclave_common.logs import get_logger
from enclave_common.peercred import PeerCredError, peer_credentials
from enclave_common.tcp_peercred import Query, tcp_peer_uid

log = get_logger()


class Callers(enum.Enum):
    """How a listener knows its callers."""

    UNIX = "unix"  # SO_PEERCRED
    TCP = "tcp"  # inet_diag: the uid owning the client's socket
    TCP_OPEN = "tcp_open"  # not at all: one shared caller


@dataclass(frozen=True)
class Identified:
    caller: Caller  # whose shares the connection counts against
    allowed: bool
    peer: str  # for the logs


async def identify(
    stream: trio.SocketStream, callers: Callers, access: AccessConfig, query: Query
) -> Identified:
    if callers is Callers.UNIX:
        try:
            cred = peer_credentials(stream.socket)
        except PeerCredError:
            log.warning("caller_refused", listener="unix", reason="no SO_PEERCRED")
            return Identified(UNKNOWN_CALLER, False, describe_peer(stream))
        allowed = is_allowed(cred, access)
        if not allowed:
            log.warning("caller_refused", listener="unix", uid=cred.uid, gid=cred.gid, pid=cred.pid)
        return Identified(cred.uid, allowed, f"uid={cred.uid},pid={cred.pid}")
    peer = describe_peer(stream)
    if callers is Callers.TCP_OPEN:
        return Identified(TCP_CALLERS, True, peer)
    try:
        uid = await tcp_peer_uid(stream.socket, query=query)
    except NotAttributed as exc:
        log.warning("caller_refused", listener="tcp", peer=peer, reason=exc.reason)
        return Identified(UNKNOWN_CALLER, False, peer)
    try:
        # The group database may be NSS (blocking): off the event loop.
        allowed = await trio.to_thread.run_sync(is_uid_allowed, uid, access)
    except OSError as exc:
        log.warning("caller_refused", listener="tcp", uid=uid, peer=peer, reason=str(exc))
        return Identified(uid, False, f"uid={uid},{peer}")
    if not allowed:
        log.warning("caller_refused", listener="tcp", uid=uid, peer=peer)
    return Identified(uid, allowed, f"uid={uid},{peer}")

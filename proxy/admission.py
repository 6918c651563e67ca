"""Each peer's share of the proxy, so one enclave can never cost another its service.

Policy lives here (what a peer is, which limits apply); the counting is
``enclave_common.shares``, the raw refusal the driver's (``admit_by_shares``). The rule:

- A peer is its CID on vsock, its address on tcp, its uid on unix (SO_PEERCRED).
- Every connection holds one of its peer's ``max_tunnels_per_peer`` shares, and one
  of the ``max_tunnels`` of all peers, from accept until it closes, whatever it does
  meanwhile: waiting for its request head, being answered, carrying a tunnel. A peer
  that opens idle or slow connections (and re-opens them as they are closed) uses up
  its own share and nothing more; the config keeps ``max_tunnels_per_peer`` below
  ``max_tunnels``. Every peer is sure of its whole share while ``max_tunnels`` is at
  least ``max_tunnels_per_peer`` times the number of peers.
- A connection over a limit is refused at once, before any of its bytes is read:
  503 naming the limit, and a ``connection_refused`` log event.
- The refusal then reads what the client still sends for a moment (so a reset does
  not eat the answer), but only for ``_LINGERING_PER_PEER`` refusals per peer and
  ``_LINGERING`` in all at once; the others are closed right after the answer. A
  flood of refused connections so holds a bounded number of descriptors.
"""

from __future__ import annotations

import socket
from contextlib import AbstractAsyncContextManager
from functools import partial
from typing import Protocol

from enclave_common.address import parse_ip
from enclave_common.http_server import Answer, admit_by_shares
from enclave_common.logs import get_logger
from enclave_common.peercred import PeerCredError, peer_credentials
from enclave_common.shares import ShareRefused, Shares

from .answers import error_answer
from .config import ProxyConfig

PeerKey = tuple[str, int | str | None]  # ("cid", 16), ("address", "127.0.0.2"), ("uid", 0)

_LINGERING_PER_PEER = 16
_LINGERING = 64

log = get_logger()


class _Socket(Protocol):
    @property
    def family(self) -> int: ...

    def getpeername(self) -> object: ...

    def getsockopt(self, level: int, optname: int, buflen: int) -> bytes: ...


def peer_key(sock: _Socket) -> PeerKey:
    if sock.family == socket.AF_UNIX:
        try:
            return ("uid", peer_credentials(sock).uid)
        except PeerCredError:
            return ("uid", None)
    try:
        peer = sock.getpeername()
    except OSError:
        return ("unknown", None)
    assert isinstance(peer, tuple)
    if sock.family == getattr(socket, "AF_VSOCK", -1):
        return ("cid", int(peer[0]))
    # One address, one peer, however it is spelt (an IPv4-mapped IPv6 peer included).
    address = parse_ip(str(peer[0]))
    return ("address", str(address) if address is not None else str(peer[0]))


def describe(key: PeerKey) -> str:
    kind, value = key
    name = {"cid": "CID", "uid": "uid"}.get(kind, "peer")
    return f"{name} {'unknown' if value is None else value}"


def enclave_name(key: PeerKey) -> str:
    """An enclave's name in logs and labels: ``cid:16`` (``tcp:ADDRESS``, ``uid:N``)."""
    kind, value = key
    prefix = {"cid": "cid", "uid": "uid", "address": "tcp"}.get(kind, kind)
    return f"{prefix}:{'unknown' if value is None else value}"


def _refused(key: PeerKey, refused: ShareRefused) -> Answer:
    limit = "max_tunnels" if refused.whole else "max_tunnels_per_peer"
    log.warning("connection_refused", peer=describe(key), limit=limit)
    if refused.whole:
        return error_answer(503, f"over the connection limit ({refused.limit}, {limit})")
    return error_answer(
        503,
        f"over the connection limit: {describe(key)} has {refused.limit} connections "
        f"open, its whole share ({limit})",
    )


class Admission:
    def __init__(self, config: ProxyConfig) -> None:
        self._connections: Shares[PeerKey] = Shares(config.max_tunnels_per_peer, config.max_tunnels)
        self._lingering: Shares[PeerKey] = Shares(_LINGERING_PER_PEER, _LINGERING)

    def admit(self, key: PeerKey) -> AbstractAsyncContextManager[Answer | None]:
        """The driver's ``admit``: one of the peer's connections, or a 503 at once."""
        return admit_by_shares(key, self._connections, self._lingering, partial(_refused, key))

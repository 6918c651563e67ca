"""Who owns the other end of a loopback TCP connection: the inet_diag codec (pure).

The kernel's NETLINK_SOCK_DIAG family answers "which socket has this 4-tuple, and
whose is it" (what ``ss -e`` prints as ``uid:``). This module builds the question
and reads the answer; it does no I/O (``enclave_common.tcp_peercred`` sends it).
Every answer is read as untrusted bytes: anything malformed is ``DiagError``, and
``owner_uid`` names a uid only when the answer is exactly the socket asked about.

The layouts, from the kernel's uapi headers (host byte order unless noted):

- ``linux/netlink.h``: ``struct nlmsghdr {u32 nlmsg_len; u16 nlmsg_type; u16
  nlmsg_flags; u32 nlmsg_seq; u32 nlmsg_pid}`` (16 bytes); messages start at
  4-byte boundaries (``NLMSG_ALIGNTO``); ``nlmsg_len`` counts the header. Types
  ``NLMSG_NOOP`` 1, ``NLMSG_ERROR`` 2 (payload ``struct nlmsgerr {int error;
  struct nlmsghdr msg}``, error 0 is an acknowledgement, else ``-errno``),
  ``NLMSG_DONE`` 3 (ends a multipart answer; its payload, when present, is an int
  error), ``NLMSG_OVERRUN`` 4. Flags ``NLM_F_REQUEST`` 1, ``NLM_F_MULTI`` 2.
- ``linux/sock_diag.h``: ``SOCK_DIAG_BY_FAMILY`` 20, the type of the question and
  of each socket in the answer; ``NETLINK_SOCK_DIAG`` is 4 (``linux/netlink.h``).
- ``linux/inet_diag.h``: ``struct inet_diag_sockid {__be16 idiag_sport, idiag_dport;
  __be32 idiag_src[4], idiag_dst[4]; u32 idiag_if; u32 idiag_cookie[2]}`` (48
  bytes; an IPv4 address fills the first word); ``INET_DIAG_NOCOOKIE`` ~0U.
  ``struct inet_diag_req_v2 {u8 sdiag_family, sdiag_protocol, idiag_ext, pad; u32
  idiag_states; struct inet_diag_sockid id}`` (56 bytes). ``struct inet_diag_msg
  {u8 idiag_family, idiag_state, idiag_timer, idiag_retrans; struct
  inet_diag_sockid id; u32 idiag_expires, idiag_rqueue, idiag_wqueue, idiag_uid,
  idiag_inode}`` (72 bytes), then attributes this module does not ask for.
- ``TCP_ESTABLISHED`` is 1 (``netinet/tcp.h``; the kernel's ``enum tcp_state``).

The question is the exact lookup (no ``NLM_F_DUMP``): the kernel finds the one
socket whose local end is ``idiag_src``/``idiag_sport`` and remote end
``idiag_dst``/``idiag_dport`` and answers it alone, or ``NLMSG_ERROR`` with
``ENOENT``. We ask for the *connecting* side's socket: source = the client's
address and port (our peer), destination = our listener's (our local end).

Why the attribution rules are strict (``owner_uid``):
- Only ``ESTABLISHED``: once its owner closes it, a socket lingers ownerless
  (FIN_WAIT, TIME_WAIT) and the kernel reports such sockets as uid 0 with inode 0,
  that is: as root. An answer for a socket that is not established, or has no
  inode, names nobody.
- Only the exact 4-tuple: an answer about any other socket (or a second, different
  socket) is not evidence about this connection; it is refused, never guessed.
- While the agent holds its accepted end open, no other connection can have the
  same 4-tuple (the kernel would deliver its packets to ours), so an ESTABLISHED
  socket with that 4-tuple is the client's.
- The uid is the socket's owner: who created it (as SO_PEERCRED reports who
  connected); a process that received the descriptor from another is its creator.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass, field

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
TCP_ESTABLISHED = 1
_NOCOOKIE = 0xFFFFFFFF
_ALIGN = 4

_NLMSGHDR = struct.Struct("=IHHII")
_REQ_HEAD = struct.Struct("=BBBBI")  # family, protocol, ext, pad, states
_MSG_HEAD = struct.Struct("=BBBB")  # family, state, timer, retrans
_PORTS = struct.Struct(">HH")  # sport, dport (network order)
_SOCKID_TAIL = struct.Struct("=III")  # if, cookie[2]
_MSG_TAIL = struct.Struct("=IIIII")  # expires, rqueue, wqueue, uid, inode
_SOCKID_SIZE = _PORTS.size + 32 + _SOCKID_TAIL.size  # 48
_MSG_SIZE = _MSG_HEAD.size + _SOCKID_SIZE + _MSG_TAIL.size  # 72
_ERROR = struct.Struct("=i")
# The kernel's tcp_states, for messages that name the state a socket was found in.
_STATES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
    12: "NEW_SYN_RECV",
}

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class DiagError(ValueError):
    """The bytes are not a well-formed answer to our question."""


class NotAttributed(Exception):
    """The answer names no owner for the connection; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Endpoint:
    """One end of a TCP connection. An IPv4-mapped IPv6 address is kept as IPv4:
    an IPv6 client of an IPv4 listener is reported with mapped addresses."""

    address: Address
    port: int

    @classmethod
    def of(cls, host: str | bytes | Address, port: int) -> Endpoint:
        address = ipaddress.ip_address(host)  # packed bytes: 4 for IPv4, 16 for IPv6
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port {port} out of range")
        return cls(address, port)

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class FourTuple:
    """The connecting side's socket as the kernel names it: source is the client's
    end (our peer), destination our listener's end (our local address)."""

    source: Endpoint
    destination: Endpoint

    @property
    def family(self) -> int:
        both = (self.source.address.version, self.destination.address.version)
        if both == (4, 4):
            return socket.AF_INET
        if both == (6, 6):
            return socket.AF_INET6
        raise ValueError(f"a connection between {self.source} and {self.destination}?")

    def __str__(self) -> str:
        return f"{self.source}->{self.destination}"


@dataclass(frozen=True)
class DiagSocket:
    """One ``inet_diag_msg``: a socket the kernel described."""

    family: int
    state: int
    source: Endpoint
    destination: Endpoint
    uid: int
    inode: int


def request(connection: FourTuple, seq: int) -> bytes:
    """The exact-lookup question for the connecting side's socket of ``connection``."""
    family = connection.family
    sockid = (
        _PORTS.pack(connection.source.port, connection.destination.port)
        + _packed(connection.source.address, family)
        + _packed(connection.destination.address, family)
        + _SOCKID_TAIL.pack(0, _NOCOOKIE, _NOCOOKIE)
    )
    body = _REQ_HEAD.pack(family, socket.IPPROTO_TCP, 0, 0, 1 << TCP_ESTABLISHED) + sockid
    head = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq, 0)
    return head + body


def _packed(address: Address, family: int) -> bytes:
    return address.packed.ljust(16, b"\0") if family == socket.AF_INET else address.packed


@dataclass
class Answer:
    """The kernel's answer to the question numbered ``seq``, fed datagram by
    datagram until ``done``: the sockets it named, or the errno it gave."""

    seq: int
    sockets: list[DiagSocket] = field(default_factory=list)
    error: int | None = None
    done: bool = False

    def feed(self, datagram: bytes) -> None:
        """Read one datagram; ``DiagError`` if it is not a well-formed part of the answer."""
        if self.done:
            raise DiagError("more messages after the end of the answer")
        offset = 0
        while offset < len(datagram):
            if self.done:
                raise DiagError("more messages after the end of the answer")
            if len(datagram) - offset < _NLMSGHDR.size:
                raise DiagError(f"{len(datagram) - offset} bytes left, too short for a header")
            length, kind, flags, seq, _pid = _NLMSGHDR.unpack_from(datagram, offset)
            if length < _NLMSGHDR.size or length > len(datagram) - offset:
                raise DiagError(f"message length {length} does not fit the datagram")
            if seq != self.seq:
                raise DiagError(f"an answer to question {seq}, not {self.seq}")
            self._message(kind, flags, datagram[offset + _NLMSGHDR.size : offset + length])
            offset += (length + _ALIGN - 1) & ~(_ALIGN - 1)

    def _message(self, kind: int, flags: int, payload: bytes) -> None:
        if kind == NLMSG_NOOP:
            return
        if kind in (NLMSG_ERROR, NLMSG_DONE):
            if kind == NLMSG_ERROR and len(payload) < _ERROR.size:
                raise DiagError("NLMSG_ERROR without its error code")
            code = _ERROR.unpack_from(payload)[0] if len(payload) >= _ERROR.size else 0
            if code > 0:
                raise DiagError(f"error code {code} is not a negative errno")
            self.error = -code or None
            self.done = True
            return
        if kind != SOCK_DIAG_BY_FAMILY:
            raise DiagError(f"unexpected message type {kind}")
        self.sockets.append(_socket(payload))
        if not flags & NLM_F_MULTI:
            self.done = True  # the exact lookup's single answer


def _socket(payload: bytes) -> DiagSocket:
    if len(payload) < _MSG_SIZE:
        raise DiagError(f"inet_diag_msg of {len(payload)} bytes, expected {_MSG_SIZE}")
    family, state, _timer, _retrans = _MSG_HEAD.unpack_from(payload)
    if family == socket.AF_INET:
        size = 4
    elif family == socket.AF_INET6:
        size = 16
    else:
        raise DiagError(f"address family {family} is neither AF_INET nor AF_INET6")
    at = _MSG_HEAD.size
    sport, dport = _PORTS.unpack_from(payload, at)
    src = payload[at + 4 : at + 4 + size]
    dst = payload[at + 20 : at + 20 + size]
    *_, uid, inode = _MSG_TAIL.unpack_from(payload, _MSG_HEAD.size + _SOCKID_SIZE)
    return DiagSocket(
        family=family,
        state=state,
        source=Endpoint.of(src, sport),
        destination=Endpoint.of(dst, dport),
        uid=uid,
        inode=inode,
    )


def owner_uid(connection: FourTuple, answer: Answer) -> int:
    """The uid owning the connecting side of ``connection``, or ``NotAttributed``:
    the answer must be complete and name exactly that socket, established and owned."""
    if not answer.done:
        raise NotAttributed("the kernel's answer is incomplete")
    if answer.error is not None:
        if answer.error == errno.ENOENT:
            raise NotAttributed("the kernel knows no such connection (closed already?)")
        raise NotAttributed(f"the kernel answered {_errno_name(answer.error)}")
    ends = (connection.source, connection.destination)
    stray = [s for s in answer.sockets if (s.source, s.destination) != ends]
    if stray:
        raise NotAttributed(f"the kernel described another socket ({stray[0].source}->...)")
    found = set(answer.sockets)
    if not found:
        raise NotAttributed("the kernel named no socket")
    if len(found) > 1:
        raise NotAttributed(f"the kernel named {len(found)} different sockets")
    (only,) = found
    if only.state != TCP_ESTABLISHED:
        name = _STATES.get(only.state, str(only.state))
        raise NotAttributed(f"the client's socket is {name}, not ESTABLISHED")
    if only.inode == 0:
        raise NotAttributed("the client's socket has no owner (inode 0)")
    return only.uid


def _errno_name(number: int) -> str:
    return errno.errorcode.get(number, f"errno {number}") + f" ({os.strerror(number)})"

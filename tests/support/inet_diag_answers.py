"""Kernel answers to an inet_diag question, built from the uapi layouts written out
again (linux/netlink.h, linux/inet_diag.h), independently of enclave_common.inet_diag's
own structs: what the real kernel sends, and what a lying one could."""

from __future__ import annotations

import socket
import struct

from enclave_common.inet_diag import TCP_ESTABLISHED, Endpoint

SEQ = 7  # the question number the answers below carry
NLMSG_DONE, NLMSG_ERROR, SOCK_DIAG_BY_FAMILY, NLM_F_MULTI = 3, 2, 20, 2
FIN_WAIT1, TIME_WAIT = 4, 6


def header(length: int, kind: int, flags: int = 0, seq: int = SEQ) -> bytes:
    # struct nlmsghdr: u32 len, u16 type, u16 flags, u32 seq, u32 pid (host order)
    return struct.pack("=IHHII", length, kind, flags, seq, 0)


def message(kind: int, payload: bytes, flags: int = 0, seq: int = SEQ) -> bytes:
    padding = b"\0" * (-len(payload) % 4)
    return header(16 + len(payload), kind, flags, seq) + payload + padding


def diag_msg(
    source: Endpoint,
    destination: Endpoint,
    *,
    uid: int = 1000,
    state: int = TCP_ESTABLISHED,
    inode: int = 4242,
    family: int | None = None,
) -> bytes:
    """struct inet_diag_msg, as the kernel writes it for one socket."""
    if family is None:
        family = socket.AF_INET if source.address.version == 4 else socket.AF_INET6

    def packed(endpoint: Endpoint) -> bytes:
        address = endpoint.address
        if family == socket.AF_INET6 and address.version == 4:
            return socket.inet_pton(socket.AF_INET6, f"::ffff:{address}")
        return address.packed.ljust(16, b"\0")

    sockid = (
        struct.pack(">HH", source.port, destination.port)
        + packed(source)
        + packed(destination)
        + struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF)
    )
    tail = struct.pack("=IIIII", 0, 0, 0, uid, inode)
    return struct.pack("=BBBB", family, state, 0, 0) + sockid + tail


def socket_answer(
    source: Endpoint, destination: Endpoint, *, multi: bool = False, **fields: int
) -> bytes:
    """One socket: the exact lookup's whole answer, or (``multi``) one part of a dump."""
    return message(
        SOCK_DIAG_BY_FAMILY, diag_msg(source, destination, **fields), NLM_F_MULTI if multi else 0
    )


def error(code: int) -> bytes:
    """NLMSG_ERROR with ``code`` (a negative errno), quoting a question's header."""
    return message(NLMSG_ERROR, struct.pack("=i", code) + header(72, SOCK_DIAG_BY_FAMILY, 1))


DONE = message(NLMSG_DONE, struct.pack("=i", 0))

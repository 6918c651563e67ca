"""Which upstream targets the proxy may reach: a pure matcher, no I/O.

Rules of this file:
- A target is ``host:port``. Names match entries exactly (case-insensitive, a trailing
  dot ignored) or through ``*``, which stands for exactly one whole DNS label
  (``kms.*.amazonaws.com``). The rightmost label of a pattern is always literal, and a
  pattern keeps at least two literal labels (no ``*.com``).
- IP literals are never matched by a name pattern: an IP target is allowed only when
  that exact address and port are listed.
- After resolution every address is checked again (``permits_address``): loopback,
  link-local, unspecified and the EC2 metadata addresses are refused unless that exact
  address is listed, so a name on the list cannot be re-pointed (DNS rebinding) at
  the parent's own services or its instance metadata.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_MAX_NAME = 253
_NUMERIC_LABEL = re.compile(r"^(?:[0-9]+|0x[0-9a-f]+)$")

# Addresses a resolved name may never point at unless listed verbatim: the parent's
# own loopback, link-local (IPv4 169.254/16 holds IMDS at 169.254.169.254, the Amazon
# DNS at .253 and time sync at .123), the IPv6 forms of those three instance services,
# "this host" (0.0.0.0 / ::, which connect to the local machine), and multicast and
# broadcast, which no tunnel has any business with.
_GUARDED_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "127.0.0.0/8",
        "169.254.0.0/16",
        "0.0.0.0/8",
        "224.0.0.0/4",
        "255.255.255.255/32",
        "::1/128",
        "::/128",
        "fe80::/10",
        "ff00::/8",
        "fd00:ec2::254/128",
        "fd00:ec2::253/128",
        "fd00:ec2::123/128",
    )
)


class AllowlistError(ValueError):
    """A malformed allowlist entry or request target."""


@dataclass(frozen=True)
class Target:
    """A parsed ``host:port``: ``host`` is a normalized name or an IP literal."""

    host: str
    port: int
    ip: IPAddress | None

    def __str__(self) -> str:
        if isinstance(self.ip, ipaddress.IPv6Address):
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def _parse_port(text: str, original: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 5:
        raise AllowlistError(f"{original!r}: port must be a number 1-65535")
    port = int(text)
    if not 1 <= port <= 65535:
        raise AllowlistError(f"{original!r}: port must be a number 1-65535")
    return port


def _unmap(ip: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 (::ffff:127.0.0.1) is the IPv4 address for every rule here."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _normalize_name(name: str, original: str, *, pattern: bool) -> str:
    name = name.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > _MAX_NAME or not name.isascii():
        raise AllowlistError(f"{original!r}: not a valid host name")
    labels = name.split(".")
    for label in labels:
        if pattern and label == "*":
            continue
        if not _LABEL.match(label):
            raise AllowlistError(f"{original!r}: {label!r} is not a valid DNS label")
    if pattern and labels[-1] == "*":
        raise AllowlistError(f"{original!r}: the last label of a pattern cannot be '*'")
    if pattern and "*" in labels and len(labels) - labels.count("*") < 2:
        # "*.com" would open a whole top-level domain; demand a registrable suffix.
        raise AllowlistError(f"{original!r}: a pattern needs at least two labels besides '*'")
    if _NUMERIC_LABEL.match(labels[-1]):
        # "127.1", "2130706433" or "0x7f000001" are addresses to getaddrinfo (inet_aton
        # forms), not names: never treat them as names.
        raise AllowlistError(f"{original!r}: looks like a numeric address, not a host name")
    return name


def _parse(text: str, *, pattern: bool) -> Target:
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise AllowlistError(f"{text!r}: expected [IPv6]:PORT")
        host, port_text = text[1:end], text[end + 2 :]
        if "%" in host:
            # A zone id picks one of the parent's own interfaces: not a target to accept.
            raise AllowlistError(f"{text!r}: IPv6 zone ids (%...) are not accepted")
        try:
            ip: IPAddress | None = ipaddress.IPv6Address(host)
        except ValueError:
            raise AllowlistError(f"{text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise AllowlistError(f"{text!r}: expected HOST:PORT")
        if ":" in host:
            raise AllowlistError(f"{text!r}: write IPv6 addresses in brackets, [::1]:PORT")
        try:
            ip = ipaddress.IPv4Address(host)
        except ValueError:
            ip = None
    port = _parse_port(port_text, text)
    if ip is not None:
        ip = _unmap(ip)
        return Target(ip.compressed, port, ip)
    return Target(_normalize_name(host, text, pattern=pattern), port, None)


def parse_target(text: str) -> Target:
    """Parse a CONNECT request target (``host:port``, ``[v6]:port``); no wildcards."""
    return _parse(text, pattern=False)


def parse_entry(text: str) -> Target:
    """Parse an allowlist entry: like a target, but names may hold ``*`` labels."""
    return _parse(text.strip(), pattern=True)


def is_guarded(ip: IPAddress) -> bool:
    """True for addresses a name may not resolve to unless listed verbatim."""
    ip = _unmap(ip)
    return any(ip.version == net.version and ip in net for net in _GUARDED_NETWORKS)


def _label_match(pattern: str, name: str) -> bool:
    p_labels = pattern.split(".")
    n_labels = name.split(".")
    if len(p_labels) != len(n_labels):
        return False
    return all(p == "*" or p == n for p, n in zip(p_labels, n_labels, strict=True))


class Allowlist:
    """An immutable set of entries; replaced wholesale on reload."""

    def __init__(self, entries: Iterable[Target]) -> None:
        self.entries: tuple[Target, ...] = tuple(dict.fromkeys(entries))
        self._ips = {(e.ip, e.port) for e in self.entries if e.ip is not None}
        self._names = [e for e in self.entries if e.ip is None]

    @classmethod
    def from_strings(cls, entries: Iterable[str]) -> Allowlist:
        return cls(parse_entry(e) for e in entries)

    def permits_target(self, target: Target) -> bool:
        """Is this requested host:port on the list (before any resolution)?"""
        if target.ip is not None:
            return (target.ip, target.port) in self._ips
        return any(e.port == target.port and _label_match(e.host, target.host) for e in self._names)

    def permits_address(self, ip: IPAddress, port: int) -> bool:
        """May a connection go to this resolved address? Guarded ranges need a verbatim entry."""
        return not is_guarded(ip) or self.lists_address(ip, port)

    def lists_address(self, ip: IPAddress, port: int) -> bool:
        """Is exactly this address and port an entry of its own?"""
        return (_unmap(ip), port) in self._ips

    def describe(self) -> list[str]:
        return [str(e) for e in self.entries]

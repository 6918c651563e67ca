"""The proxy's settings: TOML file merged with command-line options. Pure, no I/O.

The file is read by the caller and handed over as text, so parsing is testable with
any bytes. Every problem becomes one ``ConfigError`` naming the key at fault. Unknown
keys are errors too: a misspelled ``max_tunels`` must not silently fall back to the
default. Command-line values win over the file; ``--allow`` entries add to the file's.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from enclave_common.address import (
    Address,
    AddressError,
    TcpAddress,
    is_loopback_ip,
    parse_address,
    parse_ip,
)
from enclave_common.logs import LEVELS

from .allowlist import Allowlist, AllowlistError, parse_entry

DEFAULT_LISTEN = "vsock:ANY:8000"
DEFAULT_CONFIG_PATH = "/etc/enclave-proxy/proxy.toml"

REGION_NAME = re.compile(r"^[a-z]{2,}(?:-[a-z]+)+-\d{1,2}$")
_ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}$")


class ConfigError(ValueError):
    """A configuration file or option that cannot be used, with the reason."""


@dataclass(frozen=True)
class ProxyConfig:
    listen: Address
    allow: tuple[str, ...] = ()
    region: str | None = None
    connect_timeout: float = 10.0
    idle_timeout: float = 300.0
    header_timeout: float = 10.0
    drain_timeout: float = 30.0
    max_tunnels: int = 1024
    max_tunnels_per_peer: int = 256
    allowed_cids: frozenset[int] | None = None
    assume_role_arn: str | None = None
    sts_endpoint: str | None = None
    log_level: str = "info"


@dataclass(frozen=True)
class CliOptions:
    """What the command line said; ``None`` / empty means "not given"."""

    listen: str | None = None
    allow: Sequence[str] = field(default_factory=tuple)
    region: str | None = None
    log_level: str | None = None


def _number(value: Any, key: str, *, minimum: float, maximum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key}: expected a number of seconds, got {type(value).__name__}")
    if not math.isfinite(value) or not minimum <= value <= maximum:
        raise ConfigError(f"{key}: must be between {minimum:g} and {maximum:g}, got {value!r}")
    return float(value)


def _integer(value: Any, key: str, *, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: expected an integer, got {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise ConfigError(f"{key}: must be between {minimum} and {maximum}, got {value}")
    return value


def _string(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {type(value).__name__}")
    return value


def check_region(region: str, key: str = "region") -> str:
    if not REGION_NAME.match(region):
        raise ConfigError(f"{key}: {region!r} is not an AWS region name such as us-east-1")
    return region


def _check_allow(entries: Sequence[str], key: str) -> tuple[str, ...]:
    for index, entry in enumerate(entries):
        try:
            parse_entry(entry)
        except AllowlistError as e:
            raise ConfigError(f"{key}[{index}]: {e}") from None
    return tuple(entries)


def _check_listen(text: str, key: str) -> Address:
    try:
        address = parse_address(text)
    except AddressError as e:
        raise ConfigError(f"{key}: {e}") from None
    # A name is judged by what it resolves to, at start (cli._loopback_only).
    if (
        isinstance(address, TcpAddress)
        and parse_ip(address.host) is not None
        and not is_loopback_ip(address.host)
    ):
        raise ConfigError(f"{key}: {not_loopback(address)}")
    return address


def not_loopback(address: TcpAddress, resolved: str | None = None) -> str:
    """Why a tcp: listen address off loopback is refused (the proxy has no caller check)."""
    where = f"{address}" + (f" (resolves to {resolved})" if resolved else "")
    return (
        f"{where} is not a loopback address: the proxy hands the role's AWS credentials "
        "to whoever connects, so a tcp: listener must stay on 127.0.0.0/8 or ::1 "
        "(enclaves use vsock:)"
    )


def _check_log_level(level: str, key: str) -> str:
    if level not in LEVELS:
        raise ConfigError(f"{key}: must be one of {', '.join(LEVELS)}, got {level!r}")
    return level


def parse_config_text(text: str) -> dict[str, Any]:
    """Parse and validate a TOML config; returns only the keys it set, typed."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"not valid TOML: {e}") from None
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "listen":
            out[key] = _check_listen(_string(value, key), key)
        elif key == "allow":
            if not isinstance(value, list):
                raise ConfigError('allow: expected a list of "HOST:PORT" strings')
            out[key] = _check_allow([_string(v, f"allow[{i}]") for i, v in enumerate(value)], key)
        elif key == "region":
            out[key] = check_region(_string(value, key))
        elif key in ("connect_timeout", "header_timeout"):
            out[key] = _number(value, key, minimum=0.01, maximum=300)
        elif key in ("idle_timeout", "drain_timeout"):
            out[key] = _number(value, key, minimum=0.01, maximum=86400)
        elif key in ("max_tunnels", "max_tunnels_per_peer"):
            out[key] = _integer(value, key, minimum=1, maximum=1_000_000)
        elif key == "allowed_cids":
            if not isinstance(value, list):
                raise ConfigError("allowed_cids: expected a list of integers")
            cids = [
                _integer(v, f"allowed_cids[{i}]", minimum=0, maximum=0xFFFFFFFF)
                for i, v in enumerate(value)
            ]
            out[key] = frozenset(cids)
        elif key == "assume_role_arn":
            arn = _string(value, key)
            if not _ROLE_ARN.match(arn):
                raise ConfigError(f"assume_role_arn: {arn!r} is not an IAM role ARN")
            out[key] = arn
        elif key == "sts_endpoint":
            url = _string(value, key)
            if not url.startswith(("https://", "http://")):
                raise ConfigError(f"sts_endpoint: expected an http(s):// URL, got {url!r}")
            out[key] = url
        elif key == "log_level":
            out[key] = _check_log_level(_string(value, key), key)
        else:
            raise ConfigError(f"unknown setting {key!r}")
    return out


def build_config(file_settings: Mapping[str, Any], cli: CliOptions) -> ProxyConfig:
    """Merge a parsed file (may be empty) with command-line options."""
    settings = dict(file_settings)
    settings.setdefault("listen", parse_address(DEFAULT_LISTEN))
    if cli.listen is not None:
        settings["listen"] = _check_listen(cli.listen, "--listen")
    if cli.allow:
        settings["allow"] = tuple(settings.get("allow", ())) + _check_allow(cli.allow, "--allow")
    if cli.region is not None:
        settings["region"] = check_region(cli.region, "--region")
    if cli.log_level is not None:
        settings["log_level"] = _check_log_level(cli.log_level, "--log-level")
    config = ProxyConfig(**settings)
    # A share as large as the whole would let one peer at its cap refuse everyone else.
    if config.max_tunnels_per_peer >= config.max_tunnels:
        raise ConfigError(
            f"max_tunnels_per_peer ({config.max_tunnels_per_peer}) must be smaller than "
            f"max_tunnels ({config.max_tunnels}), so that one peer at its share never "
            "takes every connection from the others"
        )
    return config


def default_allow_entries(region: str) -> tuple[str, ...]:
    """The KMS and KMS-FIPS endpoints of a region, used when nothing is listed."""
    suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return (f"kms.{region}.{suffix}:443", f"kms-fips.{region}.{suffix}:443")


def effective_allowlist(config: ProxyConfig, region: str | None) -> Allowlist:
    """The allowlist in force: the listed entries, else the region's KMS endpoints."""
    entries = config.allow
    if not entries:
        if region is None:
            raise ConfigError("no allow entries and no region: cannot choose KMS endpoints")
        entries = default_allow_entries(region)
    try:
        return Allowlist.from_strings(entries)
    except AllowlistError as e:
        raise ConfigError(str(e)) from None

"""The proxy's settings: TOML file merged with command-line options. Pure, no I/O.

The file is read by the caller and handed over as text, so parsing is testable with
any bytes. Each setting is declared once, on ``ProxyConfig`` (enclave_common.config);
every problem becomes one ``ConfigError`` naming the key at fault, and unknown keys
are errors too. Command-line values win over the file; ``--allow`` entries add to the
file's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from enclave_common.address import (
    PROXY_PORT,
    VMADDR_CID_ANY,
    Address,
    TcpAddress,
    VsockAddress,
    is_loopback_ip,
    parse_ip,
)
from enclave_common.aws import PARTITION_PATTERN, kms_host, store_hosts
from enclave_common.config import (
    At,
    ConfigError,
    Share,
    address,
    build,
    check_option,
    integer,
    list_of,
    log_level_name,
    matching,
    number,
    read_document,
    region_name,
    setting,
    string,
)

from .allowlist import Allowlist, AllowlistError, parse_entry

DEFAULT_LISTEN = VsockAddress(VMADDR_CID_ANY, PROXY_PORT)
DEFAULT_CONFIG_PATH = "/etc/enclave-proxy/proxy.toml"


def _listen(value: Any, at: At) -> Address:
    listen = address(value, at)
    # A name is judged by what it resolves to, at start (cli._loopback_only).
    if (
        isinstance(listen, TcpAddress)
        and parse_ip(listen.host) is not None
        and not is_loopback_ip(listen.host)
    ):
        raise at.error(not_loopback(listen, key=at.key))
    return listen


def _metrics_listen(value: Any, at: At) -> TcpAddress:
    listen = _listen(value, at)
    if not isinstance(listen, TcpAddress):
        raise at.must_be("a tcp: address on loopback, such as tcp:127.0.0.1:9464", value)
    return listen


def not_loopback(address: TcpAddress, resolved: str | None = None, *, key: str = "listen") -> str:
    """Why a tcp: listen address off loopback is refused: the proxy has no caller check."""
    where = f"{address}" + (f" (resolves to {resolved})" if resolved else "")
    if key == "metrics_listen":
        why = "the metrics name the enclaves and their traffic, for the parent's eyes only"
    else:
        why = "the proxy hands the role's AWS credentials to whoever connects (enclaves use vsock:)"
    return f"{where} is not a loopback address: {why}; a tcp: listener stays on 127.0.0.0/8 or ::1"


def _allow_entry(value: Any, at: At) -> str:
    try:
        parse_entry(string(value, at))
    except AllowlistError as e:
        raise at.error(str(e)) from None
    return str(value)


def _cids(value: Any, at: At) -> frozenset[int]:
    return frozenset(list_of(integer(0, 0xFFFFFFFF), "integers")(value, at))


_SECONDS = number((0.01, 300))
_LONG_SECONDS = number((0.01, 86400))


@dataclass(frozen=True)
class ProxyConfig:
    listen: Address = setting(
        _listen,
        "address to listen on: `vsock:CID:PORT`, `tcp:HOST:PORT` (loopback only: a name "
        "must resolve to loopback alone), `unix:PATH`",
        default=DEFAULT_LISTEN,
    )
    allow: tuple[str, ...] = setting(
        list_of(_allow_entry, '"HOST:PORT" strings'),
        '`["HOST:PORT", ...]`; when empty: the region\'s `kms.<region>.<suffix>:443`, '
        "`kms-fips.<region>.<suffix>:443` and the secret stores' "
        "`secretsmanager.<region>.<suffix>:443`, `ssm.<region>.<suffix>:443`, "
        "`s3.<region>.<suffix>:443` (S3's path-style regional endpoint; the suffix of the "
        "region's partition: `amazonaws.com`, `amazonaws.com.cn` for `cn-*`, ...)",
        default=(),
        shown="KMS and the secret stores of the region",
    )
    region: str | None = setting(
        region_name,
        "AWS region; asked from the instance metadata service (1 s timeout) when unset",
        default=None,
        shown="IMDSv2",
    )
    connect_timeout: float = setting(
        _SECONDS,
        "seconds for name resolution plus upstream connect; beyond it: `504`",
        default=10.0,
    )
    idle_timeout: float = setting(
        _LONG_SECONDS,
        "seconds a tunnel may move no byte in either direction before it is closed",
        default=300.0,
    )
    header_timeout: float = setting(
        _SECONDS,
        "seconds to receive a request's head and body, and for a kept-alive connection's "
        "next request to begin (`408` after, or a quiet close when idle)",
        default=10.0,
    )
    drain_timeout: float = setting(
        _LONG_SECONDS,
        "on SIGTERM, seconds open tunnels get to finish before they are cut",
        default=30.0,
    )
    max_tunnels: int = setting(
        integer(2, 1_000_000),
        "concurrent client connections, all peers together (each carries at most one "
        "tunnel); beyond it: `503`",
        default=1024,
    )
    max_tunnels_per_peer: int = setting(
        integer(1, 1_000_000),
        "each peer's share of them (a peer: the CID on vsock, the address on tcp, the uid "
        "on unix), counted from accept, request head or not; beyond it: `503`. Set, it "
        "must be below `max_tunnels`. Every peer keeps its whole share while `max_tunnels` "
        "≥ share * peers (default: 4 enclaves)",
        default=256,
        share_of=Share("max_tunnels", "peer"),
    )
    allowed_cids: frozenset[int] | None = setting(
        _cids,
        "vsock peers (enclave CIDs) allowed to connect, e.g. `[16]`; others are closed at "
        "once. Unset, CIDs 0-3 (hypervisor, local loopback, host, the parent itself) are "
        "refused",
        default=None,
        shown="any enclave (CID ≥ 4)",
    )
    assume_role_arn: str | None = setting(
        matching(
            rf"arn:({PARTITION_PATTERN}):iam::\d{{12}}:role/[\w+=,.@/-]{{1,512}}", "an IAM role ARN"
        ),
        "hand out credentials of this role (STS AssumeRole with the parent's credentials, "
        "renewed 15 min before expiry) instead of the parent's own",
        default=None,
    )
    sts_endpoint: str | None = setting(
        matching(r"(?s)https?://.*", "an http(s):// URL"),
        "STS endpoint URL for `assume_role_arn` (e.g. a VPC endpoint)",
        default=None,
        shown="regional",
    )
    log_level: str = setting(
        log_level_name, "`debug`, `info`, `warning`, `error`, `critical`", default="info"
    )
    metrics_listen: TcpAddress | None = setting(
        _metrics_listen,
        "`tcp:HOST:PORT` on the parent's loopback (a name must resolve to loopback alone) "
        "serving `GET /metrics`: the proxy's metrics and each enclave's latest snapshot, "
        "Prometheus text format. Never on the enclaves' port",
        default=None,
        shown="off",
    )
    enclave_log_lines_per_second: float = setting(
        number((1, 1_000_000)),
        "log lines each enclave may ship a second (`POST /v1/logs`), a second's worth at "
        "once; past it the proxy reads that stream no faster, and the enclave drops lines "
        "and says how many",
        default=200.0,
    )
    enclave_log_line_bytes: int = setting(
        integer(80, 1 << 20),
        "characters of one enclave log line written to the proxy's log; the rest is cut "
        "(`truncated`)",
        default=8192,
    )


@dataclass(frozen=True)
class CliOptions:
    """What the command line said; ``None`` / empty means "not given"."""

    listen: str | None = None
    allow: Sequence[str] = field(default_factory=tuple)
    region: str | None = None
    log_level: str | None = None


def parse_config_text(text: str) -> dict[str, Any]:
    """Parse and validate a TOML config; returns only the keys it set, typed."""
    return read_document(ProxyConfig, text, At())


def build_config(file_settings: Mapping[str, Any], cli: CliOptions) -> ProxyConfig:
    """Merge a parsed file (may be empty) with command-line options."""
    settings = dict(file_settings)
    for key, value in (
        ("listen", cli.listen),
        ("region", cli.region),
        ("log_level", cli.log_level),
    ):
        if value is not None:
            settings[key] = check_option(ProxyConfig, key, value)
    if cli.allow:
        settings["allow"] = settings.get("allow", ()) + check_option(
            ProxyConfig, "allow", list(cli.allow)
        )
    return build(ProxyConfig, settings, At())


def default_allow_entries(region: str) -> tuple[str, ...]:
    """The endpoints of a region the agent uses, allowed when nothing is listed: KMS and
    KMS-FIPS, then the stores a sealed secret is read from (Secrets Manager, SSM, S3
    path-style); exact names, no wildcard."""
    hosts = (kms_host(region), kms_host(region, fips=True), *store_hosts(region))
    return tuple(f"{host}:443" for host in hosts)


def effective_allowlist(config: ProxyConfig, region: str | None) -> Allowlist:
    """The allowlist in force: the listed entries, else the region's endpoints."""
    entries = config.allow
    if not entries:
        if region is None:
            raise ConfigError(
                "no allow entries and no region: cannot choose the region's endpoints"
            )
        entries = default_allow_entries(region)
    try:
        return Allowlist.from_strings(entries)
    except AllowlistError as e:
        raise ConfigError(str(e)) from None

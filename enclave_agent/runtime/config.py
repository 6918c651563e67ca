"""The agent's configuration: a TOML document turned into frozen dataclasses.

Pure: ``parse_config`` takes text and returns an ``AgentConfig`` or raises
``ConfigError``; ``load_config`` only adds reading the file. Every key is known in
advance, so a typo (``alowed_uids``) is refused with its name instead of being
silently ignored: a misspelt access rule must never turn into "allow everybody".

Shape (every key optional except where noted)::

    region = "us-east-1"                  # required
    proxy = "vsock:3:8000"                # the parent's enclave-proxy
    kms_endpoint = "https://kms.us-east-1.amazonaws.com"
    ca_bundle = "/etc/ssl/kms-ca.pem"     # default: certifi's bundle in the image
    nsm = "/dev/nsm"                      # or "simulated" (development only)
    log_level = "info"
    trusted_keys = ["arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
                    "arn:aws:kms:us-east-1:444455556666:key/*"]   # a key, or a whole account
                                          # in a region; none: key operations are off

    [simulated_nsm]                       # only with nsm = "simulated"
    ca_dir = "/path/made/by/init-ca"      # omitted: a throwaway in-memory CA
    pcrs = { 0 = "<96 hex digits>" }      # overrides of the simulated PCR values
    fail_with = "InternalError"           # every NSM call fails with this error (fault tests)

    [listen]
    socket = "/run/enclave-agent/agent.sock"
    socket_mode = "0660"
    socket_group = 1000                   # optional: the socket file's group (numeric gid)
    tcp = "tcp:127.0.0.1:9000"            # optional, loopback only, for boto3 endpoint_url

    [access]                              # default: the agent's own uid and root
    allowed_uids = [0, 1000]
    allowed_gids = [1000]

    [limits]
    max_body_bytes = 65536
    header_timeout = 10.0                 # seconds to receive a whole request
    idle_timeout = 60.0                   # seconds a kept-alive connection may idle
    max_connections = 256                 # Unix socket connections, all uids together
    max_connections_per_uid = 64          # one uid's share; TCP listener callers: one more
    max_kms_calls_per_uid = 8             # KMS calls in flight per uid (TCP callers: one)
    kms_pool_size = 16
    kms_call_timeout = 10.0
    kms_max_attempts = 4
    attestation_reuse_seconds = 300.0     # one attestation document for KMS reused this
                                          # long (0: a fresh one per call; at most 3600)

    [secrets.db_password]
    ciphertext = "<base64 CiphertextBlob>"  # or ciphertext_file = "/path/blob.bin" (raw bytes)
    key_id = "alias/app"
    encryption_context = { app = "billing" }
    file = "/run/secrets/db_password"     # optional copy on a tmpfs, mode 0400
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from enclave_agent.runtime.documents import DEFAULT_REUSE_SECONDS, MAX_REUSE_SECONDS
from enclave_agent.runtime.trusted_keys import CONFIG_KEY, KeyArnError, TrustedKeys
from enclave_common.address import (
    Address,
    AddressError,
    TcpAddress,
    is_loopback_ip,
    parse_address,
)
from enclave_common.logs import LEVELS

DEFAULT_SOCKET = "/run/enclave-agent/agent.sock"
DEFAULT_PROXY = "vsock:3:8000"
NSM_DEVICE = "/dev/nsm"
NSM_SIMULATED = "simulated"
SECRET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_PCR_BYTES = 48


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the offending key."""


@dataclass(frozen=True)
class SimulatedNsmConfig:
    ca_dir: Path | None = None
    pcrs: Mapping[int, bytes] = field(default_factory=dict)
    fail_with: str | None = None


@dataclass(frozen=True)
class ListenConfig:
    socket: str = DEFAULT_SOCKET
    socket_mode: int = 0o660
    socket_group: int | None = None  # chown the socket file to this gid (apps' group)
    tcp: TcpAddress | None = None


@dataclass(frozen=True)
class AccessConfig:
    """Callers allowed on the Unix socket. Empty both: the agent's own uid and root."""

    allowed_uids: frozenset[int] = frozenset()
    allowed_gids: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 64 * 1024
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_connections: int = 256
    # Each caller's share, so one at its cap never stops another (``admission``).
    max_connections_per_uid: int = 64
    max_kms_calls_per_uid: int = 8
    kms_pool_size: int = 16
    kms_call_timeout: float = 10.0
    kms_max_attempts: int = 4
    # How long one attestation document is reused for KMS calls (runtime/documents.py).
    attestation_reuse_seconds: float = DEFAULT_REUSE_SECONDS


@dataclass(frozen=True)
class SecretConfig:
    name: str
    ciphertext: bytes
    key_id: str | None = None
    encryption_context: Mapping[str, str] = field(default_factory=dict)
    file: Path | None = None


@dataclass(frozen=True)
class AgentConfig:
    region: str
    proxy: Address = field(default_factory=lambda: parse_address(DEFAULT_PROXY))
    kms_endpoint: str | None = None
    ca_bundle: str | None = None
    nsm: str = NSM_DEVICE
    log_level: str = "info"
    simulated_nsm: SimulatedNsmConfig = field(default_factory=SimulatedNsmConfig)
    listen: ListenConfig = field(default_factory=ListenConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    limits: Limits = field(default_factory=Limits)
    secrets: Mapping[str, SecretConfig] = field(default_factory=dict)
    trusted_keys: TrustedKeys = field(default_factory=TrustedKeys)


_TOP_KEYS = {
    CONFIG_KEY,
    "region",
    "proxy",
    "kms_endpoint",
    "ca_bundle",
    "nsm",
    "log_level",
    "simulated_nsm",
    "listen",
    "access",
    "limits",
    "secrets",
}
_SIMULATED_KEYS = {"ca_dir", "pcrs", "fail_with"}
_LISTEN_KEYS = {"socket", "socket_mode", "socket_group", "tcp"}
_ACCESS_KEYS = {"allowed_uids", "allowed_gids"}
_SECRET_KEYS = {"ciphertext", "ciphertext_file", "key_id", "encryption_context", "file"}
_LIMIT_KEYS: dict[str, type] = {
    "max_body_bytes": int,
    "header_timeout": float,
    "idle_timeout": float,
    "max_connections": int,
    "max_connections_per_uid": int,
    "max_kms_calls_per_uid": int,
    "kms_pool_size": int,
    "kms_call_timeout": float,
    "kms_max_attempts": int,
    "attestation_reuse_seconds": float,
}
# Limits that may be 0, with their largest value.
_LIMIT_ZERO_ALLOWED = {"attestation_reuse_seconds": MAX_REUSE_SECONDS}


def load_config(path: str | Path) -> AgentConfig:
    """Read and parse the TOML file at ``path``; relative file paths inside it are
    resolved against the file's directory."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    return parse_config(text, base_dir=path.resolve().parent, source=str(path))


def parse_config(text: str, *, base_dir: Path | None = None, source: str = "config") -> AgentConfig:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    return config_from_mapping(document, base_dir=base_dir, source=source)


def config_from_mapping(
    document: Mapping[str, Any], *, base_dir: Path | None = None, source: str = "config"
) -> AgentConfig:
    base = base_dir or Path.cwd()
    _refuse_unknown(document, _TOP_KEYS, source, "")

    region = _string(document, "region", source, "", required=True)
    assert region is not None
    if not re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d+", region):
        raise ConfigError(f"{source}: region {region!r} does not look like an AWS region")

    proxy_text = _string(document, "proxy", source, "") or DEFAULT_PROXY
    try:
        proxy = parse_address(proxy_text)
    except AddressError as exc:
        raise ConfigError(f"{source}: proxy: {exc}") from exc

    endpoint = _string(document, "kms_endpoint", source, "")
    if endpoint is not None and not re.fullmatch(r"https://[^/\s:]+(:\d{1,5})?/?", endpoint):
        raise ConfigError(
            f"{source}: kms_endpoint must look like https://HOST[:PORT], got {endpoint!r}"
        )

    ca_bundle = _string(document, "ca_bundle", source, "")
    if ca_bundle is not None:
        ca_bundle = str(_resolve(base, ca_bundle))

    nsm = _string(document, "nsm", source, "") or NSM_DEVICE
    if nsm not in (NSM_DEVICE, NSM_SIMULATED) and not nsm.startswith("/"):
        raise ConfigError(
            f"{source}: nsm must be {NSM_DEVICE!r}, another device path or {NSM_SIMULATED!r}"
        )

    log_level = _string(document, "log_level", source, "") or "info"
    if log_level not in LEVELS:
        raise ConfigError(f"{source}: log_level must be one of {', '.join(LEVELS)}")

    simulated = _simulated(document.get("simulated_nsm", {}), base, source)
    if "simulated_nsm" in document and nsm != NSM_SIMULATED:
        raise ConfigError(f"{source}: [simulated_nsm] is set but nsm is not 'simulated'")

    trusted_keys = _trusted_keys(document.get(CONFIG_KEY, []), source)
    secrets = _secrets(document.get("secrets", {}), base, source)
    _check_secret_keys(secrets, trusted_keys, source)

    return AgentConfig(
        region=region,
        proxy=proxy,
        kms_endpoint=endpoint.rstrip("/") if endpoint else None,
        ca_bundle=ca_bundle,
        nsm=nsm,
        log_level=log_level,
        simulated_nsm=simulated,
        listen=_listen(document.get("listen", {}), base, source),
        access=_access(document.get("access", {}), source),
        limits=_limits(document.get("limits", {}), source),
        secrets=secrets,
        trusted_keys=trusted_keys,
    )


def _refuse_unknown(table: Mapping[str, Any], known: set[str], source: str, where: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        place = f" in [{where}]" if where else ""
        raise ConfigError(
            f"{source}: unknown key{'s' if len(unknown) > 1 else ''}{place}: "
            f"{', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )


def _table(value: Any, source: str, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {where} must be a table")
    return value


def _string(
    table: Mapping[str, Any], key: str, source: str, where: str, *, required: bool = False
) -> str | None:
    name = f"{where}.{key}" if where else key
    if key not in table:
        if required:
            raise ConfigError(f"{source}: {name} is required")
        return None
    value = table[key]
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{source}: {name} must be a non-empty string")
    return value


def _resolve(base: Path, text: str) -> Path:
    path = Path(text)
    return path if path.is_absolute() else base / path


def _simulated(value: Any, base: Path, source: str) -> SimulatedNsmConfig:
    table = _table(value, source, "[simulated_nsm]")
    _refuse_unknown(table, _SIMULATED_KEYS, source, "simulated_nsm")
    ca_dir = _string(table, "ca_dir", source, "simulated_nsm")
    pcrs: dict[int, bytes] = {}
    for key, hex_value in _table(table.get("pcrs", {}), source, "simulated_nsm.pcrs").items():
        if not (isinstance(key, str) and key.isdigit() and 0 <= int(key) <= 15):
            raise ConfigError(f"{source}: simulated_nsm.pcrs key {key!r} must be 0..15")
        try:
            raw = bytes.fromhex(hex_value) if isinstance(hex_value, str) else b""
        except ValueError:
            raw = b""
        if len(raw) != _PCR_BYTES:
            raise ConfigError(
                f"{source}: simulated_nsm.pcrs.{key} must be {_PCR_BYTES * 2} hex digits"
            )
        pcrs[int(key)] = raw
    fail_with = _string(table, "fail_with", source, "simulated_nsm")
    return SimulatedNsmConfig(
        ca_dir=_resolve(base, ca_dir) if ca_dir else None, pcrs=pcrs, fail_with=fail_with
    )


def _listen(value: Any, base: Path, source: str) -> ListenConfig:
    table = _table(value, source, "[listen]")
    _refuse_unknown(table, _LISTEN_KEYS, source, "listen")
    socket_path = _string(table, "socket", source, "listen") or DEFAULT_SOCKET
    if socket_path.startswith("unix:"):
        socket_path = socket_path[len("unix:") :]
    socket_path = str(_resolve(base, socket_path))

    mode_value = table.get("socket_mode", "0660")
    if isinstance(mode_value, str) and re.fullmatch(r"0?[0-7]{3}", mode_value):
        mode = int(mode_value, 8)
    elif isinstance(mode_value, int) and not isinstance(mode_value, bool) and mode_value >= 0:
        mode = mode_value
    else:
        raise ConfigError(f"{source}: listen.socket_mode must be an octal string such as '0660'")
    if mode > 0o777 or mode & 0o007:
        raise ConfigError(f"{source}: listen.socket_mode {mode:04o} must not give access to others")

    tcp: TcpAddress | None = None
    tcp_text = _string(table, "tcp", source, "listen")
    if tcp_text is not None:
        try:
            address = parse_address(tcp_text)
        except AddressError as exc:
            raise ConfigError(f"{source}: listen.tcp: {exc}") from exc
        if not isinstance(address, TcpAddress) or not _is_loopback(address.host):
            raise ConfigError(
                f"{source}: listen.tcp must be a loopback tcp: address such as "
                f"tcp:127.0.0.1:9000 (it has no caller check), got {tcp_text!r}"
            )
        tcp = address
    group = table.get("socket_group")
    if group is not None and (
        # 2**32 - 1 is (gid_t)-1, which chown reads as "leave the group alone".
        isinstance(group, bool) or not isinstance(group, int) or not 0 <= group < 2**32 - 1
    ):
        raise ConfigError(f"{source}: listen.socket_group must be a numeric gid")
    return ListenConfig(socket=socket_path, socket_mode=mode, socket_group=group, tcp=tcp)


def _is_loopback(host: str) -> bool:
    return host == "localhost" or is_loopback_ip(host)


def _ids(table: Mapping[str, Any], key: str, source: str) -> frozenset[int]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(
        isinstance(item, int) and not isinstance(item, bool) and 0 <= item < 2**32 for item in value
    ):
        raise ConfigError(f"{source}: access.{key} must be a list of numeric ids")
    return frozenset(value)


def _access(value: Any, source: str) -> AccessConfig:
    table = _table(value, source, "[access]")
    _refuse_unknown(table, _ACCESS_KEYS, source, "access")
    return AccessConfig(
        allowed_uids=_ids(table, "allowed_uids", source),
        allowed_gids=_ids(table, "allowed_gids", source),
    )


def _limits(value: Any, source: str) -> Limits:
    table = _table(value, source, "[limits]")
    _refuse_unknown(table, set(_LIMIT_KEYS), source, "limits")
    values: dict[str, Any] = {}
    for key, kind in _LIMIT_KEYS.items():
        if key not in table:
            continue
        item = table[key]
        ok_type = isinstance(item, int | float) if kind is float else isinstance(item, int)
        # TOML has nan and inf: nan passes "<= 0" and inf disables a timeout.
        if isinstance(item, bool) or not ok_type or not math.isfinite(item):
            raise ConfigError(f"{source}: limits.{key} must be a positive, finite number")
        if key in _LIMIT_ZERO_ALLOWED:
            if not 0 <= item <= _LIMIT_ZERO_ALLOWED[key]:
                raise ConfigError(
                    f"{source}: limits.{key} must be 0 to {_LIMIT_ZERO_ALLOWED[key]:g}"
                )
        elif item <= 0:
            raise ConfigError(f"{source}: limits.{key} must be a positive, finite number")
        values[key] = kind(item)
    limits = Limits(**values)
    # A share as large as the whole would let one caller at its cap take everything.
    for share, whole in (
        ("max_connections_per_uid", "max_connections"),
        ("max_kms_calls_per_uid", "kms_pool_size"),
    ):
        if getattr(limits, share) >= getattr(limits, whole):
            raise ConfigError(
                f"{source}: limits.{share} ({getattr(limits, share)}) must be smaller than "
                f"limits.{whole} ({getattr(limits, whole)}), so that one uid at its share "
                "never takes all of them from the others"
            )
    return limits


def _trusted_keys(value: Any, source: str) -> TrustedKeys:
    if not isinstance(value, list):
        raise ConfigError(f"{source}: {CONFIG_KEY} must be a list of key ARNs")
    try:
        return TrustedKeys.parse(value)
    except KeyArnError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _check_secret_keys(
    secrets: Mapping[str, SecretConfig], trusted: TrustedKeys, source: str
) -> None:
    """Named secrets need trusted keys; one named by an untrusted key ARN is a mistake.

    Why at parse time: the agent would refuse them at start anyway (every answer's
    key is checked), but a config error names the key to fix and exits 2 at once.
    """
    if secrets and not trusted:
        raise ConfigError(
            f"{source}: named secrets ([secrets.{next(iter(secrets))}]) need {CONFIG_KEY}: "
            f"list the key ARNs (or arn:PARTITION:kms:REGION:ACCOUNT:key/* accounts) they "
            "are encrypted under; without it the agent opens no key's answer"
        )
    for secret in secrets.values():
        refusal = trusted.refusal_for_request(secret.key_id)
        if refusal is not None:
            raise ConfigError(f"{source}: secrets.{secret.name}.key_id: {refusal}")


def _secrets(value: Any, base: Path, source: str) -> dict[str, SecretConfig]:
    result: dict[str, SecretConfig] = {}
    files: dict[Path, str] = {}
    for name, entry in _table(value, source, "[secrets]").items():
        where = f"secrets.{name}"
        if not SECRET_NAME.match(name):
            raise ConfigError(
                f"{source}: secret name {name!r} must be 1-128 of A-Z a-z 0-9 _ . - "
                "(starting with a letter or digit)"
            )
        table = _table(entry, source, f"[{where}]")
        _refuse_unknown(table, _SECRET_KEYS, source, where)
        inline = _string(table, "ciphertext", source, where)
        from_file = _string(table, "ciphertext_file", source, where)
        if (inline is None) == (from_file is None):
            raise ConfigError(f"{source}: {where} needs exactly one of ciphertext, ciphertext_file")
        if inline is not None:
            try:
                ciphertext = base64.b64decode(inline, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ConfigError(f"{source}: {where}.ciphertext is not valid base64") from exc
        else:
            assert from_file is not None
            blob_path = _resolve(base, from_file)
            try:
                ciphertext = blob_path.read_bytes()
            except OSError as exc:
                raise ConfigError(f"{source}: {where}.ciphertext_file: {exc}") from exc
        if not ciphertext:
            raise ConfigError(f"{source}: {where}: the ciphertext is empty")
        context = _table(table.get("encryption_context", {}), source, f"{where}.encryption_context")
        if not all(isinstance(v, str) for v in context.values()):
            raise ConfigError(f"{source}: {where}.encryption_context values must be strings")
        file_text = _string(table, "file", source, where)
        file_path = _resolve(base, file_text) if file_text else None
        if file_path is not None and file_path in files:
            # Two secrets racing to rename onto one path: which one an app reads is luck.
            raise ConfigError(f"{source}: {where}.file is also {files[file_path]}'s file")
        if file_path is not None:
            files[file_path] = name
        result[name] = SecretConfig(
            name=name,
            ciphertext=ciphertext,
            key_id=_string(table, "key_id", source, where),
            encryption_context=dict(context),
            file=file_path,
        )
    return result


__all__ = [
    "DEFAULT_SOCKET",
    "AccessConfig",
    "AgentConfig",
    "ConfigError",
    "Limits",
    "ListenConfig",
    "SecretConfig",
    "SimulatedNsmConfig",
    "load_config",
    "parse_config",
]

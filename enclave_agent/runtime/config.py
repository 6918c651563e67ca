"""The agent's configuration: a TOML document turned into frozen dataclasses.

Pure: ``parse_config`` takes text and returns an ``AgentConfig`` or raises
``ConfigError``. ``load_config`` is the edge: it reads the file, then each secret's
``ciphertext_file`` or sealed file (``from = "file:..."``). Each setting is declared
once, on the dataclass that holds it (enclave_common.config: check, default, the
reference's line; scripts/config-reference makes the docs' table from them). Every key
is known in advance, so a typo (``alowed_uids``) is refused with its name instead of
being silently ignored: a misspelt access rule must never turn into "allow everybody".
Relative paths start from the config file's directory.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from enclave_agent.client import DEFAULT_SOCKET
from enclave_agent.runtime.documents import DEFAULT_REUSE_SECONDS, MAX_REUSE_SECONDS
from enclave_agent.runtime.sealed import CONTEXT_KEY, MAX_SEALED_BYTES
from enclave_agent.runtime.store_location import (
    FileLocation,
    LocationError,
    PinnedLocation,
    S3Location,
    StoreLocation,
    parse_location,
    require_pinned,
)
from enclave_agent.runtime.trusted_keys import CONFIG_KEY, KeyArnError, TrustedKeys
from enclave_common.address import DEFAULT_PROXY, Address, TcpAddress, is_loopback_host
from enclave_common.aws import is_account_id, service_host
from enclave_common.config import (
    At,
    ConfigError,
    Share,
    Table,
    Tables,
    address,
    boolean,
    build,
    integer,
    list_of,
    log_level_name,
    matching,
    number,
    path,
    read_document,
    read_text,
    region_name,
    setting,
    string,
)

NSM_DEVICE = "/dev/nsm"
NSM_SIMULATED = "simulated"
SECRET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_PCR_BYTES = 48


def _pcrs(value: Any, at: At) -> dict[int, bytes]:
    if not isinstance(value, dict):
        raise at.wrong_type("a table", value)
    pcrs: dict[int, bytes] = {}
    for index, hex_value in value.items():
        if not (re.fullmatch(r"[0-9]{1,2}", index) and int(index) <= 15):
            raise at.error(f"the key {index!r} must be a PCR index, 0..15")
        try:
            raw = bytes.fromhex(hex_value) if isinstance(hex_value, str) else b""
        except ValueError:
            raw = b""
        if len(raw) != _PCR_BYTES:
            raise at.child(index).must_be(f"{_PCR_BYTES * 2} hex digits", hex_value)
        pcrs[int(index)] = raw
    return pcrs


@dataclass(frozen=True)
class SimulatedNsmConfig:
    ca_dir: Path | None = setting(
        path,
        "the CA from `python -m enclave_agent.simulated.nsm init-ca DIR`; unset: a "
        "throwaway in-memory CA",
        default=None,
    )
    pcrs: Mapping[int, bytes] = setting(
        _pcrs, 'overrides of simulated PCR values, `{ 0 = "<96 hex>" }`', factory=dict
    )
    fail_with: str | None = setting(
        string, "every NSM call fails with this error (fault tests)", default=None
    )


def _socket(value: Any, at: At) -> str:
    return str(path(string(value, at).removeprefix("unix:"), at))


def _socket_mode(value: Any, at: At) -> int:
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}", value):
        mode = int(value, 8)
    elif isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        mode = value
    else:
        raise at.must_be("an octal string such as '0660'", value)
    if mode > 0o777 or mode & 0o007:
        raise at.error(f"{mode:04o} must not give access to others")
    return mode


def _tcp(value: Any, at: At) -> TcpAddress:
    tcp = address(value, at)
    if not isinstance(tcp, TcpAddress) or not is_loopback_host(tcp.host):
        raise at.must_be("a loopback tcp: address such as tcp:127.0.0.1:9000", value)
    return tcp


@dataclass(frozen=True)
class ListenConfig:
    socket: str = setting(_socket, "the apps' Unix socket", default=DEFAULT_SOCKET)
    socket_mode: int = setting(
        _socket_mode, 'never anything for "others"', default=0o660, shown='`"0660"`'
    )
    socket_group: int | None = setting(
        # 2**32 - 1 is (gid_t)-1, which chown reads as "leave the group alone".
        integer(0, 2**32 - 2),
        "the socket file's group (numeric gid), so that group's apps connect",
        default=None,
    )
    tcp: TcpAddress | None = setting(
        _tcp,
        "`tcp:HOST:PORT`, loopback only: the listener for SDKs (callers checked by uid, "
        "inet_diag); unset: none, but `run` opens one on 127.0.0.1 (`run.sdk_env`)",
        default=None,
    )
    tcp_open: bool = setting(
        boolean,
        "`true`: where the kernel cannot name TCP callers (no inet_diag), serve TCP anyway, "
        "unchecked, all callers as one (a warning); `false`: such a kernel stops a set "
        "`tcp` from starting",
        default=False,
        shown="`false`",
    )


@dataclass(frozen=True)
class RunConfig:
    """``enclave-agent run``: what CMD gets for AWS SDKs."""

    sdk_env: bool = setting(
        boolean,
        "`run` gives CMD `AWS_ENDPOINT_URL_KMS`, the region and placeholder credentials, "
        "and opens the TCP listener for them; `false`: neither",
        default=True,
        shown="`true`",
    )


def _ids(value: Any, at: At) -> frozenset[int]:
    return frozenset(list_of(integer(0, 2**32 - 1), "numeric ids")(value, at))


@dataclass(frozen=True)
class AccessConfig:
    """Callers allowed on either listener. Empty both: the agent's own uid and root."""

    allowed_uids: frozenset[int] = setting(
        _ids,
        "uids allowed (Unix socket: SO_PEERCRED; TCP: the uid owning the client's socket)",
        default=frozenset(),
    )
    allowed_gids: frozenset[int] = setting(
        _ids,
        "gids allowed: the caller's primary or a supplementary gid (on TCP: the uid's groups "
        "in the group database). Both lists empty: the agent's own uid and root",
        default=frozenset(),
    )


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = setting(
        integer(), "request body, bytes; `413` above it", default=64 * 1024
    )
    header_timeout: float = setting(
        number(),
        "seconds for a whole request to arrive: from connect for a connection's first "
        "request (a silent one is closed), from its first byte for a later one; `408` / close",
        default=10.0,
    )
    idle_timeout: float = setting(
        number(), "seconds a kept-alive connection may idle between requests", default=60.0
    )
    max_connections: int = setting(
        integer(2),
        "connections open at once on each listener (the TCP listener's counted apart from "
        "the Unix socket's), all uids together; `503 ThrottlingException` above it",
        default=256,
    )
    # Each caller's share, so one at its cap never stops another (``admission``).
    max_connections_per_uid: int = setting(
        integer(),
        "each uid's share of those on a listener, from accept (idle ones included); with "
        "`tcp_open` and no caller check, all TCP callers together get one. Set, it must be "
        "below `max_connections`",
        default=64,
        share_of=Share("max_connections", "uid"),
    )
    max_kms_calls_per_uid: int = setting(
        integer(),
        "KMS calls in flight per uid, whichever listener they come by (unchecked TCP "
        "callers: one share); more wait in that uid's own queue, up to `kms_call_timeout`. "
        "Set, it must be below `kms_pool_size`, so one uid at its cap leaves pooled "
        "connections for the others",
        default=8,
        share_of=Share("kms_pool_size", "uid"),
    )
    kms_pool_size: int = setting(
        integer(2),
        "kept-alive TLS connections to KMS, and so KMS requests in flight at once",
        default=16,
    )
    kms_call_timeout: float = setting(
        number(),
        "seconds per app call, retries included; `DependencyTimeoutException` past it",
        default=10.0,
    )
    kms_max_attempts: int = setting(
        integer(),
        "attempts per call for retryable failures (plus one after an expired token, and one "
        "with a new attestation document when KMS refuses a call that carried a reused one)",
        default=4,
    )
    store_read_timeout: float = setting(
        number(),
        "seconds for one read of a secret's store (`from`), its answer whole; at start, "
        "for all of a secret's tries: past it the start fails naming the secret",
        default=10.0,
    )
    # How long one attestation document serves KMS calls (runtime/documents.py).
    attestation_reuse_seconds: float = setting(
        number((0, MAX_REUSE_SECONDS)),
        "seconds one attestation document serves KMS calls (`0`: a new one per call). Never "
        "longer than the document's leaf certificate has left after its `timestamp` minus "
        "15 minutes; the first call after 80 % of that fetches the next one. Why reuse is "
        'safe: `docs/security.md`, "Attestation documents are reused"',
        default=DEFAULT_REUSE_SECONDS,
    )


@dataclass(frozen=True)
class LogsConfig:
    """The log channel to the proxy (``logship``): what an enclave says, the parent reads."""

    ship: bool = setting(
        boolean,
        "send the agent's own log events to the proxy (`POST /v1/logs`), which writes them "
        "to its log; false: the console only",
        default=True,
        shown="`true`",
    )
    app_output: bool = setting(
        boolean,
        "under `run`, ship the app's stdout and stderr too, line by line: what an app "
        "prints leaves the enclave. False: they go to the console (needs `ship`)",
        default=False,
        shown="`false`",
    )
    buffer_bytes: int = setting(
        integer(4096, 64 << 20),
        "bytes of lines waiting for the proxy; beyond it lines are dropped, counted and "
        "announced, never waited for",
        default=256 * 1024,
    )


def _push_interval(value: Any, at: At) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise at.wrong_type("a number", value)
    if value != 0 and not 1 <= value <= 86400:  # (nan fails both)
        raise at.must_be("0 (never) or a number of seconds from 1 to 86400", value)
    return float(value)


@dataclass(frozen=True)
class MetricsConfig:
    push_interval: float = setting(
        _push_interval,
        "seconds between the metrics snapshots sent to the proxy over the log channel "
        "(its `/metrics` shows them by enclave); 0: never",
        default=60.0,
    )


def _ciphertext(value: Any, at: At) -> bytes:
    text = string(value, at)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise at.error("not valid base64") from None


def _context(value: Any, at: At) -> dict[str, str]:
    if not isinstance(value, dict):
        raise at.wrong_type("a table", value)
    for key, item in value.items():
        if not isinstance(item, str):
            raise at.child(key).wrong_type("a string", item)
    return dict(value)


def _location(value: Any, at: At) -> PinnedLocation:
    try:
        location = require_pinned(parse_location(string(value, at)))
    except LocationError as exc:
        # Why pinned: the parent chooses the credentials, so the account too.
        raise at.error(
            f"{exc} (the parent chooses the credentials, hence the account a bare name "
            "resolves in: the agent reads only what an ARN, or S3 with bucket_owner, pins)"
        ) from None
    if isinstance(location, FileLocation):  # relative: from the config file's directory
        return FileLocation(str(path(location.path, at)))
    return location


def _account(value: Any, at: At) -> str:
    if not is_account_id(string(value, at)):
        raise at.must_be("a 12-digit account id", value)
    return str(value)


_ONE_SOURCE = "one of `from`, `ciphertext`, `ciphertext_file`"
MAX_REFRESH = 7 * 86400.0  # a week
STALE_FACTOR = 3  # stale_after's default, times refresh


@dataclass(frozen=True)
class SecretConfig:
    name: str
    # Empty while the ciphertext is still in ``ciphertext_file``, or the sealed bytes in
    # ``from = "file:..."`` (``load_config`` reads either).
    ciphertext: bytes = setting(
        _ciphertext, "the CiphertextBlob, base64", default=b"", shown=_ONE_SOURCE
    )
    key_id: str | None = setting(
        string, "the key for Decrypt (a key ARN must be in `trusted_keys`)", default=None
    )
    encryption_context: Mapping[str, str] = setting(
        _context,
        "must match Encrypt's (not with `from`: a stored secret's context is its name)",
        factory=dict,
    )
    file: Path | None = setting(
        path,
        "a copy of the plaintext, mode 0400, replaced atomically when the secret rotates, "
        "deleted when the agent stops (on a disk: a warning)",
        default=None,
    )
    ciphertext_file: Path | None = setting(
        path,
        "a file holding the raw CiphertextBlob (a regular file), read at start",
        default=None,
        shown=_ONE_SOURCE,
    )
    location: PinnedLocation | None = setting(
        _location,
        "where the sealed secret is (`enclave-agent seal`): "
        "`secretsmanager:ARN` (the full ARN, with its 6-character suffix), `ssm:ARN` or "
        "`s3://BUCKET/KEY`, read through the proxy, or `file:PATH`, a file of the image "
        "read at start; opened with the context "
        '`{"enclave-kms:secret" = NAME}` (docs/secrets.md)',
        default=None,
        shown=_ONE_SOURCE,
        key="from",
    )
    bucket_owner: str | None = setting(
        _account,
        "S3 only, and required there: the bucket's account id, sent with every read "
        "(`x-amz-expected-bucket-owner`), so S3 refuses a bucket of another account",
        default=None,
    )
    refresh: float | None = setting(
        number((1, MAX_REFRESH)),
        "with a store `from`: seconds between reads of the store; a new version is opened and "
        "served (`X-Secret-Version`), a failed read keeps the old value and is retried "
        "sooner; unset: read once, at start",
        default=None,
        shown="off",
    )
    stale_after: float | None = setting(
        number((1, STALE_FACTOR * MAX_REFRESH)),
        "with `refresh`: `/healthz` reports the secret stale when the store has not been "
        "read successfully for this many seconds (more than `refresh`)",
        default=None,
        shown=f"{STALE_FACTOR} times `refresh`",
    )

    @property
    def stale_seconds(self) -> float | None:
        """Seconds after the last good read when the secret is stale (None: never)."""
        if self.refresh is None:
            return None
        return self.stale_after or STALE_FACTOR * self.refresh


def _nsm(value: Any, at: At) -> str:
    nsm = string(value, at)
    if nsm not in (NSM_DEVICE, NSM_SIMULATED) and not nsm.startswith("/"):
        raise at.must_be(f"{NSM_DEVICE!r}, another device path or {NSM_SIMULATED!r}", value)
    return nsm


_HTTPS_URL = matching(r"https://[^/\s:]+(:[0-9]{1,5})?/?", "an https://HOST[:PORT] URL")


def _endpoint(value: Any, at: At) -> str:
    return _HTTPS_URL(value, at).rstrip("/")


def _store_endpoint(service: str, prefix: str, note: str = "") -> Any:
    """The setting of a store's endpoint (``secretsmanager_endpoint``, ...)."""
    return setting(
        _endpoint,
        f"`https://HOST[:PORT]` of {service}, for secrets read `from` it; unset: "
        f"`https://{prefix}.<region>.<suffix>`{note}",
        default=None,
        shown="from region",
    )


def _trusted_keys(value: Any, at: At) -> TrustedKeys:
    if not isinstance(value, list):
        raise at.must_be("a list of key ARNs", value)
    try:
        return TrustedKeys.parse(value)
    except KeyArnError as exc:
        raise ConfigError(str(exc), at.key) from None


@dataclass(frozen=True)
class AgentConfig:
    region: str = setting(region_name, "AWS region (e.g. `us-east-1`)")
    proxy: Address = setting(
        address,
        "enclave-proxy on the parent (`tcp:`/`unix:` in development)",
        default=DEFAULT_PROXY,
    )
    kms_endpoint: str | None = setting(
        _endpoint,
        "`https://HOST[:PORT]` (e.g. the region's `kms-fips` endpoint); unset: "
        "`https://kms.<region>.<suffix>`, the suffix of the region's partition",
        default=None,
        shown="from region",
    )
    secretsmanager_endpoint: str | None = _store_endpoint("Secrets Manager", "secretsmanager")
    ssm_endpoint: str | None = _store_endpoint("SSM Parameter Store", "ssm")
    s3_endpoint: str | None = _store_endpoint("S3", "s3", " (requests are path-style)")
    ca_bundle: str | None = setting(
        lambda value, at: str(path(value, at)),
        "PEM file of the CAs KMS's (and the stores') certificates are checked against",
        default=None,
        shown="certifi's bundle",
    )
    nsm: str = setting(
        _nsm,
        "the NSM device, or `simulated` (development only: proves nothing)",
        default=NSM_DEVICE,
    )
    log_level: str = setting(
        log_level_name, "`debug`, `info`, `warning`, `error`, `critical`", default="info"
    )
    simulated_nsm: SimulatedNsmConfig = setting(
        Table(SimulatedNsmConfig), factory=SimulatedNsmConfig
    )
    listen: ListenConfig = setting(Table(ListenConfig), factory=ListenConfig)
    run: RunConfig = setting(Table(RunConfig), factory=RunConfig)
    access: AccessConfig = setting(Table(AccessConfig), factory=AccessConfig)
    limits: Limits = setting(Table(Limits), factory=Limits)
    secrets: Mapping[str, SecretConfig] = setting(
        Tables(
            SecretConfig,
            SECRET_NAME.pattern,
            "1-128 of A-Z a-z 0-9 _ . - (starting with a letter or digit)",
        ),
        factory=dict,
    )
    trusted_keys: TrustedKeys = setting(
        _trusted_keys,
        "the keys whose answers are opened: key ARNs, or `arn:PARTITION:kms:REGION:ACCOUNT:"
        "key/*` for every key of one account in one region; none: key operations are off",
        default=TrustedKeys(),
    )
    logs: LogsConfig = setting(Table(LogsConfig), factory=LogsConfig)
    metrics: MetricsConfig = setting(Table(MetricsConfig), factory=MetricsConfig)


def parse_config(text: str, *, base_dir: Path | None = None, source: str = "config") -> AgentConfig:
    at = At(base_dir=base_dir or Path.cwd())
    try:
        settings = read_document(AgentConfig, text, at)
        config = build(AgentConfig, settings, at)
        if "simulated_nsm" in settings and config.nsm != NSM_SIMULATED:
            raise ConfigError("[simulated_nsm] is set but nsm is not 'simulated'", "simulated_nsm")
        if config.logs.app_output and not config.logs.ship:
            raise ConfigError("logs.app_output = true needs logs.ship = true", "logs.app_output")
        _check_secrets(config.secrets, config.trusted_keys, config.region)
    except ConfigError as exc:
        raise exc.within(source) from None
    return config


def _check_secrets(secrets: Mapping[str, SecretConfig], trusted: TrustedKeys, region: str) -> None:
    """Each secret's ciphertext comes from one place, and each copy has its own file.

    Named secrets need trusted keys, and one named by an untrusted key ARN is a
    mistake. Why at parse time: the agent would refuse them at start anyway (every
    answer's key is checked), but a config error names the key to fix and exits 2 at once.
    """
    files: dict[Path, str] = {}
    for name, secret in secrets.items():
        where = f"secrets.{name}"
        sources = [secret.location, secret.ciphertext, secret.ciphertext_file]
        if sum(1 for source in sources if source) != 1:
            raise ConfigError(
                f"{where} needs exactly one of from, ciphertext, ciphertext_file", where
            )
        _check_store_settings(secret, where, region)
        if secret.file is not None and secret.file in files:
            # Two secrets racing to rename onto one path: which one an app reads is luck.
            raise ConfigError(f"{where}.file is also {files[secret.file]}'s file", f"{where}.file")
        if secret.file is not None:
            files[secret.file] = name
    if secrets and not trusted:
        raise ConfigError(
            f"named secrets ([secrets.{next(iter(secrets))}]) need {CONFIG_KEY}: list the key "
            "ARNs (or arn:PARTITION:kms:REGION:ACCOUNT:key/* accounts) they are encrypted "
            "under; without it the agent opens no key's answer",
            CONFIG_KEY,
        )
    for secret in secrets.values():
        refusal = trusted.refusal_for_request(secret.key_id)
        if refusal is not None:
            raise ConfigError(f"secrets.{secret.name}.key_id: {refusal}", f"secrets.{secret.name}")


def _check_store_settings(secret: SecretConfig, where: str, region: str) -> None:
    """The settings that go with ``from`` (and only with it)."""
    location = secret.location
    arn = None if isinstance(location, S3Location | FileLocation | None) else location.arn
    if arn is not None and arn.region != region:
        raise ConfigError(
            f"{where}.from names a resource in {arn.region}, but the agent reads its stores "
            f"in its own region, {region}",
            f"{where}.from",
        )
    s3 = isinstance(secret.location, S3Location)
    if s3 and secret.bucket_owner is None:
        raise ConfigError(
            f"{where}.bucket_owner is required with from = s3://...: S3 bucket names are "
            "global and a deleted bucket's name can be taken, so the agent sends the owner "
            "it expects and S3 refuses a bucket of another account",
            f"{where}.bucket_owner",
        )
    if not s3 and secret.bucket_owner is not None:
        raise ConfigError(f"{where}.bucket_owner applies to from = s3://... only", where)
    if not isinstance(secret.location, StoreLocation):
        for key, value in (("refresh", secret.refresh), ("stale_after", secret.stale_after)):
            if value is not None:
                message = f"{where}.{key} applies to a secret read from a store"
                if secret.location is not None:
                    message += ": the image's files do not change, a file is read once, at start"
                raise ConfigError(message, where)
    if secret.location is None:
        return
    if secret.encryption_context:
        raise ConfigError(
            f"{where}.encryption_context: a secret read `from` is always opened with "
            f'{{"{CONTEXT_KEY}" = "{secret.name}"}}, the context seal binds it to',
            f"{where}.encryption_context",
        )
    if secret.stale_after is not None:
        if secret.refresh is None:
            raise ConfigError(
                f"{where}.stale_after needs refresh: a secret read once never goes stale", where
            )
        if secret.stale_after <= secret.refresh:
            raise ConfigError(
                f"{where}.stale_after ({secret.stale_after:g}) must be more than refresh "
                f"({secret.refresh:g}): the secret would be stale between two good reads",
                f"{where}.stale_after",
            )


def store_endpoint(config: AgentConfig, service: str) -> str:
    """``https://HOST[:PORT]`` of the store ``service`` ("secretsmanager", "ssm", "s3"):
    its ``<service>_endpoint`` setting, else the region's endpoint."""
    configured = {
        "secretsmanager": config.secretsmanager_endpoint,
        "ssm": config.ssm_endpoint,
        "s3": config.s3_endpoint,
    }[service]
    return configured or f"https://{service_host(service, config.region)}"


def load_config(path: str | Path) -> AgentConfig:
    """Read and parse the TOML file at ``path`` (relative paths in it start from its
    directory), then read each secret's ``ciphertext_file`` or sealed file."""
    path = Path(path)
    config = parse_config(read_text(path), base_dir=path.resolve().parent, source=str(path))
    try:
        secrets = {name: _read_ciphertext(secret) for name, secret in config.secrets.items()}
    except ConfigError as exc:
        raise exc.within(str(path)) from None
    return replace(config, secrets=secrets)


def _image_file(path: Path) -> BinaryIO:
    """A file of the image (a sealed file, a ``ciphertext_file``), open for reading: a
    regular file (through symlinks), else OSError. Opened without blocking, so a FIFO is
    refused instead of holding the start for ever waiting for a writer (no effect on a
    regular file's reads)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file (a file of the image is one)")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _read_ciphertext(secret: SecretConfig) -> SecretConfig:
    where = f"secrets.{secret.name}"
    most: int | None = None
    if isinstance(secret.location, FileLocation):
        key, source, most = "from", Path(secret.location.path), MAX_SEALED_BYTES
    elif secret.ciphertext_file is not None:
        key, source = "ciphertext_file", secret.ciphertext_file
    else:
        return secret
    try:
        with _image_file(source) as handle:
            # One byte more than the most: enough to refuse a larger file without reading it.
            ciphertext = handle.read(-1 if most is None else most + 1)
    except OSError as exc:
        raise ConfigError(f"{where}.{key}: {exc}", f"{where}.{key}") from exc
    if not ciphertext:
        raise ConfigError(f"{where}: the ciphertext is empty", where)
    if most is not None and len(ciphertext) > most:
        raise ConfigError(
            f"{where}.{key}: {source} is over {most} bytes, the most a sealed secret can be",
            f"{where}.{key}",
        )
    return replace(secret, ciphertext=ciphertext)


__all__ = [
    "DEFAULT_SOCKET",
    "AccessConfig",
    "AgentConfig",
    "ConfigError",
    "Limits",
    "ListenConfig",
    "LogsConfig",
    "MetricsConfig",
    "RunConfig",
    "SecretConfig",
    "SimulatedNsmConfig",
    "load_config",
    "parse_config",
    "store_endpoint",
]

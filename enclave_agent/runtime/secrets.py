"""Named secrets: fetched at start-up, held in memory, served by name, followed as they rotate.

Where a secret comes from (``[secrets.NAME]``, docs/secrets.md):

- inline, ``ciphertext`` or ``ciphertext_file``: one KMS ``Decrypt`` with the configured
  key and context, at start; its version is ``INLINE_VERSION`` and never changes;
- a store, ``from``: the store is read through the proxy (``stores``), and the sealed
  bytes it holds are opened (``open_sealed``) always with the context
  ``{"enclave-kms:secret": NAME}``: a plain sealed value is one ``Decrypt``, an
  envelope a ``Decrypt`` of its data key then AES-GCM with the name as associated
  data. So a ciphertext of another secret, or one made without the context, does not
  open here. The version is the one the store reports;
- a file of the image, ``from = "file:..."``: the sealed bytes (``load_config`` read
  them) are opened as a store's are, once, at start; the file cannot change while the
  enclave runs. Its version is ``digest_version`` of the bytes (what ``seal`` printed).

The agent reports ready only after every secret is in (``load``): a store secret is
retried with backoff for what may pass (the store down, throttling) until
``limits.store_read_timeout``; anything else, or that deadline, stops the start-up
naming the secret(s) and the reason.

What is served is one ``Served`` (value and version), replaced as a whole: a reader
sees the old or the new one, never a mix. With ``refresh``, ``follow`` re-reads each
such secret every ``refresh`` seconds; a version other than the served one is
opened, its file copy replaced (temporary file + rename), and then it is swapped in
and every request waiting for a newer version (``wait_for``) wakes. A failed refresh
(the store down or refusing, an answer for another resource, a ciphertext that does
not open for this name, a copy that cannot be written) keeps the served value, is
logged (``secret_refresh_failed``: the name and why, never a value) and tried again
after a backoff (full jitter from ``RETRY_BASE``, capped at ``RETRY_CAP`` and at
``refresh``). A secret whose last good read is older than its ``stale_after`` is
stale (``health``, for ``/healthz``).

Counted through ``SecretEvents`` (the agent's ``metrics.AgentMetrics``): ``secret_fetched``
at each good read (the metrics give each secret's age from it) and
``secret_refresh_failed`` at each failed refresh.

Optional file copies (for apps that only read files) are written mode 0400 through a
temporary name and a rename, so an app never reads half a secret, and deleted when
the agent stops. Put them on a tmpfs: the enclave has no disk, but a development
machine does.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import trio

from enclave_agent.runtime.backoff import full_jitter
from enclave_agent.runtime.config import SecretConfig
from enclave_agent.runtime.kms import KmsError
from enclave_agent.runtime.metrics import AgentMetrics
from enclave_agent.runtime.sealed import (
    Envelope,
    SealedFormatError,
    SealedOpenError,
    digest_version,
    encryption_context,
    open_envelope,
    parse_sealed,
)
from enclave_agent.runtime.store_location import FileLocation, StoreLocation
from enclave_agent.runtime.store_protocol import StoredSecret
from enclave_agent.runtime.stores import StoreError
from enclave_common.logs import get_logger

log = get_logger()

INLINE_VERSION = "config"  # the version of an inline secret (ciphertext in the config)
RETRY_BASE = 1.0  # seconds: the first retry of a failed read comes within this
RETRY_CAP = 60.0  # seconds: retries are never further apart (nor than ``refresh``)
# What KMS answers to a ciphertext whose context is not the one given, and what that
# means for a sealed secret (KMS gives no message of its own).
_NOT_FOR_THIS_NAME = (
    "it does not open for this secret's name: a ciphertext of another secret, one made "
    "without the enclave-kms:secret context, or one under another key"
)


class SecretError(Exception):
    """A named secret could not be fetched or written; the message names it."""


class FetchError(Exception):
    """One try at a secret failed: ``reason`` says why (never a value); ``retryable``:
    another try may succeed (the store down or throttling)."""

    def __init__(self, reason: str, *, retryable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


class Decrypter(Protocol):
    async def call(self, operation: str, request: Mapping[str, Any]) -> dict[str, Any]: ...


class Reader(Protocol):
    """What the store needs of ``stores.StoreReader``."""

    async def read(
        self, name: str, location: StoreLocation, bucket_owner: str | None
    ) -> StoredSecret: ...


class SecretEvents(Protocol):
    """What secrets tell the metrics (``metrics.AgentMetrics`` has these hooks)."""

    def secret_fetched(self, name: str) -> None: ...

    def secret_refresh_failed(self, name: str) -> None: ...


@dataclass(frozen=True, repr=False)
class Served:
    """A secret's value and its version, always replaced together."""

    value: bytes
    version: str

    def __repr__(self) -> str:  # never the value
        return f"Served(version={self.version!r}, value=<{len(self.value)} bytes>)"


def decrypt_request(secret: SecretConfig) -> dict[str, Any]:
    request: dict[str, Any] = {"CiphertextBlob": base64.b64encode(secret.ciphertext).decode()}
    if secret.key_id:
        request["KeyId"] = secret.key_id
    if secret.encryption_context:
        request["EncryptionContext"] = dict(secret.encryption_context)
    return request


async def _decrypt(gateway: Decrypter, request: dict[str, Any]) -> bytes:
    try:
        answer = await gateway.call("Decrypt", request)
        return base64.b64decode(answer["Plaintext"], validate=True)
    except KmsError as exc:
        reason = f"{exc.error_type}: {exc.message}" if exc.message else exc.error_type
        if exc.error_type == "InvalidCiphertextException" and request.get("EncryptionContext"):
            reason += f" ({_NOT_FOR_THIS_NAME})"
        raise FetchError(reason) from None
    except (KeyError, TypeError, binascii.Error, ValueError):
        raise FetchError("the Decrypt answer carried no usable Plaintext") from None


async def open_sealed(
    gateway: Decrypter, name: str, sealed: bytes, key_id: str | None = None
) -> bytes:
    """The value of the sealed secret ``name``: Decrypt (with ``Recipient``, through the
    gateway, which checks the answering key is trusted) under the name's context, and
    for an envelope AES-GCM with the name; FetchError saying why not."""
    try:
        form = parse_sealed(sealed)
    except SealedFormatError as exc:
        raise FetchError(f"not a sealed secret: {exc}") from None
    blob = form.data_key_blob if isinstance(form, Envelope) else form.ciphertext_blob
    request: dict[str, Any] = {
        "CiphertextBlob": base64.b64encode(blob).decode(),
        "EncryptionContext": encryption_context(name),
    }
    if key_id:
        request["KeyId"] = key_id
    opened = await _decrypt(gateway, request)
    if not isinstance(form, Envelope):
        return opened
    try:
        return open_envelope(name, form, opened)
    except SealedOpenError as exc:
        raise FetchError(f"{exc} ({_NOT_FOR_THIS_NAME})") from None


class SecretStore:
    def __init__(
        self,
        secrets: Mapping[str, SecretConfig],
        gateway: Decrypter,
        reader: Reader | None = None,
        *,
        read_timeout: float = 10.0,
        events: SecretEvents | None = None,
    ) -> None:
        """``reader`` reads the stores (needed when a secret has ``from``);
        ``read_timeout``: how long the start tries a store secret."""
        self._configs = dict(secrets)
        self._gateway = gateway
        self._reader = reader
        self._read_timeout = read_timeout
        self._events: SecretEvents = events or AgentMetrics()
        self._served: dict[str, Served] = {}
        self._good_read: dict[str, float] = {}  # trio time of each secret's last good read
        self._failures: dict[str, int] = {}  # failed refreshes in a row
        self._changed: dict[str, trio.Event] = {}  # set (and replaced) at each new version
        self._written: dict[Path, tuple[int, int]] = {}  # file copy -> (st_dev, st_ino)

    def __len__(self) -> int:
        return len(self._served)

    def get(self, name: str) -> Served | None:
        return self._served.get(name)

    async def wait_for(self, name: str, after: str | None, wait: float) -> Served | None:
        """``name``'s value once its version is other than ``after``, or after ``wait``
        seconds (then the same version); at once without ``after``."""
        served = self._served.get(name)
        if served is None or after is None or served.version != after:
            return served
        with trio.move_on_after(wait):
            while self._served[name].version == after:
                await self._changed[name].wait()
        return self._served[name]

    def health(self) -> dict[str, Any]:
        """``status`` ("ok", or "stale" with the ``stale`` secrets' names) and, if any
        are configured, ``secrets``: each one's version and, for refreshed ones, the
        age of the last good read, failures in a row and whether it is stale."""
        now = trio.current_time()
        secrets: dict[str, dict[str, Any]] = {}
        for name, secret in self._configs.items():
            served = self._served.get(name)
            entry: dict[str, Any] = {"version": served.version if served else None}
            stale_after = secret.stale_seconds
            if stale_after is not None and name in self._good_read:
                age = now - self._good_read[name]
                entry.update(
                    age_seconds=round(age, 1),
                    refresh_failures=self._failures.get(name, 0),
                    stale=age > stale_after,
                )
            secrets[name] = entry
        stale = sorted(name for name, entry in secrets.items() if entry.get("stale"))
        health: dict[str, Any] = {"status": "stale", "stale": stale} if stale else {"status": "ok"}
        if secrets:
            health["secrets"] = secrets
        return health

    # --- start-up -----------------------------------------------------------------------

    async def load(self) -> None:
        """Fetch every configured secret (concurrently) and write the file copies."""
        failures: dict[str, str] = {}

        async def one(secret: SecretConfig) -> None:
            try:
                await self._first_fetch(secret)
            except FetchError as exc:
                failures[secret.name] = exc.reason

        async with trio.open_nursery() as nursery:
            for secret in self._configs.values():
                nursery.start_soon(one, secret)
        if failures:
            # The agent will not start: the copies already written go with it.
            self.remove_files()
            for name, reason in sorted(failures.items()):
                log.error("secret_failed", name=name, reason=reason)
            raise SecretError(
                "could not fetch secret(s): "
                + "; ".join(f"{name} ({reason})" for name, reason in sorted(failures.items()))
            )

    async def _first_fetch(self, secret: SecretConfig) -> None:
        if isinstance(secret.location, FileLocation):  # sealed, read by load_config
            value = await open_sealed(self._gateway, secret.name, secret.ciphertext, secret.key_id)
            served = Served(value, digest_version(secret.ciphertext))
        elif secret.location is not None:
            deadline = trio.current_time() + self._read_timeout
            await self._fetch_until_good(secret, give_up_at=deadline)
            return
        else:
            value = await _decrypt(self._gateway, decrypt_request(secret))
            served = Served(value, INLINE_VERSION)
        await self._install(secret, served)
        self._events.secret_fetched(secret.name)

    # --- rotation -----------------------------------------------------------------------

    async def follow(self) -> None:
        """Re-read each secret that has ``refresh``, until cancelled."""
        async with trio.open_nursery() as nursery:
            for secret in self._configs.values():
                if secret.refresh is not None:
                    nursery.start_soon(self._follow_one, secret, secret.refresh)

    async def _follow_one(self, secret: SecretConfig, refresh: float) -> None:
        while True:
            await trio.sleep(refresh)
            await self._fetch_until_good(secret, give_up_at=None)

    async def _fetch_until_good(self, secret: SecretConfig, *, give_up_at: float | None) -> None:
        """Read ``secret``'s store (and open a new version) until one try succeeds,
        waiting a backoff between tries. ``give_up_at`` (the start): the failure is
        raised when another try cannot help or would begin after it; None (a refresh):
        never given up, each failure logged and counted."""
        failures = 0
        while True:
            try:
                await self._fetch(secret)
                self._failures[secret.name] = 0
                return
            except FetchError as exc:
                failures += 1
                cap = min(RETRY_CAP, secret.refresh or RETRY_CAP)
                delay = full_jitter(failures, base=RETRY_BASE, cap=cap)
                if give_up_at is not None:
                    if not exc.retryable or trio.current_time() + delay >= give_up_at:
                        raise
                else:
                    self._refresh_failed(secret, exc, failures, delay)
            await trio.sleep(delay)

    def _refresh_failed(
        self, secret: SecretConfig, error: FetchError, failures: int, delay: float
    ) -> None:
        self._failures[secret.name] = failures
        self._events.secret_refresh_failed(secret.name)
        served = self._served[secret.name]
        log.warning(
            "secret_refresh_failed",
            name=secret.name,
            reason=error.reason,
            failures=failures,
            serving=served.version,  # the last good value is kept
            retry_in_s=round(delay, 1),
        )

    async def _fetch(self, secret: SecretConfig) -> None:
        """One read of ``secret``'s store; a new version opened and installed."""
        assert isinstance(secret.location, StoreLocation) and self._reader is not None
        try:
            stored = await self._reader.read(secret.name, secret.location, secret.bucket_owner)
        except StoreError as exc:
            raise FetchError(exc.message, retryable=exc.retryable) from None
        served = self._served.get(secret.name)
        if served is None or stored.version != served.version:
            value = await open_sealed(self._gateway, secret.name, stored.sealed, secret.key_id)
            await self._install(secret, Served(value, stored.version))
        self._good_read[secret.name] = trio.current_time()
        self._events.secret_fetched(secret.name)

    async def _install(self, secret: SecretConfig, new: Served) -> None:
        """Serve ``new``: its file copy replaced first, then the value, then waiters woken."""
        if secret.file is not None:
            try:
                written = await trio.to_thread.run_sync(write_secret_file, secret.file, new.value)
            except OSError as exc:
                raise FetchError(f"cannot write {secret.file}: {exc.strerror}") from None
            first = secret.file not in self._written
            self._written[secret.file] = written
            fstype = filesystem_type(secret.file)
            if first and fstype not in MEMORY_FILESYSTEMS:
                log.warning(
                    "secret_file_not_in_memory",
                    name=secret.name,
                    path=str(secret.file),
                    fstype=fstype,
                )
        previous = self._served.get(secret.name)
        self._served[secret.name] = new
        woken = self._changed.get(secret.name)
        self._changed[secret.name] = trio.Event()
        if previous is None:
            log.info(
                "secret_loaded",
                name=secret.name,
                version=new.version,
                file=str(secret.file or "") or None,
            )
            return
        if woken is not None:
            woken.set()
        log.info("secret_rotated", name=secret.name, version=new.version, previous=previous.version)

    def remove_files(self) -> None:
        """Delete the file copies this store wrote, when the agent stops.

        Why: in an enclave they vanish with its memory anyway, but on a development
        machine's disk a plaintext copy would outlive the agent. A path that now
        holds another file (not the one written) is left alone.
        """
        for path, identity in list(self._written.items()):
            with contextlib.suppress(OSError):
                info = os.lstat(path)
                if (info.st_dev, info.st_ino) == identity:
                    os.unlink(path)
            del self._written[path]


# Filesystems that live in memory only. An enclave's root is an initramfs (rootfs);
# anywhere else (a development machine's disk) a copy may outlive the process.
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs", "rootfs"})


def filesystem_type(path: Path, mounts: str | None = None) -> str | None:
    """The type of the filesystem holding ``path``, from /proc/self/mounts."""
    if mounts is None:
        try:
            mounts = Path("/proc/self/mounts").read_text()
        except OSError:
            return None
    target = os.path.realpath(path)
    best: tuple[int, str] | None = None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        # Mount points escape spaces as \040.
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= best[0]):
            best = (len(point), fields[2])
    return best[1] if best else None


def write_secret_file(path: Path, value: bytes) -> tuple[int, int]:
    """Write ``value`` to ``path`` with mode 0400, atomically (temp file + rename);
    returns the new file's (st_dev, st_ino)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(value)
            info = os.fstat(handle.fileno())
        os.rename(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return info.st_dev, info.st_ino

"""Named secrets: decrypted once at start-up, held in memory, served by name.

The agent reports ready only after every configured secret has been decrypted
(``SecretStore.load``), so an app started by ``enclave-agent run`` finds them all;
a secret that cannot be decrypted stops the start-up with its name and KMS's error
type. Optional file copies (for apps that only read files) are written mode 0400
through a temporary name and a rename, so an app never reads half a secret, and
deleted when the agent stops. Put them on a tmpfs: the enclave has no disk, but a
development machine does.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import trio

from enclave_agent.runtime.config import SecretConfig
from enclave_agent.runtime.kms import KmsError
from enclave_agent.runtime.metrics import AgentMetrics
from enclave_common.logs import get_logger

log = get_logger()


class SecretError(Exception):
    """A named secret could not be fetched or written; the message names it."""


class Decrypter(Protocol):
    async def call(self, operation: str, request: Mapping[str, Any]) -> dict[str, Any]: ...


def decrypt_request(secret: SecretConfig) -> dict[str, Any]:
    request: dict[str, Any] = {"CiphertextBlob": base64.b64encode(secret.ciphertext).decode()}
    if secret.key_id:
        request["KeyId"] = secret.key_id
    if secret.encryption_context:
        request["EncryptionContext"] = dict(secret.encryption_context)
    return request


class SecretStore:
    def __init__(
        self, secrets: Mapping[str, SecretConfig], metrics: AgentMetrics | None = None
    ) -> None:
        self._configs = dict(secrets)
        self._metrics = metrics or AgentMetrics()
        self._values: dict[str, bytes] = {}
        self._written: dict[Path, tuple[int, int]] = {}  # file copy -> (st_dev, st_ino)

    def __len__(self) -> int:
        return len(self._values)

    def get(self, name: str) -> bytes | None:
        return self._values.get(name)

    async def load(self, gateway: Decrypter) -> None:
        """Decrypt every configured secret (concurrently) and write the file copies."""
        failures: dict[str, str] = {}

        async def one(secret: SecretConfig) -> None:
            try:
                answer = await gateway.call("Decrypt", decrypt_request(secret))
                value = base64.b64decode(answer["Plaintext"], validate=True)
            except KmsError as exc:
                failures[secret.name] = f"{exc.error_type}: {exc.message}"
                return
            except (KeyError, TypeError, binascii.Error, ValueError):
                failures[secret.name] = "the Decrypt answer carried no usable Plaintext"
                return
            if secret.file is not None:
                try:
                    written = await trio.to_thread.run_sync(write_secret_file, secret.file, value)
                    self._written[secret.file] = written
                except OSError as exc:
                    failures[secret.name] = f"cannot write {secret.file}: {exc.strerror}"
                    return
                fstype = filesystem_type(secret.file)
                if fstype not in MEMORY_FILESYSTEMS:
                    log.warning(
                        "secret_file_not_in_memory",
                        name=secret.name,
                        path=str(secret.file),
                        fstype=fstype,
                    )
            self._values[secret.name] = value
            self._metrics.secret_fetched(secret.name)
            log.info("secret_loaded", name=secret.name, file=str(secret.file or "") or None)

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

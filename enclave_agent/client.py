"""A small synchronous client for apps in the enclave. Standard library only.

    from enclave_agent.client import AgentClient

    agent = AgentClient()                       # $ENCLAVE_AGENT_SOCKET or the default path
    password = agent.secret("db_password")      # a named secret from the agent's config
    current = agent.secret_version("db_password")           # .value, .version
    newer = agent.secret_version("db_password", after=current.version, wait=60)
    plaintext = agent.decrypt(ciphertext_blob)  # KMS Decrypt, attested by the agent
    key = agent.generate_data_key("alias/app")  # key.plaintext, key.ciphertext_blob

Errors come back as ``AgentError`` carrying KMS's error type (``AccessDeniedException``
when the key policy does not admit this enclave, ...). One connection is kept
alive and reopened when needed; use one client per thread.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_SOCKET = "/run/enclave-agent/agent.sock"
SOCKET_ENV = "ENCLAVE_AGENT_SOCKET"
_KMS_CONTENT_TYPE = "application/x-amz-json-1.1"


class AgentError(Exception):
    """The agent (or KMS behind it) refused: ``error_type`` is KMS's error name."""

    # The fields of enclave_common.errors.ShownError, which the agent answered with;
    # a class of its own since this library imports nothing but the standard library.

    def __init__(self, error_type: str, message: str, status: int) -> None:
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.message = message
        self.status = status


@dataclass(frozen=True)
class SecretVersion:
    """A named secret's value and the version the agent serves (``X-Secret-Version``)."""

    value: bytes
    version: str

    def __repr__(self) -> str:  # never the value
        return f"SecretVersion(version={self.version!r}, value=<{len(self.value)} bytes>)"


@dataclass(frozen=True)
class DataKey:
    plaintext: bytes
    ciphertext_blob: bytes
    key_id: str

    def __repr__(self) -> str:  # never print key material by accident
        return (
            f"DataKey(key_id={self.key_id!r}, ciphertext_blob=<{len(self.ciphertext_blob)} bytes>)"
        )


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class AgentClient:
    def __init__(self, socket_path: str | None = None, *, timeout: float = 30.0) -> None:
        self.socket_path = socket_path or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET
        self._timeout = timeout
        self._connection: _UnixHTTPConnection | None = None

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- the app-facing verbs ---------------------------------------------------

    def secret(self, name: str) -> bytes:
        return self.secret_version(name).value

    def secret_version(
        self, name: str, *, after: str | None = None, wait: float | None = None
    ) -> SecretVersion:
        """The secret and its version; with ``after``, once the agent serves another
        version than that, or after ``wait`` seconds (at most 300) with the same one."""
        # Quoted: a name holding "?" or "/" must not reach another secret or path.
        path = f"/v1/secrets/{urllib.parse.quote(name, safe='')}"
        if wait is not None and after is None:
            raise ValueError("wait needs after: the version to wait past")
        if after is not None:
            query = {"after": after} | ({} if wait is None else {"wait": f"{wait:g}"})
            path += "?" + urllib.parse.urlencode(query, quote_via=urllib.parse.quote)
        data, headers = self._exchange("GET", path, b"", {}, held=wait or 0.0)
        return SecretVersion(data, headers.get("X-Secret-Version", ""))

    def decrypt(
        self,
        ciphertext_blob: bytes,
        *,
        key_id: str | None = None,
        encryption_context: Mapping[str, str] | None = None,
        encryption_algorithm: str | None = None,
    ) -> bytes:
        request: dict[str, Any] = {"CiphertextBlob": _b64(ciphertext_blob)}
        if key_id:
            request["KeyId"] = key_id
        if encryption_context:
            request["EncryptionContext"] = dict(encryption_context)
        if encryption_algorithm:
            request["EncryptionAlgorithm"] = encryption_algorithm
        return _blob(self.kms("Decrypt", request), "Plaintext")

    def generate_data_key(
        self,
        key_id: str,
        *,
        key_spec: str | None = "AES_256",
        number_of_bytes: int | None = None,
        encryption_context: Mapping[str, str] | None = None,
    ) -> DataKey:
        request: dict[str, Any] = {"KeyId": key_id}
        if number_of_bytes is not None:
            request["NumberOfBytes"] = number_of_bytes
        elif key_spec:
            request["KeySpec"] = key_spec
        if encryption_context:
            request["EncryptionContext"] = dict(encryption_context)
        answer = self.kms("GenerateDataKey", request)
        return DataKey(
            plaintext=_blob(answer, "Plaintext"),
            ciphertext_blob=_blob(answer, "CiphertextBlob"),
            key_id=str(answer.get("KeyId", key_id)),
        )

    def generate_random(self, number_of_bytes: int) -> bytes:
        answer = self.kms("GenerateRandom", {"NumberOfBytes": number_of_bytes})
        return _blob(answer, "Plaintext")

    def attestation(
        self,
        *,
        nonce: bytes | None = None,
        user_data: bytes | None = None,
        public_key: bytes | None = None,
    ) -> bytes:
        fields = {"nonce": nonce, "user_data": user_data, "public_key": public_key}
        body = {name: _b64(value) for name, value in fields.items() if value is not None}
        return self._request(
            "POST",
            "/v1/attestation",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )

    def health(self) -> dict[str, Any]:
        value = json.loads(self._request("GET", "/healthz", b"", {}))
        if not isinstance(value, dict):
            raise AgentError("InvalidResponse", "healthz did not answer a JSON object", 200)
        return value

    def kms(self, operation: str, request: Mapping[str, Any]) -> dict[str, Any]:
        """Any of the agent's KMS operations, in KMS's JSON shape (base64 blobs)."""
        headers = {
            "Content-Type": _KMS_CONTENT_TYPE,
            "X-Amz-Target": f"TrentService.{operation}",
        }
        data = self._request("POST", "/", json.dumps(request).encode(), headers)
        try:
            answer = json.loads(data)
        except ValueError as exc:
            raise AgentError("InvalidResponse", "the agent did not answer JSON", 200) from exc
        if not isinstance(answer, dict):
            raise AgentError("InvalidResponse", "the agent did not answer a JSON object", 200)
        return answer

    # --- HTTP ---------------------------------------------------------------------

    def _request(self, method: str, path: str, body: bytes, headers: Mapping[str, str]) -> bytes:
        return self._exchange(method, path, body, headers)[0]

    def _exchange(
        self,
        method: str,
        path: str,
        body: bytes,
        headers: Mapping[str, str],
        *,
        held: float = 0.0,
    ) -> tuple[bytes, http.client.HTTPMessage]:
        """The answer's body and headers. ``held``: seconds the agent may hold the
        answer (a long-poll), added to the timeout."""
        # A kept-alive connection the agent closed (idle timeout) fails on first use;
        # retry once on a fresh one. Requests are idempotent enough for that: the
        # KMS operations here either read or mint new random material.
        for attempt in (1, 2):
            if self._connection is None:
                self._connection = _UnixHTTPConnection(self.socket_path, self._timeout)
            try:
                self._connection.timeout = self._timeout + held
                if self._connection.sock is not None:
                    self._connection.sock.settimeout(self._timeout + held)
                self._connection.request(method, path, body=body, headers=dict(headers))
                response = self._connection.getresponse()
                data = response.read()
            except (ConnectionError, http.client.RemoteDisconnected, BrokenPipeError):
                self.close()
                if attempt == 2:
                    raise
                continue
            except (OSError, http.client.HTTPException):
                self.close()
                raise
            if response.will_close:
                self.close()
            if response.status >= 400:
                raise _error_from(response.status, data)
            return data, response.headers
        raise AssertionError("unreachable")


def _blob(answer: Mapping[str, Any], member: str) -> bytes:
    try:
        return base64.b64decode(answer[member], validate=True)
    except (KeyError, TypeError, ValueError) as exc:
        raise AgentError("InvalidResponse", f"the answer has no base64 {member}", 200) from exc


def _error_from(status: int, data: bytes) -> AgentError:
    try:
        value = json.loads(data)
        return AgentError(str(value["__type"]), str(value.get("message", "")), status)
    except (ValueError, KeyError, TypeError):
        return AgentError("HttpError", f"HTTP {status} from the agent", status)

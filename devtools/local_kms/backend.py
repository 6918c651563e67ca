"""moto's KMS, in process: the keys, aliases, policies and ciphertexts behind the stand-in.

moto is called through its own request dispatch (``KmsResponse.dispatch`` on a normalized
request, what its in-process mock mode does; its server mode adds Flask around the same
call), so requests get moto's parameter validation and error shapes. Only the
few things the stand-in needs to decide a call before moto does it (which key a call
concerns, that key's policy) are read from moto's backend objects directly.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from typing import Any

from moto.core.request import Request as MotoRequest
from moto.kms.models import kms_backends
from moto.kms.responses import KmsResponse
from moto.kms.utils import KEY_ID_LEN
from werkzeug.exceptions import HTTPException

from devtools.local_kms.policy import default_policy

# Operations moto implements (moto.kms.responses.KmsResponse), which the stand-in passes on.
MOTO_OPERATIONS = frozenset(
    {
        "CancelKeyDeletion",
        "CreateAlias",
        "CreateGrant",
        "CreateKey",
        "Decrypt",
        "DeleteAlias",
        "DescribeKey",
        "DisableKey",
        "DisableKeyRotation",
        "EnableKey",
        "EnableKeyRotation",
        "Encrypt",
        "GenerateDataKey",
        "GenerateDataKeyWithoutPlaintext",
        "GenerateMac",
        "GenerateRandom",
        "GetKeyPolicy",
        "GetKeyRotationStatus",
        "GetPublicKey",
        "ListAliases",
        "ListGrants",
        "ListKeyPolicies",
        "ListKeyRotations",
        "ListKeys",
        "ListResourceTags",
        "ListRetirableGrants",
        "PutKeyPolicy",
        "ReEncrypt",
        "ReplicateKey",
        "RetireGrant",
        "RevokeGrant",
        "RotateKeyOnDemand",
        "ScheduleKeyDeletion",
        "Sign",
        "TagResource",
        "UntagResource",
        "UpdateAlias",
        "UpdateKeyDescription",
        "Verify",
        "VerifyMac",
    }
)
# moto takes the account from a header and the region from the credential scope; this
# placeholder Authorization is never checked by moto (the stand-in checks the real one).
_ACCESS_KEY = "LOCALKMSBACKEND"
ACCOUNT_ID = "111122223333"


@dataclass(frozen=True)
class MotoReply:
    status: int
    body: dict[str, Any]


@dataclass(frozen=True)
class KeyInfo:
    key_id: str
    arn: str
    policy: str


class MotoBackendError(Exception):
    """moto failed in a way that is not a KMS error answer (a moto bug or a gap)."""


class MotoKms:
    def __init__(self, region: str) -> None:
        self.region = region
        self._url = f"https://kms.{region}.amazonaws.com/"
        self._authorization = (
            f"AWS4-HMAC-SHA256 Credential={_ACCESS_KEY}/20000101/{region}/kms/aws4_request, "
            "SignedHeaders=host, Signature=0"
        )
        # moto's backends are plain dicts; the stand-in calls them from one thread at a
        # time, the lock only makes that assumption safe.
        self._lock = threading.Lock()
        # moto lets MOTO_ACCOUNT_ID override the account header; follow it to stay consistent.
        self.account_id = os.environ.get("MOTO_ACCOUNT_ID", ACCOUNT_ID)

    def _backend(self) -> Any:
        return kms_backends[self.account_id][self.region]

    def call(self, operation: str, body: dict[str, Any]) -> MotoReply:
        """Run one KMS operation in moto; raise MotoBackendError if moto itself breaks."""
        with self._lock:
            try:
                request = MotoRequest.from_primitives(
                    "POST",
                    self._url,
                    {
                        "X-Amz-Target": f"TrentService.{operation}",
                        "Content-Type": "application/x-amz-json-1.1",
                        "Authorization": self._authorization,
                        "Host": f"kms.{self.region}.amazonaws.com",
                        "x-moto-account-id": self.account_id,
                    },
                    json.dumps(body).encode(),
                )
                try:
                    status, _headers, raw = KmsResponse.dispatch(
                        request, request.raw_url, request.headers
                    )
                except HTTPException as exc:  # moto's KMS errors (JsonRESTError)
                    status, raw = exc.code or 500, exc.get_body()
            except Exception as exc:  # moto bugs and gaps surface as any exception type
                raise MotoBackendError(f"moto failed on {operation}: {type(exc).__name__}") from exc
        try:
            decoded = json.loads(raw) if raw else {}
        except ValueError as exc:
            raise MotoBackendError(f"moto answered {operation} with non-JSON") from exc
        if decoded is None or decoded == "":
            decoded = {}  # moto answers some operations with "null" or a JSON empty string
        if not isinstance(decoded, dict):
            raise MotoBackendError(f"moto answered {operation} with a non-object")
        return MotoReply(int(status), decoded)

    def key(self, reference: str) -> KeyInfo | None:
        """The key a key id, key ARN, alias name or alias ARN names, or None if none."""
        backend = self._backend()
        with self._lock:
            try:
                key_id = backend.any_id_to_key_id(reference)
            except Exception:  # noqa: BLE001 - moto raises assorted types for unknown aliases
                return None
            key = backend.keys.get(key_id)
            if key is None:
                return None
            policy = key.policy or default_policy(backend.account_id)
            return KeyInfo(key.id, key.arn, policy)

    def key_for_ciphertext(self, ciphertext_blob: bytes) -> KeyInfo | None:
        """The key a moto ciphertext blob was made under (its first 36 bytes name it)."""
        try:
            key_id = ciphertext_blob[:KEY_ID_LEN].decode("ascii")
        except UnicodeDecodeError:
            return None
        return self.key(key_id)

    def encrypt(self, key_reference: str, plaintext: bytes, context: dict[str, str]) -> bytes:
        """Encrypt under a key with moto's format (for operations moto lacks)."""
        backend = self._backend()
        with self._lock:
            blob, _arn = backend.encrypt(
                key_id=key_reference, plaintext=plaintext, encryption_context=context
            )
        return bytes(blob)

"""moto's KMS, in process: the keys, aliases, policies and ciphertexts behind the stand-in.

moto keeps one backend per account (chosen per call by the ``x-moto-account-id``
header), so each of the stand-in's accounts has its own keys, aliases and key ids.

moto is called through its own request dispatch (``KmsResponse.dispatch`` on a normalized
request, what its in-process mock mode does; its server mode adds Flask around the same
call), so requests get moto's parameter validation and error shapes. Only the
few things the stand-in needs to decide a call before moto does it (which key a call
concerns, that key's policy) are read from moto's backend objects directly.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from moto.core.request import Request as MotoRequest
from moto.kms.models import kms_backends
from moto.kms.responses import KmsResponse
from moto.kms.utils import KEY_ID_LEN
from werkzeug.exceptions import HTTPException

from devtools.local_kms.key_ops import KeyMaterial
from devtools.local_kms.policy import ACCOUNT_ID as ACCOUNT_ID_PATTERN
from devtools.local_kms.policy import default_policy
from enclave_common.aws import kms_host

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
# A KMS key or alias ARN: region, account, "key" or "alias", the rest.
_KMS_ARN = re.compile(r"arn:aws[a-z-]*:kms:([a-z0-9-]+):([0-9]{12}):(key|alias)/(.+)", re.DOTALL)


def default_accounts() -> list[str]:
    """The one account of a stand-in started without ``--account``."""
    # moto lets MOTO_ACCOUNT_ID override the account header; follow it to stay consistent.
    return [os.environ.get("MOTO_ACCOUNT_ID", ACCOUNT_ID)]


@dataclass(frozen=True)
class MotoReply:
    status: int
    body: dict[str, Any]


@dataclass(frozen=True)
class KeyInfo:
    key_id: str
    arn: str
    policy: str
    account: str  # the account that owns the key


class MotoBackendError(Exception):
    """moto failed in a way that is not a KMS error answer (a moto bug or a gap)."""


class MotoKms:
    def __init__(self, region: str, accounts: Sequence[str] | None = None) -> None:
        """``accounts``: the accounts the stand-in speaks for, the primary first
        (default: ``default_accounts()``)."""
        accounts = list(accounts) if accounts is not None else default_accounts()
        if not accounts or len(set(accounts)) != len(accounts):
            raise ValueError("the accounts must be at least one and all different")
        for account in accounts:
            if not ACCOUNT_ID_PATTERN.fullmatch(account):
                raise ValueError(f"an account id is 12 digits, got {account!r}")
        pinned = os.environ.get("MOTO_ACCOUNT_ID")
        if pinned is not None and accounts != [pinned]:
            raise ValueError(
                f"MOTO_ACCOUNT_ID={pinned} makes moto use that one account for every call; "
                "unset it to speak for other accounts"
            )
        self.accounts = tuple(accounts)
        self.region = region
        self._url = f"https://{kms_host(region)}/"
        self._authorization = (
            f"AWS4-HMAC-SHA256 Credential={_ACCESS_KEY}/20000101/{region}/kms/aws4_request, "
            "SignedHeaders=host, Signature=0"
        )
        # moto's backends are plain dicts; the stand-in calls them from one thread at a
        # time, the lock only makes that assumption safe.
        self._lock = threading.Lock()

    @property
    def account_id(self) -> str:
        """The primary account (the state file's ``account_id``)."""
        return self.accounts[0]

    def _backend(self, account: str) -> Any:
        return kms_backends[account][self.region]

    def call(self, account: str, operation: str, body: dict[str, Any]) -> MotoReply:
        """Run one KMS operation in moto, in ``account``; raise MotoBackendError if moto
        itself breaks."""
        with self._lock:
            try:
                request = MotoRequest.from_primitives(
                    "POST",
                    self._url,
                    {
                        "X-Amz-Target": f"TrentService.{operation}",
                        "Content-Type": "application/x-amz-json-1.1",
                        "Authorization": self._authorization,
                        "Host": kms_host(self.region),
                        "x-moto-account-id": account,
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

    def account_of(self, reference: str, caller_account: str) -> str | None:
        """The account in which KMS looks ``reference`` up for a caller of
        ``caller_account``: the account a key or alias ARN names (None if that ARN is not
        one of this stand-in's accounts and region, so it names no key), else the
        caller's own: an alias name or a bare key id never reaches another account
        (KMS API reference, KeyId: "To specify a KMS key in a different AWS account, you
        must use the key ARN or alias ARN")."""
        if not reference.startswith("arn:"):
            return caller_account
        match = _KMS_ARN.fullmatch(reference)
        if match is None or match.group(1) != self.region or match.group(2) not in self.accounts:
            return None
        return match.group(2)

    def key(self, reference: str, caller_account: str) -> KeyInfo | None:
        """The key a key id, key ARN, alias name or alias ARN names for a caller of
        ``caller_account`` (see ``account_of``), or None if none."""
        account = self.account_of(reference, caller_account)
        if account is None:
            return None
        backend = self._backend(account)
        with self._lock:
            try:
                key_id = backend.any_id_to_key_id(reference)
            except Exception:  # noqa: BLE001 - moto raises assorted types for unknown aliases
                return None
            key = backend.keys.get(key_id)
            if key is None:
                return None
            policy = key.policy or default_policy(account)
            return KeyInfo(key.id, key.arn, policy, account)

    def key_for_ciphertext(self, ciphertext_blob: bytes) -> KeyInfo | None:
        """The key a moto ciphertext blob was made under, in whichever account holds it
        (its first 36 bytes name the key; a real ciphertext names its key whatever the
        caller's account, which is how Decrypt works across accounts)."""
        try:
            key_id = ciphertext_blob[:KEY_ID_LEN].decode("ascii")
        except UnicodeDecodeError:
            return None
        with self._lock:
            owner = next((a for a in self.accounts if key_id in self._backend(a).keys), None)
        return None if owner is None else self.key(key_id, owner)

    def key_material(self, key: KeyInfo) -> KeyMaterial:
        """The key's usage, spec and material, for the operations the stand-in does
        itself (``key_ops``)."""
        with self._lock:
            stored = self._backend(key.account).keys[key.key_id]
            return KeyMaterial(
                arn=stored.arn,
                usage=stored.key_usage or "ENCRYPT_DECRYPT",
                spec=stored.key_spec,
                private_key=stored.private_key.private_key,
                secret=bytes(stored.key_material),
                origin=stored.origin,
            )

    def encrypt(self, key: KeyInfo, plaintext: bytes, context: dict[str, str]) -> bytes:
        """Encrypt under a key with moto's format (for operations moto lacks)."""
        backend = self._backend(key.account)
        with self._lock:
            blob, _arn = backend.encrypt(
                key_id=key.key_id, plaintext=plaintext, encryption_context=context
            )
        return bytes(blob)

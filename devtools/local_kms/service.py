"""One KMS JSON 1.1 call, from received request to answer, without any I/O.

Order, as AWS applies it: protocol checks (target, JSON body) → SigV4 (and session
token) → Recipient verification → key policy → the operation (moto, or here for what
moto lacks) → the plaintext field replaced by `CiphertextForRecipient` when the call
carried a Recipient.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from devtools.local_kms.backend import MOTO_OPERATIONS, KeyInfo, MotoBackendError, MotoKms
from devtools.local_kms.credentials import CredentialStore
from devtools.local_kms.envelope import encrypt_for_recipient
from devtools.local_kms.policy import Decision, PolicyError, parse_policy, recipient_context
from devtools.local_kms.recipient import RecipientError, VerifiedRecipient, verify_recipient
from devtools.local_kms.shapes import ShapeError, check_request, operation_names
from devtools.local_kms.sigv4 import Request, SignatureError, check_signature

TARGET_PREFIX = "TrentService."
JSON_CONTENT_TYPE = "application/x-amz-json-1.1"
# The field of each Recipient-capable operation's answer that holds the secret.
RECIPIENT_OPERATIONS = {
    "Decrypt": "Plaintext",
    "GenerateDataKey": "Plaintext",
    "GenerateDataKeyPair": "PrivateKeyPlaintext",
    "GenerateRandom": "Plaintext",
    "DeriveSharedSecret": "SharedSecret",
}
LOCAL_OPERATIONS = frozenset({"GenerateDataKeyPair", "GenerateDataKeyPairWithoutPlaintext"})
# Operations not scoped to one key: IAM decides them on AWS, and the stand-in's one
# caller holds every IAM permission.
_KEYLESS = frozenset(
    {"CreateKey", "GenerateRandom", "ListAliases", "ListKeys", "ListRetirableGrants"}
)
_KEY_PAIR_SPECS: dict[str, Callable[[], Any]] = {
    "RSA_2048": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "RSA_3072": lambda: rsa.generate_private_key(public_exponent=65537, key_size=3072),
    "RSA_4096": lambda: rsa.generate_private_key(public_exponent=65537, key_size=4096),
    "ECC_NIST_P256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "ECC_NIST_P384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "ECC_NIST_P521": lambda: ec.generate_private_key(ec.SECP521R1()),
    "ECC_SECG_P256K1": lambda: ec.generate_private_key(ec.SECP256K1()),
}


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    operation: str | None = None
    error_type: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)


class KmsError(Exception):
    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message


def _validation(message: str) -> KmsError:
    return KmsError(400, "ValidationException", message)


def error_reply(status: int, error_type: str, message: str, operation: str | None) -> Reply:
    body = json.dumps({"__type": error_type, "message": message}).encode()
    return Reply(status, body, operation, error_type, [("x-amzn-ErrorType", error_type)])


class LocalKms:
    """The stand-in's KMS: SigV4, Recipient, key policies, and moto for the rest."""

    def __init__(
        self,
        *,
        region: str,
        roots: Sequence[bytes],
        credentials: CredentialStore,
        moto: MotoKms | None = None,
    ) -> None:
        self.region = region
        self.roots = list(roots)
        self.credentials = credentials
        self.moto = moto or MotoKms(region)

    def handle(self, request: Request, now: datetime) -> Reply:
        operation: str | None = None
        try:
            operation = self._operation(request)
            self._authenticate(request, now)
            body = self._body(request)
            return self._call(operation, body, now)
        except KmsError as exc:
            return error_reply(exc.status, exc.error_type, exc.message, operation)
        except SignatureError as exc:
            return error_reply(400, exc.error_type, exc.message, operation)
        except MotoBackendError as exc:
            return error_reply(500, "KMSInternalException", str(exc), operation)

    def _operation(self, request: Request) -> str:
        if request.method != "POST" or request.target.partition("?")[0] != "/":
            raise KmsError(404, "UnknownOperationException", "KMS answers POST / only")
        target = request.headers.get("x-amz-target", "")
        if not target.startswith(TARGET_PREFIX):
            raise KmsError(
                400, "UnknownOperationException", "X-Amz-Target must be TrentService.<Operation>"
            )
        operation = target[len(TARGET_PREFIX) :]
        if operation not in operation_names():
            raise KmsError(400, "UnknownOperationException", "unknown operation")
        if operation not in MOTO_OPERATIONS and operation not in LOCAL_OPERATIONS:
            raise KmsError(
                400,
                "UnsupportedOperationException",
                f"the local KMS does not implement {operation}",
            )
        return operation

    def _authenticate(self, request: Request, now: datetime) -> None:
        token = request.headers.get("x-amz-security-token")
        check_signature(
            request,
            service="kms",
            region=self.region,
            secret_for=lambda key_id: self.credentials.secret_for(key_id, token, now),
            now=now,
        )

    @staticmethod
    def _body(request: Request) -> dict[str, Any]:
        try:
            body = json.loads(request.body) if request.body else {}
        except (ValueError, RecursionError) as exc:
            raise KmsError(400, "SerializationException", "request body is not JSON") from exc
        if not isinstance(body, dict):
            raise KmsError(400, "SerializationException", "request body must be a JSON object")
        return body

    def _call(self, operation: str, body: dict[str, Any], now: datetime) -> Reply:
        try:
            body = check_request(operation, body)
        except ShapeError as exc:
            raise KmsError(400, exc.error_type, exc.message) from exc
        if operation == "GenerateRandom" and body.get("NumberOfBytes") is None:
            # Optional in the model, but KMS has no default length (and moto crashes).
            raise _validation("NumberOfBytes is required")
        recipient: VerifiedRecipient | None = None
        # check_request dropped Recipient from operations whose model lacks it.
        if "Recipient" in body:
            try:
                recipient = verify_recipient(body.pop("Recipient"), self.roots, now)
            except RecipientError as exc:
                raise _validation(str(exc)) from exc
        if operation in ("CreateKey", "PutKeyPolicy") and body.get("Policy") is not None:
            if not isinstance(body["Policy"], str):
                raise _validation("Policy must be a string")
            try:
                parse_policy(body["Policy"])
            except PolicyError as exc:
                raise KmsError(400, "MalformedPolicyDocumentException", str(exc)) from exc
        context = recipient_context(recipient.pcrs) if recipient else {}
        context["kms:calleraccount"] = self.moto.account_id
        for action, key in self._keys_concerned(operation, body):
            self._authorize(action, key, context)

        if operation in LOCAL_OPERATIONS:
            answer = self._generate_data_key_pair(body)
            if operation == "GenerateDataKeyPairWithoutPlaintext":
                del answer["PrivateKeyPlaintext"]
        else:
            reply = self.moto.call(operation, body)
            if reply.status >= 400:
                error_type = str(reply.body.get("__type", "KMSInternalException"))
                message = str(reply.body.get("message", reply.body.get("Message", "")))
                raise KmsError(reply.status, error_type.rpartition("#")[2], message)
            answer = reply.body
        if operation == "Decrypt":
            answer.setdefault(
                "EncryptionAlgorithm", body.get("EncryptionAlgorithm", "SYMMETRIC_DEFAULT")
            )
        if recipient is not None:
            secret_field = RECIPIENT_OPERATIONS[operation]
            secret = base64.b64decode(answer.pop(secret_field))
            envelope = encrypt_for_recipient(secret, recipient.public_key_der)
            answer["CiphertextForRecipient"] = base64.b64encode(envelope).decode()
        return Reply(200, json.dumps(answer).encode(), operation)

    def _keys_concerned(self, operation: str, body: dict[str, Any]) -> list[tuple[str, KeyInfo]]:
        """(action, key) pairs the key policies must allow; unknown keys are left to moto."""
        if operation in _KEYLESS:
            return []
        references: list[tuple[str, KeyInfo | None]] = []

        def by_reference(action: str, name: str) -> None:
            value = body.get(name)
            if isinstance(value, str):
                references.append((action, self.moto.key(value)))

        def by_ciphertext(action: str, named: str) -> None:
            # The key that will decrypt is the one the ciphertext names, whatever key the
            # request names: that key's policy decides (moto's ReEncrypt ignores
            # SourceKeyId, so deciding by it would let any allowed key unlock any blob).
            value = body.get("CiphertextBlob")
            if not isinstance(value, str):
                return
            try:
                blob = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                return
            key = self.moto.key_for_ciphertext(blob)
            reference = body.get(named)
            if key is not None and isinstance(reference, str):
                named_key = self.moto.key(reference)
                if named_key is not None and named_key.key_id != key.key_id:
                    raise KmsError(
                        400,
                        "IncorrectKeyException",
                        "The key ID in the request does not identify a CMK that can perform "
                        "this operation.",
                    )
            references.append((action, key))

        if operation == "Decrypt":
            by_ciphertext("kms:Decrypt", "KeyId")
        elif operation == "ReEncrypt":
            by_ciphertext("kms:ReEncryptFrom", "SourceKeyId")
            by_reference("kms:ReEncryptTo", "DestinationKeyId")
        elif operation in ("CreateAlias", "UpdateAlias"):
            by_reference(f"kms:{operation}", "TargetKeyId")
        elif operation == "DeleteAlias":
            by_reference("kms:DeleteAlias", "AliasName")
        else:
            by_reference(f"kms:{operation}", "KeyId")
        return [(action, key) for action, key in references if key is not None]

    def _authorize(self, action: str, key: KeyInfo, context: dict[str, str]) -> None:
        try:
            decision = parse_policy(key.policy).evaluate(action, context)
        except PolicyError as exc:
            # Every policy set through the stand-in was validated; only a moto default
            # this evaluator cannot read gets here.
            raise KmsError(500, "KMSInternalException", f"stored key policy: {exc}") from exc
        if decision is Decision.ALLOW:
            return
        caller = f"arn:aws:iam::{self.moto.account_id}:user/local-kms"
        reason = (
            "with an explicit deny in a resource-based policy"
            if decision is Decision.EXPLICIT_DENY
            else f"because no resource-based policy allows the {action} action"
        )
        raise KmsError(
            400,
            "AccessDeniedException",
            f"User: {caller} is not authorized to perform: {action} on resource: "
            f"{key.arn} {reason}",
        )

    def _generate_data_key_pair(self, body: dict[str, Any]) -> dict[str, Any]:
        """GenerateDataKeyPair(WithoutPlaintext), which moto lacks: a fresh pair, private
        half encrypted under the KMS key."""
        key_reference = body.get("KeyId")
        spec = body.get("KeyPairSpec")
        if not isinstance(key_reference, str):
            raise _validation("KeyId is required")
        if spec not in _KEY_PAIR_SPECS:
            raise _validation(f"KeyPairSpec must be one of {', '.join(_KEY_PAIR_SPECS)}")
        context = body.get("EncryptionContext", {})
        if not isinstance(context, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in context.items()
        ):
            raise _validation("EncryptionContext must map strings to strings")
        key = self.moto.key(key_reference)
        if key is None:
            raise KmsError(400, "NotFoundException", f"Key '{key_reference}' does not exist")
        private_key = _KEY_PAIR_SPECS[spec]()
        private_der = private_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        public_der = private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        blob = self.moto.encrypt(key.key_id, private_der, context)
        return {
            "KeyId": key.arn,
            "KeyPairSpec": spec,
            "PrivateKeyCiphertextBlob": base64.b64encode(blob).decode(),
            "PrivateKeyPlaintext": base64.b64encode(private_der).decode(),
            "PublicKey": base64.b64encode(public_der).decode(),
        }


def new_request_id() -> str:
    return str(uuid.uuid4())

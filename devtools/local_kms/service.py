"""One KMS JSON 1.1 call, from received request to answer, without any I/O.

Order, as AWS applies it: protocol checks (target, JSON body) → SigV4 (and session
token), which says who calls (account, principal) → Recipient verification → the keys
the call concerns, looked up as KMS does for that caller → key policy → the operation
(moto, in the account that owns the key, or here for what moto lacks) → the plaintext
field replaced by `CiphertextForRecipient` when the call carried a Recipient.

Across accounts, as AWS documents it ("Allowing users in other accounts to use a KMS
key", https://docs.aws.amazon.com/kms/latest/developerguide/
key-policy-modifying-external-accounts.html, and each operation's "Cross-account use"):
an alias name or bare key id is looked up in the caller's account only, so another
account's alias is NotFoundException; another account's key, named by key or alias ARN
(or by its ciphertext), serves only the operations in CROSS_ACCOUNT_OPERATIONS and only
if its key policy names the caller's account or principal, else AccessDeniedException;
alias operations, CreateKey and the listings touch the caller's account only.
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

from devtools.local_kms import key_ops
from devtools.local_kms.backend import MOTO_OPERATIONS, KeyInfo, MotoBackendError, MotoKms
from devtools.local_kms.credentials import CredentialStore
from devtools.local_kms.envelope import encrypt_for_recipient
from devtools.local_kms.faults import DocumentAgeRule
from devtools.local_kms.policy import (
    Caller,
    Decision,
    PolicyError,
    parse_policy,
    recipient_context,
)
from devtools.local_kms.recipient import RecipientError, VerifiedRecipient, verify_recipient
from devtools.local_kms.shapes import check_request, operation_names
from devtools.local_kms.sigv4 import Request
from enclave_common.errors import ShownError

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
# Done here rather than by moto: the data key pairs (moto lacks them) and key_ops's.
LOCAL_OPERATIONS = frozenset(
    {"GenerateDataKeyPair", "GenerateDataKeyPairWithoutPlaintext", *key_ops.OPERATIONS}
)
# The listings KMS pages (Limit: 1-1000, default 100; Marker: the last page's NextMarker),
# and the member of the answer they page. moto answers every entry at once.
_PAGED = {"ListKeys": "Keys", "ListAliases": "Aliases"}
_DEFAULT_PAGE = 100
# Answer member → the request member naming the algorithm (default SYMMETRIC_DEFAULT).
_ALGORITHMS_ANSWERED = {
    "Decrypt": {"EncryptionAlgorithm": "EncryptionAlgorithm"},
    "Encrypt": {"EncryptionAlgorithm": "EncryptionAlgorithm"},
    "ReEncrypt": {
        "SourceEncryptionAlgorithm": "SourceEncryptionAlgorithm",
        "DestinationEncryptionAlgorithm": "DestinationEncryptionAlgorithm",
    },
}
# Operations not scoped to one key: IAM decides them on AWS, and every caller of the
# stand-in holds every IAM permission. They act in the caller's account.
_KEYLESS = frozenset(
    {"CreateKey", "GenerateRandom", "ListAliases", "ListKeys", "ListRetirableGrants"}
)
# The operations that may use a key of another account (AWS KMS API reference,
# "Cross-account use: Yes"); any other is refused on another account's key whatever its
# key policy says.
CROSS_ACCOUNT_OPERATIONS = frozenset(
    {
        "CreateGrant",
        "Decrypt",
        "DeriveSharedSecret",
        "DescribeKey",
        "Encrypt",
        "GenerateDataKey",
        "GenerateDataKeyPair",
        "GenerateDataKeyPairWithoutPlaintext",
        "GenerateDataKeyWithoutPlaintext",
        "GenerateMac",
        "GetKeyRotationStatus",
        "GetPublicKey",
        "ListGrants",
        "ReEncrypt",
        "RetireGrant",
        "RevokeGrant",
        "Sign",
        "Verify",
        "VerifyMac",
    }
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
    content_type: str = JSON_CONTENT_TYPE


class ServiceError(ShownError):
    """What the service itself would answer (KMS, Secrets Manager, SSM)."""


def _validation(message: str) -> ServiceError:
    return ServiceError("ValidationException", message, 400)


def error_reply(status: int, error_type: str, message: str, operation: str | None) -> Reply:
    """An error of a JSON 1.1 service (KMS, Secrets Manager, SSM) in AWS's shape."""
    body = json.dumps({"__type": error_type, "message": message}).encode()
    return Reply(status, body, operation, error_type, [("x-amzn-ErrorType", error_type)])


def json_object(request: Request) -> dict[str, Any]:
    """A JSON service's request body: a JSON object, else SerializationException."""
    try:
        body = json.loads(request.body) if request.body else {}
    except (ValueError, RecursionError) as exc:
        raise ServiceError("SerializationException", "request body is not JSON", 400) from exc
    if not isinstance(body, dict):
        raise ServiceError("SerializationException", "request body must be a JSON object", 400)
    return body


def target_operation(request: Request, prefix: str, service: str) -> str:
    """The operation a JSON 1.1 request names (``X-Amz-Target: PREFIX.Operation``) if
    botocore's model of ``service`` has it, else UnknownOperationException."""
    if request.method != "POST" or request.target.partition("?")[0] != "/":
        raise ServiceError("UnknownOperationException", f"{service} answers POST / only", 404)
    target = request.headers.get("x-amz-target", "")
    if not target.startswith(prefix):
        raise ServiceError(
            "UnknownOperationException", f"X-Amz-Target must be {prefix}<Operation>", 400
        )
    operation = target[len(prefix) :]
    if operation not in operation_names(service):
        raise ServiceError("UnknownOperationException", "unknown operation", 400)
    return operation


def operation_of(request: Request) -> str | None:
    """The operation a JSON 1.1 request names, for logs (unchecked)."""
    return request.headers.get("x-amz-target", "").partition(".")[2] or None


class LocalKms:
    """The stand-in's KMS: SigV4, Recipient, key policies, and moto for the rest."""

    name = "kms"

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
        self.moto = moto or MotoKms(region, credentials.accounts)
        self.document_age: DocumentAgeRule | None = None  # set through the admin route
        if self.moto.accounts != credentials.accounts:
            raise ValueError("moto and the credentials must speak for the same accounts")

    def handle(self, request: Request, now: datetime) -> Reply:
        operation: str | None = None
        try:
            operation = self._operation(request)
            caller = self.credentials.authenticate(
                request, service="kms", region=self.region, now=now
            )
            body = json_object(request)
            return self._call(operation, body, now, caller)
        except ShownError as exc:  # ServiceError, and the signature's and the shape's errors
            return error_reply(exc.status, exc.error_type, exc.message, operation)
        except MotoBackendError as exc:
            return error_reply(500, "KMSInternalException", str(exc), operation)

    def error(self, status: int, error_type: str, message: str, request: Request) -> Reply:
        return error_reply(status, error_type, message, operation_of(request))

    def _operation(self, request: Request) -> str:
        operation = target_operation(request, TARGET_PREFIX, self.name)
        if operation not in MOTO_OPERATIONS and operation not in LOCAL_OPERATIONS:
            raise ServiceError(
                "UnsupportedOperationException",
                f"the local KMS does not implement {operation}",
                400,
            )
        return operation

    def _call(self, operation: str, body: dict[str, Any], now: datetime, caller: Caller) -> Reply:
        body = check_request(operation, body)
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
            self._check_document_age(recipient, now, caller)
        if operation in ("CreateKey", "PutKeyPolicy") and body.get("Policy") is not None:
            if not isinstance(body["Policy"], str):
                raise _validation("Policy must be a string")
            try:
                parse_policy(body["Policy"])
            except PolicyError as exc:
                raise ServiceError("MalformedPolicyDocumentException", str(exc), 400) from exc
        if (
            operation == "CreateKey"
            and body.get("KeyUsage") == "KEY_AGREEMENT"
            and body.get("KeySpec") not in key_ops.KEY_AGREEMENT_SPECS
        ):
            # moto would make one of any spec; KMS's are on NIST curves (or SM2, China).
            raise _validation(
                f"KEY_AGREEMENT keys need one of {', '.join(sorted(key_ops.KEY_AGREEMENT_SPECS))}"
            )
        context = recipient_context(recipient.pcrs) if recipient else {}
        concerned, unresolved = self._keys_concerned(operation, body, caller)
        for action, key in concerned:
            if key.account != caller.account and operation not in CROSS_ACCOUNT_OPERATIONS:
                raise _access_denied(
                    caller, action, key, f"because {action} cannot use a key of another account"
                )
            self._authorize(action, key, caller, context)
        owners = {key.account for _action, key in concerned}
        if unresolved and owners - {caller.account}:
            # moto would look the unresolved name up in the key's account, not the caller's.
            raise _not_found(unresolved[0], caller.account, self.region)

        if operation in key_ops.OPERATIONS:
            answer = self._key_op(operation, body, concerned, caller)
        elif operation in LOCAL_OPERATIONS:
            answer = self._generate_data_key_pair(body, caller)
            if operation == "GenerateDataKeyPairWithoutPlaintext":
                del answer["PrivateKeyPlaintext"]
        elif len(owners) > 1:  # only ReEncrypt names two keys, here of two accounts
            answer = self._re_encrypt_across(body, dict(concerned))
        else:
            # moto works in the account that owns the key (the caller's when keyless).
            answer = self._moto(owners.pop() if owners else caller.account, operation, body)
        if operation in _PAGED:
            answer = _page(answer, _PAGED[operation], body)
        # The algorithms KMS names in its answers and moto leaves out.
        for member, asked in _ALGORITHMS_ANSWERED.get(operation, {}).items():
            answer.setdefault(member, body.get(asked, "SYMMETRIC_DEFAULT"))
        if recipient is not None:
            secret_field = RECIPIENT_OPERATIONS[operation]
            secret = base64.b64decode(answer.pop(secret_field))
            envelope = encrypt_for_recipient(secret, recipient.public_key_der)
            answer["CiphertextForRecipient"] = base64.b64encode(envelope).decode()
        return Reply(200, json.dumps(answer).encode(), operation)

    def _key_op(
        self,
        operation: str,
        body: dict[str, Any],
        concerned: list[tuple[str, KeyInfo]],
        caller: Caller,
    ) -> dict[str, Any]:
        """One of key_ops's operations on the key the request names (resolved and
        authorized by then; none: the name resolved to no key in the caller's account)."""
        if not concerned:
            raise _not_found(str(body.get("KeyId")), caller.account, self.region)
        material = self.moto.key_material(concerned[0][1])
        try:
            return key_ops.OPERATIONS[operation](material, body)
        except key_ops.KeyOpError as exc:
            raise ServiceError(exc.error_type, exc.message, exc.status) from None

    def _check_document_age(
        self, recipient: VerifiedRecipient, now: datetime, caller: Caller
    ) -> None:
        rule = self.document_age
        if rule is None:
            return
        age = (now - recipient.timestamp).total_seconds()
        if age <= rule.max_age:
            return
        if rule.answer == "AccessDeniedException":
            raise ServiceError(
                rule.answer,
                f"User: {caller.arn} is not authorized to use this attestation document: "
                f"it is {age:.1f} s old, more than {rule.max_age:g} s (local KMS rule)",
                400,
            )
        raise _validation(
            f"invalid attestation document: it is {age:.1f} s old, more than "
            f"{rule.max_age:g} s (local KMS rule)"
        )

    def _moto(self, account: str, operation: str, body: dict[str, Any]) -> dict[str, Any]:
        """moto's answer to ``operation`` in ``account``, or its error as a ServiceError."""
        reply = self.moto.call(account, operation, body)
        if reply.status >= 400:
            error_type = str(reply.body.get("__type", "KMSInternalException"))
            message = str(reply.body.get("message", reply.body.get("Message", "")))
            raise ServiceError(error_type.rpartition("#")[2], message, reply.status)
        return reply.body

    def _re_encrypt_across(self, body: dict[str, Any], keys: dict[str, KeyInfo]) -> dict[str, Any]:
        """ReEncrypt from a key of one account to a key of another: moto keeps each
        account apart, so decrypt in the source's and encrypt in the destination's."""
        source, destination = keys["kms:ReEncryptFrom"], keys["kms:ReEncryptTo"]
        decrypt = {"CiphertextBlob": body["CiphertextBlob"], "KeyId": source.arn}
        encrypt = {"KeyId": destination.arn}
        for prefix, request in (("Source", decrypt), ("Destination", encrypt)):
            for member in ("EncryptionContext", "EncryptionAlgorithm"):
                if f"{prefix}{member}" in body:
                    request[member] = body[f"{prefix}{member}"]
        encrypt["Plaintext"] = self._moto(source.account, "Decrypt", decrypt)["Plaintext"]
        answer = self._moto(destination.account, "Encrypt", encrypt)
        return {
            "CiphertextBlob": answer["CiphertextBlob"],
            "KeyId": destination.arn,
            "SourceKeyId": source.arn,
        }

    def _keys_concerned(
        self, operation: str, body: dict[str, Any], caller: Caller
    ) -> tuple[list[tuple[str, KeyInfo]], list[str]]:
        """(action, key) pairs the key policies must allow, each key looked up as KMS
        does for ``caller``, and the key names found in no account (left to moto's
        answer in the caller's account). An ARN that names no key is NotFoundException
        here: moto would look its key id up in the caller's account."""
        if operation in _KEYLESS:
            return [], []
        references: list[tuple[str, KeyInfo | None]] = []
        unresolved: list[str] = []

        def lookup(reference: str) -> KeyInfo | None:
            key = self.moto.key(reference, caller.account)
            if key is None and reference.startswith("arn:"):
                raise _not_found(reference, caller.account, self.region)
            if key is None:
                unresolved.append(reference)
            return key

        def by_reference(action: str, name: str) -> None:
            value = body.get(name)
            if isinstance(value, str):
                references.append((action, lookup(value)))

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
                named_key = lookup(reference)
                if named_key is not None and named_key.key_id != key.key_id:
                    raise ServiceError(
                        "IncorrectKeyException",
                        "The key ID in the request does not identify a CMK that can perform "
                        "this operation.",
                        400,
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
            if str(body.get("AliasName", "")).startswith("alias/"):  # else moto refuses it
                by_reference("kms:DeleteAlias", "AliasName")
        else:
            by_reference(f"kms:{operation}", "KeyId")
        concerned = [(action, key) for action, key in references if key is not None]
        return concerned, unresolved

    @staticmethod
    def _authorize(action: str, key: KeyInfo, caller: Caller, context: dict[str, str]) -> None:
        try:
            decision = parse_policy(key.policy).evaluate(action, caller, context)
        except PolicyError as exc:
            # Every policy set through the stand-in was validated; only a moto default
            # this evaluator cannot read gets here.
            raise ServiceError("KMSInternalException", f"stored key policy: {exc}", 500) from exc
        if decision is Decision.ALLOW:
            return
        reason = (
            "with an explicit deny in a resource-based policy"
            if decision is Decision.EXPLICIT_DENY
            else f"because no resource-based policy allows the {action} action"
        )
        raise _access_denied(caller, action, key, reason)

    def _generate_data_key_pair(self, body: dict[str, Any], caller: Caller) -> dict[str, Any]:
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
        key = self.moto.key(key_reference, caller.account)
        if key is None:
            raise _not_found(key_reference, caller.account, self.region)
        private_key = _KEY_PAIR_SPECS[spec]()
        private_der = private_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        public_der = private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        blob = self.moto.encrypt(key, private_der, context)
        return {
            "KeyId": key.arn,
            "KeyPairSpec": spec,
            "PrivateKeyCiphertextBlob": base64.b64encode(blob).decode(),
            "PrivateKeyPlaintext": base64.b64encode(private_der).decode(),
            "PublicKey": base64.b64encode(public_der).decode(),
        }


def _page(answer: dict[str, Any], member: str, body: dict[str, Any]) -> dict[str, Any]:
    """One page of a listing, as KMS pages it: at most ``Limit`` entries from the
    ``Marker`` on, ``Truncated`` and ``NextMarker`` saying whether and where it goes on.
    The marker is an opaque string to the caller (here: the offset of the next entry)."""
    entries = list(answer.get(member) or [])
    marker = body.get("Marker")
    start = 0
    if marker is not None:
        if not (isinstance(marker, str) and marker.isdigit() and int(marker) <= len(entries)):
            raise ServiceError("InvalidMarkerException", "The marker is not valid.", 400)
        start = int(marker)
    end = start + int(body.get("Limit") or _DEFAULT_PAGE)
    page: dict[str, Any] = {member: entries[start:end], "Truncated": end < len(entries)}
    if end < len(entries):
        page["NextMarker"] = str(end)
    return page


def _access_denied(caller: Caller, action: str, key: KeyInfo, reason: str) -> ServiceError:
    return ServiceError(
        "AccessDeniedException",
        f"User: {caller.arn} is not authorized to perform: {action} on resource: "
        f"{key.arn} {reason}",
        400,
    )


def _not_found(reference: str, account: str, region: str) -> ServiceError:
    """KMS's (and moto's) NotFoundException for a key or alias name that names nothing;
    a name without ARN is shown as the ARN it has in ``account``."""
    if reference.startswith("arn:"):
        arn = reference
    else:
        kind = "" if reference.startswith("alias/") else "key/"
        arn = f"arn:aws:kms:{region}:{account}:{kind}{reference}"
    if ":alias/" in arn:
        return ServiceError("NotFoundException", f"Alias {arn} is not found.", 400)
    return ServiceError("NotFoundException", f"Key '{arn}' does not exist", 400)


def new_request_id() -> str:
    return str(uuid.uuid4())

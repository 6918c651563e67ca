"""KMS JSON 1.1 for the operations the agent serves: pure, no I/O.

Rules of this module:
- What is served, and each request's schema, is ``kms_operations.OPERATION_TABLE``;
  this module applies it. An app's body is checked member by member (unknown members,
  wrong types, bounds and enums refused with ``ValidationException``) before
  anything is sent.
- Recipient operations: the agent adds ``Recipient``; an answer that carries
  ``Plaintext`` / ``PrivateKeyPlaintext`` / ``SharedSecret`` is refused (real KMS
  returns them null), because a plaintext there would have crossed the untrusted
  parent instance. The answer is turned back into what KMS answers a call *without*
  ``Recipient``: ``CiphertextForRecipient`` is dropped and the plaintext the caller
  opened from it is put in the operation's plaintext member.
- Pass-through operations never return a secret: the app's members are sent as they
  are, and an answer carrying a secret member is refused all the same.
- Every key a call touches is checked against the image's ``trusted_keys``
  (``trusted_keys.py``): an exact untrusted key ARN in the request before any call;
  each key the answer names (``KeyId``; ``ReEncrypt``'s ``SourceKeyId`` too;
  ``DescribeKey``'s ``KeyMetadata.Arn``) before a ``RecipientAnswer`` exists, so an
  envelope from an untrusted key is never opened, or before a pass-through answer
  reaches the app; the listings keep only entries naming a trusted key.
- The app gets the answer members the table declares, in the model's order, no other.

Theory of operation: ``validate_request`` → ``build_request`` (body + headers, to
be signed and sent by the caller) → ``read_response`` gives a ``RecipientAnswer``, a
``PassThroughAnswer`` or a ``KmsFailure`` (KMS's error answer is a normal outcome,
not an exception) → for a ``RecipientAnswer`` the caller opens
``ciphertext_for_recipient`` → ``finish_answer``.
Everything malformed or untrusted raises ``KmsProtocolError``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from enclave_agent.runtime.kms_operations import (
    OPERATION_TABLE,
    OPERATIONS,
    SECRET_MEMBERS,
    Blob,
    Boolean,
    Integer,
    ListOf,
    Operation,
    Shape,
    Struct,
    Text,
)
from enclave_agent.runtime.trusted_keys import (
    KeyArnError,
    TrustedKeys,
    alias_target,
    off_reason,
    parse_key_arn,
)
from enclave_common.errors import ShownError

TARGET_PREFIX = "TrentService"
CONTENT_TYPE = "application/x-amz-json-1.1"
KEY_ENCRYPTION_ALGORITHM = "RSAES_OAEP_SHA_256"
_RECIPIENT_ANSWER_MEMBER = "CiphertextForRecipient"
_THROTTLING_TYPES = frozenset({"ThrottlingException"})
_EXPIRED_TOKEN_TYPES = frozenset({"ExpiredTokenException", "ExpiredToken"})
_ACCESS_DENIED_TYPES = frozenset({"AccessDeniedException"})
# CommonErrors lists ValidationError; JSON 1.1 answers say ValidationException.
_VALIDATION_TYPES = frozenset({"ValidationException", "ValidationError"})


class KmsProtocolError(ShownError):
    """A request or answer that cannot be used, in KMS's error vocabulary (mostly
    ValidationException, hence the order of the arguments)."""

    def __init__(self, message: str, *, error_type: str = "ValidationException", status: int = 400):
        super().__init__(error_type, message, status)


@dataclass(frozen=True)
class ValidatedRequest:
    operation: str
    # The app's JSON members, checked; null members dropped. Kept out of repr: they may
    # hold an Encrypt's Plaintext.
    members: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class KmsFailure:
    """KMS's error answer: ``__type`` without namespace, message, HTTP status."""

    error_type: str
    message: str
    status: int

    @property
    def retryable(self) -> bool:
        return self.status >= 500 or self.error_type in _THROTTLING_TYPES

    @property
    def expired_token(self) -> bool:
        return self.error_type in _EXPIRED_TOKEN_TYPES

    @property
    def may_reject_document(self) -> bool:
        """Whether this refusal may be KMS refusing the attestation document, so one
        try with a new document is worth it. What KMS answers then is documented
        nowhere: a validation error naming the document or the Recipient, or (a
        ``kms:RecipientAttestation:*`` policy condition that no longer holds) an
        AccessDeniedException, both HTTP 400."""
        if self.status != 400:
            return False
        if self.error_type in _ACCESS_DENIED_TYPES:
            return True
        if self.error_type not in _VALIDATION_TYPES:
            return False
        text = self.message.lower()
        return "attestation" in text or "recipient" in text


@dataclass(frozen=True, repr=False)
class RecipientAnswer:
    operation: str
    members: dict[str, Any]  # the answer's other non-null members, as KMS sent them
    ciphertext_for_recipient: bytes

    def __repr__(self) -> str:
        return f"RecipientAnswer(operation={self.operation!r}, members={sorted(self.members)})"


@dataclass(frozen=True, repr=False)
class PassThroughAnswer:
    """A pass-through operation's answer, checked and shaped: what the app gets."""

    operation: str
    members: dict[str, Any]

    def __repr__(self) -> str:  # names only: a ciphertext, MAC or signature stays out of logs
        return f"PassThroughAnswer(operation={self.operation!r}, members={sorted(self.members)})"


def _operation(name: str) -> Operation:
    operation = OPERATION_TABLE.get(name)
    if operation is None:
        raise KmsProtocolError(
            f"operation {name!r} is not served (served: {', '.join(OPERATIONS)})",
            error_type="UnknownOperationException",
        )
    return operation


def _kms_broke(message: str) -> KmsProtocolError:
    """An answer from KMS (or something in its place) the agent cannot use."""
    return KmsProtocolError(message, error_type="KMSInternalException", status=502)


# ---------------------------------------------------------------- request side


def _untrusted_key(message: str) -> KmsProtocolError:
    # AccessDeniedException with status 400, as KMS itself refuses a key: SDKs raise
    # their usual error, and the gateway does not retry it.
    return KmsProtocolError(message, error_type="AccessDeniedException", status=400)


def validate_request(
    operation: str, body: Mapping[str, Any], *, trusted: TrustedKeys
) -> ValidatedRequest:
    """Check the app's JSON body (already parsed) against the operation's schema,
    and, for an operation that touches keys, what ``trusted`` can decide before KMS
    answers (no trusted key at all; an exact key ARN that is not trusted).

    ``Recipient`` is the agent's to add, so an app that sends one is told so.
    """
    table = _operation(operation)
    if not isinstance(body, Mapping):
        raise KmsProtocolError(f"{operation} request body must be a JSON object")
    if table.recipient and body.get("Recipient") is not None:
        raise KmsProtocolError(
            "Recipient is added by the enclave agent; send the request without it"
        )
    members = {k: v for k, v in body.items() if v is not None}
    _check_structure(table.request, members, "", operation)
    if table.exactly_one_of and sum(name in members for name in table.exactly_one_of) != 1:
        raise KmsProtocolError(
            f"{operation} needs exactly one of {' and '.join(table.exactly_one_of)}"
        )
    if table.takes_key:
        named = [members[name] for name in table.key_members if name in members] or [None]
        for key_id in named:
            refusal = trusted.refusal_for_request(key_id)
            if refusal is not None:
                raise _untrusted_key(f"{operation} refused before any call to KMS: {refusal}")
    return ValidatedRequest(operation, members)


def _where(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _check_structure(shape: Struct, value: Any, path: str, operation: str) -> None:
    if not isinstance(value, Mapping):
        raise KmsProtocolError(f"{path or operation}: expected a JSON object")
    for name in value:
        if not isinstance(name, str) or name not in shape.members:
            raise KmsProtocolError(
                f"{_where(path, str(name))}: unknown member in {operation} request"
            )
    for name in shape.required:
        if value.get(name) is None:
            raise KmsProtocolError(f"{_where(path, name)}: required member is missing")
    for name, item in value.items():
        if item is not None:
            _check_value(shape.members[name], item, _where(path, name), operation)


def _check_length(length: int, shape: Text | Blob | ListOf, where: str, unit: str) -> None:
    if shape.min is not None and length < shape.min:
        raise KmsProtocolError(f"{where}: must be at least {shape.min} {unit}, got {length}")
    if shape.max is not None and length > shape.max:
        raise KmsProtocolError(f"{where}: must be at most {shape.max} {unit}, got {length}")


def _check_value(shape: Shape, value: Any, where: str, operation: str) -> None:
    if isinstance(shape, Struct):
        _check_structure(shape, value, where, operation)
    elif isinstance(shape, Text):
        if not isinstance(value, str):
            raise KmsProtocolError(f"{where}: expected a string")
        if shape.enum and value not in shape.enum:
            raise KmsProtocolError(f"{where}: must be one of {', '.join(shape.enum)}")
        _check_length(len(value), shape, where, "characters")
    elif isinstance(shape, Integer):
        if not isinstance(value, int) or isinstance(value, bool):
            raise KmsProtocolError(f"{where}: expected an integer")
        low, high = shape.min, shape.max
        if (low is not None and value < low) or (high is not None and value > high):
            raise KmsProtocolError(f"{where}: must be between {low} and {high}, got {value}")
    elif isinstance(shape, Boolean):
        if not isinstance(value, bool):
            raise KmsProtocolError(f"{where}: expected true or false")
    elif isinstance(shape, Blob):
        _check_length(len(decode_base64(value, where)), shape, where, "bytes")
    elif isinstance(shape, ListOf):
        if not isinstance(value, list):
            raise KmsProtocolError(f"{where}: expected a JSON array")
        _check_length(len(value), shape, where, "items")
        for index, item in enumerate(value):
            _check_value(shape.item, item, f"{where}[{index}]", operation)
    else:  # MapOf, the one shape left
        if not isinstance(value, Mapping):
            raise KmsProtocolError(f"{where}: expected a JSON object")
        for key, item in value.items():
            _check_value(shape.key, key, f"{where} key", operation)
            _check_value(shape.value, item, f"{where}[{key!r}]", operation)


def decode_base64(value: Any, where: str) -> bytes:
    """Strict standard base64 (what KMS JSON uses for blobs)."""
    if not isinstance(value, str):
        raise KmsProtocolError(f"{where}: expected a base64 string")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise KmsProtocolError(f"{where}: not valid base64") from None


def request_headers(operation: str) -> list[tuple[str, str]]:
    """The headers KMS JSON 1.1 needs besides Host and the SigV4 ones."""
    return [("Content-Type", CONTENT_TYPE), ("X-Amz-Target", f"{TARGET_PREFIX}.{operation}")]


# One encoder for every request: json.dumps with options builds a new one per call.
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))


@dataclass(frozen=True, repr=False)
class RequestBody:
    data: bytes
    sha256: str  # of ``data``, in hex: SigV4's payload hash


@functools.lru_cache(maxsize=2)
def _recipient_opening(attestation_document: bytes) -> tuple[bytes, Any]:
    """``{"Recipient":{...}`` in JSON, and SHA-256's state after it. A document is
    reused for many calls and its base64 is most of a request's bytes: encoded and
    hashed once per document, not per call."""
    recipient = {
        "KeyEncryptionAlgorithm": KEY_ENCRYPTION_ALGORITHM,
        "AttestationDocument": base64.b64encode(attestation_document).decode("ascii"),
    }
    opening = f'{{"Recipient":{_COMPACT_JSON.encode(recipient)}'.encode()
    return opening, hashlib.sha256(opening)


def build_request(request: ValidatedRequest, attestation_document: bytes | None) -> RequestBody:
    """The JSON body sent to KMS: the app's members, after our ``Recipient`` for a
    Recipient operation (``attestation_document`` is its document; None for a
    pass-through operation, which takes none)."""
    if OPERATION_TABLE[request.operation].recipient != (attestation_document is not None):
        raise ValueError(f"{request.operation}: an attestation document goes with Recipient only")
    members = _COMPACT_JSON.encode(request.members).encode("utf-8")
    if attestation_document is None:
        return RequestBody(members, hashlib.sha256(members).hexdigest())
    if "Recipient" in request.members:
        raise ValueError("Recipient is the agent's to add (validate_request refuses it)")
    opening, hashed = _recipient_opening(attestation_document)
    # Our member first, then the app's: '{' gives way to ','.
    rest = b"," + members[1:] if request.members else b"}"
    digest = hashed.copy()
    digest.update(rest)
    return RequestBody(opening + rest, digest.hexdigest())


# --------------------------------------------------------------- response side


def _header(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def parse_error_type(raw: str) -> str:
    """``"com.amazonaws.kms#NotFoundException"`` or ``"NotFoundException:http://…"``
    → ``"NotFoundException"`` (both forms occur in JSON 1.1 error answers)."""
    return raw.rsplit("#", 1)[-1].split(":", 1)[0].strip()


class _RepeatedMember(ValueError):
    pass


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        # json keeps the last of repeated members: {"Plaintext": "…", "Plaintext": null}
        # would slip past the Plaintext refusal below.
        raise _RepeatedMember
    return document


def _load_answer(body: bytes) -> Any:
    """The answer's JSON, or None when it is not JSON (too deep counts as not JSON)."""
    try:
        return json.loads(body, object_pairs_hook=_no_repeats)
    except _RepeatedMember:
        raise _kms_broke("KMS answered with a JSON object that repeats a member") from None
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def read_failure(status: int, headers: Sequence[tuple[str, str]], body: bytes) -> KmsFailure:
    """KMS's error answer (any status but 200)."""
    try:
        document = _load_answer(body)
    except KmsProtocolError:
        document = None
    error_type = ""
    message = ""
    if isinstance(document, dict):
        raw_type = document.get("__type")
        if isinstance(raw_type, str):
            error_type = parse_error_type(raw_type)
        for key in ("message", "Message"):
            if isinstance(document.get(key), str):
                message = document[key]
                break
    if not error_type:
        header_type = _header(headers, "x-amzn-errortype")
        if header_type:
            error_type = parse_error_type(header_type)
    if not error_type:
        error_type = "KMSInternalException" if status >= 500 else "UnknownError"
        if not message:
            message = f"KMS answered HTTP {status} without a KMS error body"
    return KmsFailure(error_type, message, status)


def _member_at(document: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = document
    for name in path:
        value = value.get(name) if isinstance(value, Mapping) else None
    return value


def _listed_key(listing: str, entry: Any) -> str | None:
    """The key ARN a ListKeys / ListAliases entry stands for, or None if none can be
    told (an alias without a target, a malformed entry)."""
    if not isinstance(entry, Mapping):
        return None
    try:
        if listing == "Aliases":
            return str(alias_target(entry.get("AliasArn"), entry.get("TargetKeyId")))
        return str(parse_key_arn(entry.get("KeyArn")))
    except KeyArnError:
        return None


def _only_trusted(
    operation: str, listing: str, document: dict[str, Any], trusted: TrustedKeys
) -> dict[str, Any]:
    """The listing with only the entries naming a trusted key; ``NextMarker`` and
    ``Truncated`` kept, so a paginating app still reaches the next page."""
    entries = document.get(listing)
    if entries is None:
        return document
    if not isinstance(entries, list):
        raise _kms_broke(f"KMS answered {operation} with {listing} that is not a list")
    kept = []
    for entry in entries:
        arn = _listed_key(listing, entry)
        if arn is not None and trusted.refusal_for_answer(arn) is None:
            kept.append(entry)
    return {**document, listing: kept}


def _shaped(operation: str, members: Mapping[str, Any]) -> dict[str, Any]:
    """The members the table declares for the answer, non-null, in the model's order."""
    return {
        name: members[name]
        for name in OPERATION_TABLE[operation].answer
        if members.get(name) is not None
    }


def read_response(
    operation: str,
    status: int,
    headers: Sequence[tuple[str, str]],
    body: bytes,
    *,
    trusted: TrustedKeys,
) -> RecipientAnswer | PassThroughAnswer | KmsFailure:
    """Read KMS's answer. Every key it names must be one ``trusted`` allows: otherwise
    no ``RecipientAnswer`` (hence nothing to open) and no ``PassThroughAnswer`` comes
    out of here; a listing keeps the entries of trusted keys only."""
    table = _operation(operation)
    if status != 200:
        return read_failure(status, headers, body)
    document = _load_answer(body)
    if not isinstance(document, dict):
        raise _kms_broke(f"KMS answered {operation} with a body that is not a JSON object")
    leaked = sorted(name for name in SECRET_MEMBERS if document.get(name) is not None)
    if leaked:
        why = (
            "a plaintext there would have crossed the parent instance"
            if table.recipient
            else f"{operation} returns no secret, and the agent passes none on"
        )
        raise _kms_broke(
            f"KMS answer to a {operation} request{' with Recipient' if table.recipient else ''} "
            f"carried {', '.join(leaked)}; refused ({why})"
        )
    for path in table.answer_keys:
        refusal = trusted.refusal_for_answer(_member_at(document, path), member=".".join(path))
        if refusal is not None:
            outcome = "its CiphertextForRecipient not opened" if table.recipient else "not used"
            raise _untrusted_key(f"KMS's {operation} answer refused, {outcome}: {refusal}")
    if table.listing is not None:
        if not trusted:
            raise _untrusted_key(f"KMS's {operation} answer refused: {off_reason()}")
        document = _only_trusted(operation, table.listing, document, trusted)
    if not table.recipient:
        return PassThroughAnswer(operation, _shaped(operation, document))
    raw = document.get(_RECIPIENT_ANSWER_MEMBER)
    if raw is None:
        raise _kms_broke(f"KMS answer to {operation} has no CiphertextForRecipient")
    try:
        ciphertext = decode_base64(raw, _RECIPIENT_ANSWER_MEMBER)
    except KmsProtocolError as exc:
        raise _kms_broke(f"KMS answer to {operation}: {exc.message}") from None
    if not ciphertext:
        raise _kms_broke(f"KMS answer to {operation} has an empty CiphertextForRecipient")
    members = {
        key: value
        for key, value in document.items()
        if value is not None and key != _RECIPIENT_ANSWER_MEMBER
    }
    return RecipientAnswer(operation, members, ciphertext)


def finish_answer(answer: RecipientAnswer, plaintext: bytes) -> dict[str, Any]:
    """KMS's answer to the same call without Recipient, members in the model's order."""
    member = OPERATION_TABLE[answer.operation].plaintext_member
    assert member is not None  # a RecipientAnswer exists for Recipient operations only
    filled = {**answer.members, member: base64.b64encode(plaintext).decode("ascii")}
    return _shaped(answer.operation, filled)

"""KMS JSON 1.1 for calls that carry ``Recipient``: pure, no I/O.

Rules of this module:
- It validates the app's request body against botocore's KMS service model (the
  same model the AWS SDKs are generated from), so members, types, enums and length
  limits are KMS's own, not a copy that drifts.
- It never sees a plaintext in a KMS answer: an answer to a ``Recipient`` request
  that carries ``Plaintext`` / ``PrivateKeyPlaintext`` / ``SharedSecret`` is refused
  (real KMS returns them null), because a plaintext there would have crossed the
  untrusted parent instance.
- It turns the answer back into what KMS answers a call *without* ``Recipient``:
  ``CiphertextForRecipient`` is dropped and the plaintext the caller opened from it
  is put in the operation's plaintext member.
- It decides, from ``OPERATION_TABLE``, which operations take a key, and checks
  every key they name against the image's ``trusted_keys`` (``trusted_keys.py``):
  the request's ``KeyId`` before any call, the answer's ``KeyId`` before a
  ``RecipientAnswer`` exists, so an envelope from an untrusted key is never opened.

Theory of operation: ``validate_request`` → ``build_request`` (body + headers, to
be signed and sent by the caller) → ``read_response`` gives a ``RecipientAnswer``
or a ``KmsFailure`` (KMS's error answer is a normal outcome, not an exception) →
the caller opens ``RecipientAnswer.ciphertext_for_recipient`` → ``finish_answer``.
Everything malformed or untrusted raises ``KmsProtocolError``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from botocore.loaders import Loader
from botocore.model import ServiceModel, Shape, StructureShape

from enclave_agent.runtime.trusted_keys import TrustedKeys
from enclave_common.errors import ShownError

TARGET_PREFIX = "TrentService"
CONTENT_TYPE = "application/x-amz-json-1.1"
KEY_ENCRYPTION_ALGORITHM = "RSAES_OAEP_SHA_256"


@dataclass(frozen=True)
class Operation:
    """What the agent must know of an operation it serves with ``Recipient``."""

    # The answer's member that holds the secret when the call has no Recipient
    # (botocore/data/kms/2014-11-01/service-2.json, output shapes).
    plaintext_member: str
    # The operation uses a KMS key: its answer names the key in ``KeyId``, which must
    # be in ``trusted_keys`` before the envelope is opened, and a request naming an
    # untrusted key ARN is refused before any call. Declare it for every new
    # operation that takes a ``KeyId``.
    takes_key: bool


OPERATION_TABLE: dict[str, Operation] = {
    "Decrypt": Operation("Plaintext", takes_key=True),
    "GenerateDataKey": Operation("Plaintext", takes_key=True),
    "GenerateRandom": Operation("Plaintext", takes_key=False),
    "GenerateDataKeyPair": Operation("PrivateKeyPlaintext", takes_key=True),
    "DeriveSharedSecret": Operation("SharedSecret", takes_key=True),
}
PLAINTEXT_MEMBER: dict[str, str] = {
    name: operation.plaintext_member for name, operation in OPERATION_TABLE.items()
}
OPERATIONS: tuple[str, ...] = tuple(OPERATION_TABLE)
_SECRET_MEMBERS = frozenset(PLAINTEXT_MEMBER.values())
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
    members: dict[str, Any]  # the app's JSON members, checked; null members dropped


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


@functools.cache
def service_model() -> ServiceModel:
    """botocore's KMS model, loaded once (it ships with the installed botocore)."""
    return ServiceModel(Loader().load_service_model("kms", "service-2"), service_name="kms")


def _operation_shapes(operation: str) -> tuple[StructureShape, StructureShape]:
    if operation not in OPERATION_TABLE:
        raise KmsProtocolError(
            f"operation {operation!r} is not served with Recipient "
            f"(supported: {', '.join(OPERATIONS)})",
            error_type="UnknownOperationException",
        )
    model = service_model().operation_model(operation)
    return model.input_shape, model.output_shape


# ---------------------------------------------------------------- request side


def _untrusted_key(message: str) -> KmsProtocolError:
    # AccessDeniedException with status 400, as KMS itself refuses a key: SDKs raise
    # their usual error, and the gateway does not retry it.
    return KmsProtocolError(message, error_type="AccessDeniedException", status=400)


def validate_request(
    operation: str, body: Mapping[str, Any], *, trusted: TrustedKeys
) -> ValidatedRequest:
    """Check the app's JSON body (already parsed) against the operation's input shape,
    and, for an operation that takes a key, what ``trusted`` can decide before KMS
    answers (no trusted key at all; an exact key ARN that is not trusted).

    ``Recipient`` is the agent's to add, so an app that sends one is told so.
    """
    input_shape, _ = _operation_shapes(operation)
    if not isinstance(body, Mapping):
        raise KmsProtocolError(f"{operation} request body must be a JSON object")
    if body.get("Recipient") is not None:
        raise KmsProtocolError(
            "Recipient is added by the enclave agent; send the request without it"
        )
    members = {k: v for k, v in body.items() if v is not None and k != "Recipient"}
    _check_structure(input_shape, members, "", operation)
    if operation == "GenerateDataKey" and ("KeySpec" in members) == ("NumberOfBytes" in members):
        raise KmsProtocolError("GenerateDataKey needs exactly one of KeySpec and NumberOfBytes")
    if OPERATION_TABLE[operation].takes_key:
        refusal = trusted.refusal_for_request(members.get("KeyId"))
        if refusal is not None:
            raise _untrusted_key(f"{operation} refused before any call to KMS: {refusal}")
    return ValidatedRequest(operation, dict(members))


def _where(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _check_structure(shape: StructureShape, value: Any, path: str, operation: str) -> None:
    if not isinstance(value, Mapping):
        raise KmsProtocolError(f"{path or operation}: expected a JSON object")
    for name in value:
        if not isinstance(name, str) or name not in shape.members:
            raise KmsProtocolError(
                f"{_where(path, str(name))}: unknown member in {operation} request"
            )
    for name in shape.required_members:
        if value.get(name) is None:
            raise KmsProtocolError(f"{_where(path, name)}: required member is missing")
    for name, item in value.items():
        if item is not None:
            _check_value(shape.members[name], item, _where(path, name), operation)


def _check_length(length: int, shape: Shape, where: str, unit: str) -> None:
    low, high = shape.metadata.get("min"), shape.metadata.get("max")
    if low is not None and length < low:
        raise KmsProtocolError(f"{where}: must be at least {low} {unit}, got {length}")
    if high is not None and length > high:
        raise KmsProtocolError(f"{where}: must be at most {high} {unit}, got {length}")


def _check_value(shape: Shape, value: Any, where: str, operation: str) -> None:
    kind = shape.type_name
    if kind == "structure":
        assert isinstance(shape, StructureShape)
        _check_structure(shape, value, where, operation)
    elif kind == "string":
        if not isinstance(value, str):
            raise KmsProtocolError(f"{where}: expected a string")
        if shape.enum and value not in shape.enum:
            raise KmsProtocolError(f"{where}: must be one of {', '.join(shape.enum)}")
        _check_length(len(value), shape, where, "characters")
    elif kind in ("integer", "long"):
        if not isinstance(value, int) or isinstance(value, bool):
            raise KmsProtocolError(f"{where}: expected an integer")
        low, high = shape.metadata.get("min"), shape.metadata.get("max")
        if (low is not None and value < low) or (high is not None and value > high):
            raise KmsProtocolError(f"{where}: must be between {low} and {high}, got {value}")
    elif kind == "boolean":
        if not isinstance(value, bool):
            raise KmsProtocolError(f"{where}: expected true or false")
    elif kind == "blob":
        _check_length(len(decode_base64(value, where)), shape, where, "bytes")
    elif kind == "list":
        if not isinstance(value, list):
            raise KmsProtocolError(f"{where}: expected a JSON array")
        _check_length(len(value), shape, where, "items")
        for index, item in enumerate(value):
            _check_value(shape.member, item, f"{where}[{index}]", operation)
    elif kind == "map":
        if not isinstance(value, Mapping):
            raise KmsProtocolError(f"{where}: expected a JSON object")
        for key, item in value.items():
            _check_value(shape.key, key, f"{where} key", operation)
            _check_value(shape.value, item, f"{where}[{key!r}]", operation)
    else:  # no such member in the five operations today; refuse rather than guess
        raise KmsProtocolError(f"{where}: members of type {kind} are not supported")


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


def build_request(request: ValidatedRequest, attestation_document: bytes) -> bytes:
    """The JSON body sent to KMS: the app's members plus our ``Recipient``."""
    body = dict(request.members)
    body["Recipient"] = {
        "KeyEncryptionAlgorithm": KEY_ENCRYPTION_ALGORITHM,
        "AttestationDocument": base64.b64encode(attestation_document).decode("ascii"),
    }
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


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
        raise KmsProtocolError(
            "KMS answered with a JSON object that repeats a member",
            error_type="KMSInternalException",
            status=502,
        ) from None
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


def read_response(
    operation: str,
    status: int,
    headers: Sequence[tuple[str, str]],
    body: bytes,
    *,
    trusted: TrustedKeys,
) -> RecipientAnswer | KmsFailure:
    """Read KMS's answer to a ``Recipient`` request. For an operation that takes a
    key, the answer's ``KeyId`` must be a key ``trusted`` allows: otherwise no
    ``RecipientAnswer`` (hence nothing to open) comes out of here."""
    _operation_shapes(operation)
    if status != 200:
        return read_failure(status, headers, body)
    document = _load_answer(body)
    if not isinstance(document, dict):
        raise KmsProtocolError(
            f"KMS answered {operation} with a body that is not a JSON object",
            error_type="KMSInternalException",
            status=502,
        )
    leaked = sorted(name for name in _SECRET_MEMBERS if document.get(name) is not None)
    if leaked:
        raise KmsProtocolError(
            f"KMS answer to a {operation} request with Recipient carried {', '.join(leaked)}; "
            "refused (a plaintext there would have crossed the parent instance)",
            error_type="KMSInternalException",
            status=502,
        )
    if OPERATION_TABLE[operation].takes_key:
        refusal = trusted.refusal_for_answer(document.get("KeyId"))
        if refusal is not None:
            raise _untrusted_key(
                f"KMS's {operation} answer refused, its CiphertextForRecipient not opened: "
                f"{refusal}"
            )
    raw = document.get(_RECIPIENT_ANSWER_MEMBER)
    if raw is None:
        raise KmsProtocolError(
            f"KMS answer to {operation} has no CiphertextForRecipient",
            error_type="KMSInternalException",
            status=502,
        )
    try:
        ciphertext = decode_base64(raw, _RECIPIENT_ANSWER_MEMBER)
    except KmsProtocolError as exc:
        raise KmsProtocolError(
            f"KMS answer to {operation}: {exc.message}",
            error_type="KMSInternalException",
            status=502,
        ) from None
    if not ciphertext:
        raise KmsProtocolError(
            f"KMS answer to {operation} has an empty CiphertextForRecipient",
            error_type="KMSInternalException",
            status=502,
        )
    members = {
        key: value
        for key, value in document.items()
        if value is not None and key != _RECIPIENT_ANSWER_MEMBER
    }
    return RecipientAnswer(operation, members, ciphertext)


def finish_answer(answer: RecipientAnswer, plaintext: bytes) -> dict[str, Any]:
    """KMS's answer to the same call without Recipient, members in the model's order."""
    _, output_shape = _operation_shapes(answer.operation)
    filled = dict(answer.members)
    filled[PLAINTEXT_MEMBER[answer.operation]] = base64.b64encode(plaintext).decode("ascii")
    ordered = {name: filled.pop(name) for name in output_shape.members if name in filled}
    ordered.update(filled)
    return ordered

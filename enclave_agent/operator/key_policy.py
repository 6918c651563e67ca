"""KMS key policies that let only a measured enclave use a key.

Rules of this file: it is pure (text in, dicts out, no I/O), and every bad input
raises ``KeyPolicyError`` with a message a person can act on.

Theory of operation. ``nitro-cli build-enclave`` (and ``describe-eif``) print the
image's measurements as JSON::

    {"Measurements": {"HashAlgorithm": "Sha384 { ... }", "PCR0": "<96 hex>",
                      "PCR1": "<96 hex>", "PCR2": "<96 hex>"}}

with ``PCR8`` added for a signed image. ``parse_measurements`` reads that (also the
bare inner object, a ``describe-enclaves`` list holding one enclave, the same JSON
preceded by nitro-cli's progress lines when both streams were saved together, and
the output of ``enclave-agent verify-attestation`` for a running enclave's document).
``build_key_policy`` turns the values into a key policy document in the form of
AWS's example (KMS developer guide, "Condition keys for Nitro Enclaves"): the role
may call the chosen operations only when the attestation document in the request's
``Recipient`` carries these values. PCR0 is compared through
``kms:RecipientAttestation:ImageSha384``, every other PCR n through
``kms:RecipientAttestation:PCR<n>``, all with ``StringEqualsIgnoreCase`` on
lower-case hex. A second statement keeps the key manageable by the account
(``arn:aws:iam::<account>:root``) without letting the account decrypt: the
administrative actions only, so no IAM policy in the account can open a secret
outside the enclave, while the key can still be updated for a new image or
scheduled for deletion. (Whoever may replace the policy can of course grant
themselves more; that power is what "manageable" means.)

``kms:Encrypt`` and ``kms:GenerateDataKey`` go to one named principal, the operator
who seals the image's secrets (``enclave-agent seal``: Encrypt for a small value, a
data key for a large one), and never through the account root: whoever may Encrypt
under a key the enclave trusts, or get a data key from it, can make a valid
ciphertext of any value and have the enclave "decrypt" it, so the parent's role must
not hold either without the attestation condition.

``trusted_keys_entry`` gives the agent-config entry that goes with the policy (the
key's ARN, or its whole account in the region), in the agent's own grammar.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from enclave_agent.runtime import kms_operations
from enclave_agent.runtime.kms_operations import OPERATION_TABLE
from enclave_agent.runtime.trusted_keys import KeyArn, KeyArnError, account_entry, parse_key_arn
from enclave_common.aws import PARTITION_PATTERN, is_account_id

# nitro-cli prints SHA-384 values: 48 bytes, 96 hex digits.
PCR_HEX_LENGTH = 96
# The NSM has 32 PCRs; nitro-cli fills 0-4 and 8, the rest belong to the enclave.
MAX_PCR_INDEX = 31
MAX_INPUT_BYTES = 1 << 20

IMAGE_CONDITION_KEY = "kms:RecipientAttestation:ImageSha384"
PCR_CONDITION_PREFIX = "kms:RecipientAttestation:PCR"
CONDITION_OPERATOR = "StringEqualsIgnoreCase"

# The operations that accept a Recipient, hence the only ones the attestation
# condition keys apply to (KMS developer guide, "Condition keys for Nitro Enclaves").
RECIPIENT_OPERATIONS = kms_operations.RECIPIENT_OPERATIONS
DEFAULT_OPERATIONS = ("Decrypt",)
# Never granted to the role by this helper, and why.
NEVER_FOR_THE_ROLE = {
    "ReEncrypt": (
        "with kms:ReEncryptFrom the parent re-encrypts every ciphertext of this key to a key "
        "of its own and reads it; with kms:ReEncryptTo it makes ciphertexts of values it chose"
    ),
}
# The pass-through operations this helper grants the role on request. They carry no
# Recipient, so no condition can tie them to the enclave: whoever holds the role's
# credentials, the parent included, may call what the policy grants. The listings act
# on the account, so only an IAM policy grants them.
PASS_THROUGH_OPERATIONS = tuple(
    name
    for name in kms_operations.PASS_THROUGH_OPERATIONS
    if OPERATION_TABLE[name].key_policy_actions and name not in NEVER_FOR_THE_ROLE
)
# Granted on request, but what they give the role the parent has too: the notes the
# key-policy command prints with them.
PARENT_MAY_CALL = {
    "Encrypt": "it can make ciphertexts under this key of any value it likes",
    "Sign": "a signature by this key proves the role's credentials, not the enclave",
    "GenerateMac": "a MAC by this key proves the role's credentials, not the enclave",
}
UNATTESTED_SID = "PassThroughByTheRole"

# What the account keeps so the key stays manageable: no operation that returns
# plaintext (Decrypt, GenerateDataKey*, ReEncrypt*), no CreateGrant, which could
# hand those to anyone without the attestation condition, and no Encrypt (one named
# principal's: ENCRYPT_SID).
ADMIN_ACTIONS = (
    "kms:DescribeKey",
    "kms:GetKeyPolicy",
    "kms:PutKeyPolicy",
    "kms:ListKeyPolicies",
    "kms:ListGrants",
    "kms:ListResourceTags",
    "kms:RevokeGrant",
    "kms:RetireGrant",
    "kms:EnableKey",
    "kms:DisableKey",
    "kms:GetKeyRotationStatus",
    "kms:EnableKeyRotation",
    "kms:DisableKeyRotation",
    "kms:RotateKeyOnDemand",
    "kms:ListKeyRotations",
    "kms:UpdateKeyDescription",
    "kms:CreateAlias",
    "kms:UpdateAlias",
    "kms:DeleteAlias",
    "kms:TagResource",
    "kms:UntagResource",
    "kms:ScheduleKeyDeletion",
    "kms:CancelKeyDeletion",
)
ENCRYPT_SID = "EncryptByTheOperator"

_PCR_KEY = re.compile(r"PCR(0|[1-9][0-9]?)")
_HEX = re.compile(r"[0-9a-fA-F]*")
# An IAM role or user ARN: (partition, account, "role" | "user").
_PRINCIPAL_ARN = re.compile(
    rf"arn:({PARTITION_PATTERN}):iam::([0-9]{{12}}):(role|user)/[\w+=,.@/-]{{1,512}}"
)


class KeyPolicyError(ValueError):
    """Bad measurements, role ARN, operation or PCR selection."""


@dataclass(frozen=True)
class Measurements:
    """PCR values of one enclave image, lower-case hex, keyed by PCR index."""

    pcrs: Mapping[int, str]
    hash_algorithm: str | None = None


def parse_pcr_value(index: int, value: object) -> str:
    """One PCR value as nitro-cli prints it → lower-case hex (96 digits)."""
    if not isinstance(value, str):
        raise KeyPolicyError(
            f"PCR{index} must be a string of hex digits, got {type(value).__name__}"
        )
    if len(value) != PCR_HEX_LENGTH or not _HEX.fullmatch(value):
        raise KeyPolicyError(
            f"PCR{index} must be {PCR_HEX_LENGTH} hex digits (a SHA-384 value), "
            f"got {len(value)} characters{'' if _HEX.fullmatch(value) else ' with non-hex ones'}"
        )
    return value.lower()


def parse_pcr_index(text: str) -> int:
    """``"3"`` or ``"PCR3"`` → 3."""
    raw = text[3:] if text.upper().startswith("PCR") else text
    if not raw.isdecimal() or not 0 <= int(raw) <= MAX_PCR_INDEX:
        raise KeyPolicyError(f"a PCR index is a number from 0 to {MAX_PCR_INDEX}, got {text!r}")
    return int(raw)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of duplicated keys silently; two PCR0 values in one
    # file would mean a policy for an image nobody looked at.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise KeyPolicyError(f"the measurements JSON repeats the key {key!r}")
        result[key] = value
    return result


def _loads(text: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicates)
    except KeyPolicyError:
        raise
    except RecursionError:
        raise KeyPolicyError("the measurements JSON is nested too deeply") from None
    except ValueError as error:
        # JSONDecodeError, and ValueError for integers beyond Python's digit limit.
        raise _NotJson(str(error)) from None


class _NotJson(Exception):
    pass


def _load_json(text: str) -> Any:
    try:
        return _loads(text)
    except _NotJson as first_error:
        # nitro-cli writes progress lines ("Start building the Enclave Image...")
        # before the JSON; a saved console log holds both. Start at the first line
        # that opens a JSON value.
        lines = text.splitlines(keepends=True)
        for number, line in enumerate(lines):
            if number and line.lstrip().startswith(("{", "[")):
                try:
                    return _loads("".join(lines[number:]))
                except _NotJson as error:
                    raise KeyPolicyError(
                        f"the measurements are not valid JSON (from line {number + 1}: {error})"
                    ) from None
        raise KeyPolicyError(f"the measurements are not JSON ({first_error})") from None


def _measurement_map(document: Any) -> Mapping[str, Any]:
    """Find the ``{"HashAlgorithm", "PCR0", ...}`` object in any nitro-cli output."""
    if isinstance(document, list):
        # describe-enclaves: one entry per running enclave.
        if len(document) != 1:
            raise KeyPolicyError(
                f"the measurements list holds {len(document)} entries; keep the one enclave "
                "whose measurements you mean"
            )
        document = document[0]
    if not isinstance(document, dict):
        raise KeyPolicyError("the measurements JSON must be an object")
    if "module_id" in document and "pcrs" in document:
        return _from_verified_document(document)
    for key in ("Measurements", "PCRs"):
        if key in document:
            inner = document[key]
            if not isinstance(inner, dict):
                raise KeyPolicyError(f"{key!r} must be an object of PCR values")
            return inner
    if any(_PCR_KEY.fullmatch(key) for key in document):
        return document
    raise KeyPolicyError(
        "no measurements found: expected nitro-cli's output, "
        '{"Measurements": {"HashAlgorithm": ..., "PCR0": ..., ...}}'
    )


def _from_verified_document(document: Mapping[str, Any]) -> dict[str, Any]:
    """``enclave-agent verify-attestation`` output → nitro-cli's shape.

    Only the image's own measurements are taken (PCR0-2, and PCR8 when the image is
    signed), the same set ``nitro-cli build-enclave`` prints, so a policy built from
    a running enclave's document equals one built from the EIF. PCR3 (the parent's
    role) and PCR4 (the parent instance) are left out: bind to them with ``--pcr``.
    """
    digest = document.get("digest")
    if digest != "SHA384":
        raise KeyPolicyError(f"only SHA-384 attestation documents are supported, not {digest!r}")
    pcrs = document["pcrs"]
    if not isinstance(pcrs, dict):
        raise KeyPolicyError("'pcrs' must be an object of PCR values")
    result: dict[str, Any] = {"HashAlgorithm": "Sha384 { ... }"}
    for index in (0, 1, 2, 8):
        value = pcrs.get(str(index))
        if value is None:
            if index == 8:
                continue
            raise KeyPolicyError(f"the attestation document has no PCR{index}")
        if index == 8 and isinstance(value, str) and set(value) == {"0"}:
            continue  # unsigned image
        result[f"PCR{index}"] = value
    return result


def parse_measurements(data: bytes | str) -> Measurements:
    """Read the output of ``nitro-cli build-enclave`` / ``describe-eif`` / ``describe-enclaves``."""
    if len(data) > MAX_INPUT_BYTES:
        raise KeyPolicyError(f"the measurements input is larger than {MAX_INPUT_BYTES} bytes")
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise KeyPolicyError(f"the measurements are not UTF-8 text ({error.reason})") from None
    else:
        text = data
    values = _measurement_map(_load_json(text))
    pcrs: dict[int, str] = {}
    hash_algorithm: str | None = None
    for key, value in values.items():
        if key == "HashAlgorithm":
            # nitro-cli prints Rust's Debug form, "Sha384 { ... }".
            if not isinstance(value, str) or not value.startswith("Sha384"):
                raise KeyPolicyError(
                    f"only SHA-384 measurements are supported, HashAlgorithm is {value!r}"
                )
            hash_algorithm = value
            continue
        match = _PCR_KEY.fullmatch(key)
        if match is None or int(match.group(1)) > MAX_PCR_INDEX:
            raise KeyPolicyError(
                f"unexpected key {key!r} among the measurements "
                "(expected HashAlgorithm, PCR0 ... PCR31)"
            )
        index = int(match.group(1))
        pcrs[index] = parse_pcr_value(index, value)
    if 0 not in pcrs:
        raise KeyPolicyError("the measurements have no PCR0 (the image measurement)")
    return Measurements(pcrs=dict(sorted(pcrs.items())), hash_algorithm=hash_algorithm)


def with_extra_pcrs(measurements: Measurements, extra: Mapping[int, str]) -> Measurements:
    """Add PCRs that nitro-cli's build output cannot know (PCR3: the parent's IAM
    role, PCR4: the parent's instance id), computed as AWS's guide describes."""
    pcrs = dict(measurements.pcrs)
    for index, raw in extra.items():
        if not 0 <= index <= MAX_PCR_INDEX:
            raise KeyPolicyError(f"a PCR index is a number from 0 to {MAX_PCR_INDEX}, got {index}")
        value = parse_pcr_value(index, raw)
        if index in pcrs and pcrs[index] != value:
            raise KeyPolicyError(f"PCR{index} is given twice with different values")
        pcrs[index] = value
    return Measurements(pcrs=dict(sorted(pcrs.items())), hash_algorithm=measurements.hash_algorithm)


def parse_role_arn(role_arn: str) -> tuple[str, str]:
    """An IAM role ARN → (partition, account id)."""
    match = _PRINCIPAL_ARN.fullmatch(role_arn)
    if match is None or match.group(3) != "role":
        if ":assumed-role/" in role_arn or role_arn.startswith("arn:aws:sts::"):
            raise KeyPolicyError(
                f"{role_arn!r} is a session ARN; give the role's ARN, "
                "arn:aws:iam::<account>:role/<name>"
            )
        raise KeyPolicyError(
            f"the principal must be an IAM role ARN, arn:aws:iam::<12-digit account>:role/<name>, "
            f"got {role_arn!r}"
        )
    return match.group(1), match.group(2)


def encrypt_statement(encrypt_principal: str, role_arn: str) -> dict[str, Any]:
    """``kms:Encrypt`` and ``kms:GenerateDataKey`` for the operator's own IAM role or user
    (what ``enclave-agent seal`` calls), never the enclave's role."""
    match = _PRINCIPAL_ARN.fullmatch(encrypt_principal)
    if match is None:
        raise KeyPolicyError(
            "the encrypt principal must be an IAM role or user ARN, "
            f"arn:aws:iam::<12-digit account>:role/<name> (or user/<name>), got "
            f"{encrypt_principal!r} (an account root would let every IAM principal Encrypt)"
        )
    partition, _ = parse_role_arn(role_arn)
    if match.group(1) != partition:
        raise KeyPolicyError(
            f"the encrypt principal is in partition {match.group(1)!r}, the key in {partition!r}"
        )
    if encrypt_principal == role_arn:
        raise KeyPolicyError(
            f"{role_arn} is the enclave's role, whose credentials the parent holds: with "
            "kms:Encrypt it could make a valid ciphertext of any value; name the operator "
            "who encrypts the secrets instead"
        )
    return {
        "Sid": ENCRYPT_SID,
        "Effect": "Allow",
        "Principal": {"AWS": encrypt_principal},
        "Action": ["kms:Encrypt", "kms:GenerateDataKey"],
        "Resource": "*",
    }


def trusted_keys_entry(
    role_arn: str, region: str, *, account_id: str | None = None, key_id: str | None = None
) -> KeyArn:
    """The agent's ``trusted_keys`` entry for a key of this policy: the key's ARN when
    ``key_id`` is known, else every key of the key's account in ``region``."""
    partition, role_account = parse_role_arn(role_arn)
    account = account_id or role_account
    try:
        if key_id is None:
            return account_entry(partition, region, account)
        return parse_key_arn(str(KeyArn(partition, region, account, key_id)))
    except KeyArnError as error:
        raise KeyPolicyError(f"no trusted_keys entry: {error}") from None


def _known(operation: str, names: Iterable[str]) -> str | None:
    """``"decrypt"`` or ``"kms:Decrypt"`` → ``"Decrypt"`` if among ``names``."""
    name = operation.removeprefix("kms:").lower()
    return next((known for known in names if known.lower() == name), None)


def normalize_operation(operation: str) -> str:
    """``"Decrypt"`` or ``"kms:Decrypt"`` → ``"kms:Decrypt"``; only Recipient operations."""
    known = _known(operation, RECIPIENT_OPERATIONS)
    if known is None:
        raise KeyPolicyError(
            f"operation {operation!r} does not take an attestation document; "
            f"choose from {', '.join(RECIPIENT_OPERATIONS)}"
        )
    (action,) = OPERATION_TABLE[known].key_policy_actions
    return action


def pass_through_operation(operation: str) -> str:
    """``"Sign"`` or ``"kms:Sign"`` → ``"Sign"``: a pass-through operation this helper
    grants the role."""
    known = _known(operation, kms_operations.PASS_THROUGH_OPERATIONS)
    if known is None:
        raise KeyPolicyError(
            f"{operation!r} is not a pass-through operation; choose from "
            f"{', '.join(PASS_THROUGH_OPERATIONS)}"
        )
    if known in NEVER_FOR_THE_ROLE:
        raise KeyPolicyError(
            f"{known} is never granted to the enclave's role: {NEVER_FOR_THE_ROLE[known]}"
        )
    if known not in PASS_THROUGH_OPERATIONS:
        raise KeyPolicyError(
            f"{known} is not granted in a key policy: it acts on the account, so the role's "
            "IAM policy grants it"
        )
    return known


def pass_through_statement(role_arn: str, operations: Iterable[str]) -> dict[str, Any]:
    """The role may call these operations without an attestation document: they carry
    no Recipient, so no condition ties them to the enclave (and the parent holding the
    role's credentials may call them too)."""
    parse_role_arn(role_arn)
    names = list(dict.fromkeys(pass_through_operation(operation) for operation in operations))
    actions = [action for name in names for action in OPERATION_TABLE[name].key_policy_actions]
    return {
        "Sid": UNATTESTED_SID,
        "Effect": "Allow",
        "Principal": {"AWS": role_arn},
        "Action": actions[0] if len(actions) == 1 else actions,
        "Resource": "*",
    }


def attestation_conditions(
    measurements: Measurements,
    *,
    include_pcrs: Iterable[int] | None = None,
    allow_zero: bool = False,
) -> dict[str, str]:
    """The condition keys and values: PCR0 as ImageSha384, the others as PCR<n>.

    ``include_pcrs`` picks the PCRs beyond PCR0 (default: every one given);
    PCR0 is always included, since without it any image would match.
    """
    if include_pcrs is None:
        chosen = sorted(measurements.pcrs)
    else:
        chosen = sorted({0, *include_pcrs})
        missing = [index for index in chosen if index not in measurements.pcrs]
        if missing:
            given = ", ".join(f"PCR{index}" for index in measurements.pcrs)
            raise KeyPolicyError(
                f"{', '.join(f'PCR{index}' for index in missing)} not in the measurements "
                f"(they hold {given})"
            )
    conditions: dict[str, str] = {}
    for index in chosen:
        value = measurements.pcrs[index]
        if not allow_zero and set(value) == {"0"}:
            # A debug-mode enclave reports PCR0-2 (and more) as zeros, whatever image
            # it runs: a condition on zeros admits every debug-mode enclave.
            raise KeyPolicyError(
                f"PCR{index} is all zeros, which every debug-mode enclave reports; a policy "
                "with it admits any debug-mode enclave (allow it only for a throwaway test key)"
            )
        key = IMAGE_CONDITION_KEY if index == 0 else f"{PCR_CONDITION_PREFIX}{index}"
        conditions[key] = value
    return conditions


def enclave_statement(
    measurements: Measurements,
    role_arn: str,
    *,
    operations: Iterable[str] = DEFAULT_OPERATIONS,
    include_pcrs: Iterable[int] | None = None,
    allow_zero: bool = False,
) -> dict[str, Any]:
    """The statement in the form of AWS's example: the role, the operations, the PCRs."""
    parse_role_arn(role_arn)
    actions = list(dict.fromkeys(normalize_operation(operation) for operation in operations))
    if not actions:
        raise KeyPolicyError("at least one operation is needed")
    return {
        # Named after the image, so that a policy admitting two images during an
        # upgrade has two distinct statement ids.
        "Sid": f"AllowEnclaveImage{measurements.pcrs[0][:16]}",
        "Effect": "Allow",
        "Principal": {"AWS": role_arn},
        "Action": actions[0] if len(actions) == 1 else actions,
        "Resource": "*",
        "Condition": {
            CONDITION_OPERATOR: attestation_conditions(
                measurements, include_pcrs=include_pcrs, allow_zero=allow_zero
            )
        },
    }


def build_key_policy(
    measurements: Measurements | Sequence[Measurements],
    role_arn: str,
    *,
    operations: Iterable[str] = DEFAULT_OPERATIONS,
    account_id: str | None = None,
    include_pcrs: Iterable[int] | None = None,
    allow_zero: bool = False,
    encrypt_principal: str | None = None,
    pass_through: Iterable[str] = (),
) -> dict[str, Any]:
    """A whole key policy: account administration (no decryption, no encryption) +
    one enclave statement per image (several while an upgrade rolls out: old and new
    image) + ``kms:Encrypt`` and ``kms:GenerateDataKey`` for ``encrypt_principal`` if
    given (else nobody may) + the ``pass_through`` operations for the role, if any
    (``pass_through_statement``)."""
    images = [measurements] if isinstance(measurements, Measurements) else list(measurements)
    if not images:
        raise KeyPolicyError("at least one set of measurements is needed")
    operations = list(operations)
    passing = [pass_through_operation(operation) for operation in pass_through]
    if "Encrypt" in passing and "kms:Decrypt" in map(normalize_operation, operations):
        raise KeyPolicyError(
            "the role may not both Encrypt (which needs no attestation, so the parent may "
            "too) and Decrypt under one key: the parent would make a ciphertext of any "
            "value and the enclave would decrypt it as a secret; encrypt the enclave's "
            "output under a key of its own"
        )
    pcr0s = [image.pcrs[0] for image in images]
    if len(set(pcr0s)) != len(pcr0s):
        raise KeyPolicyError("two sets of measurements have the same PCR0; give each image once")
    partition, role_account = parse_role_arn(role_arn)
    if account_id is None:
        account_id = role_account
    elif not is_account_id(account_id):
        raise KeyPolicyError(f"an account id is 12 digits, got {account_id!r}")
    return {
        "Version": "2012-10-17",
        "Id": "enclave-kms-key-policy",
        "Statement": [
            {
                "Sid": "KeyAdministrationByTheAccount",
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:{partition}:iam::{account_id}:root"},
                "Action": list(ADMIN_ACTIONS),
                "Resource": "*",
            },
            *(
                enclave_statement(
                    image,
                    role_arn,
                    operations=operations,
                    include_pcrs=include_pcrs,
                    allow_zero=allow_zero,
                )
                for image in images
            ),
            *([encrypt_statement(encrypt_principal, role_arn)] if encrypt_principal else []),
            *([pass_through_statement(role_arn, passing)] if passing else []),
        ],
    }

"""The KMS operations the agent serves: one table, read by everything that needs it.

Rules of this file:
- It is data, pure and I/O-free: the request body schema of every served operation,
  which members name KMS keys, where the answer names the key that answered, whether
  the agent adds ``Recipient`` (and which answer member then carries the secret) or
  passes the call through, and which ``kms:`` actions a key policy must grant for it.
  ``kms_protocol`` validates and reads calls with it, ``app_protocol`` routes by it,
  ``operator.key_policy`` grants from it, and the docs list what it serves
  (``tests/test_kms_operations.py`` checks the list in the docs).
- The facts come from AWS: the KMS API Reference
  (https://docs.aws.amazon.com/kms/latest/APIReference/API_<Operation>.html) and the
  service model the AWS SDKs are generated from (botocore's
  ``data/kms/2014-11-01/service-2.json``). The table is our own compact copy of the
  parts the agent checks, so the enclave carries no SDK; ``tests/test_kms_operations.py``
  compares it with botocore's model for every served operation (members, required
  members, types, length and value bounds, enums, answer members), so a drift shows up
  as a failing test when botocore is upgraded, not as a silent difference.
- Served means one of two kinds. *Recipient* operations return a secret: the agent
  adds ``Recipient`` and opens ``CiphertextForRecipient`` itself. *Pass-through*
  operations never return a secret: the agent signs and sends the app's request as
  is and checks the answer. Every operation that touches a key is subject to the
  image's ``trusted_keys`` (``kms_protocol``): the keys its request names
  (``key_members``), the keys its answer names (``answer_keys``), or, for the
  listings, each listed key (``listing``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# ------------------------------------------------------------------ the vocabulary


@dataclass(frozen=True)
class _Bounded:
    """The model's ``min`` and ``max`` of a shape (None: no bound)."""

    min: int | None = None
    max: int | None = None


@dataclass(frozen=True)
class Text(_Bounded):
    """A JSON string: length bounds in characters, or one of ``enum``."""

    enum: tuple[str, ...] = ()


@dataclass(frozen=True)
class Integer(_Bounded):
    """A JSON integer: bounds on its value."""


@dataclass(frozen=True)
class Boolean:
    pass


@dataclass(frozen=True)
class Blob(_Bounded):
    """Bytes, base64 in JSON: length bounds in decoded bytes."""


@dataclass(frozen=True)
class ListOf:
    item: Shape
    min: int | None = None
    max: int | None = None


@dataclass(frozen=True)
class MapOf:
    key: Shape
    value: Shape


@dataclass(frozen=True)
class Struct:
    """A JSON object: its members (any other is refused) and the required ones."""

    members: Mapping[str, Shape]
    required: tuple[str, ...] = ()


Shape = Text | Integer | Boolean | Blob | ListOf | MapOf | Struct

# The shapes KMS's operations share, named as in the service model.
KEY_ID = Text(1, 2048)  # KeyIdType: key id, key ARN, alias name or alias ARN
GRANT_TOKENS = ListOf(Text(1, 8192), 0, 10)  # GrantTokenList
ENCRYPTION_CONTEXT = MapOf(Text(), Text())  # EncryptionContextType
ENCRYPTION_ALGORITHM = Text(
    enum=("SYMMETRIC_DEFAULT", "RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256", "SM2PKE")
)
CIPHERTEXT = Blob(1, 6144)  # CiphertextType (also Signature and Mac)
PLAINTEXT = Blob(1, 4096)  # PlaintextType (also Message)
DRY_RUN = Boolean()
DRY_RUN_MODIFIERS = ListOf(Text(enum=("IGNORE_CIPHERTEXT",)))
NUMBER_OF_BYTES = Integer(1, 1024)
DATA_KEY_SPEC = Text(enum=("AES_256", "AES_128"))
DATA_KEY_PAIR_SPEC = Text(
    enum=(
        "RSA_2048",
        "RSA_3072",
        "RSA_4096",
        "ECC_NIST_P256",
        "ECC_NIST_P384",
        "ECC_NIST_P521",
        "ECC_SECG_P256K1",
        "SM2",
        "ECC_NIST_EDWARDS25519",
        "ML_KEM_512",
        "ML_KEM_768",
        "ML_KEM_1024",
    )
)
SIGNING_ALGORITHM = Text(
    enum=(
        "RSASSA_PSS_SHA_256",
        "RSASSA_PSS_SHA_384",
        "RSASSA_PSS_SHA_512",
        "RSASSA_PKCS1_V1_5_SHA_256",
        "RSASSA_PKCS1_V1_5_SHA_384",
        "RSASSA_PKCS1_V1_5_SHA_512",
        "ECDSA_SHA_256",
        "ECDSA_SHA_384",
        "ECDSA_SHA_512",
        "SM2DSA",
        "ML_DSA_SHAKE_256",
        "ED25519_SHA_512",
        "ED25519_PH_SHA_512",
    )
)
MESSAGE_TYPE = Text(enum=("RAW", "DIGEST", "EXTERNAL_MU"))
MAC_ALGORITHM = Text(enum=("HMAC_SHA_224", "HMAC_SHA_256", "HMAC_SHA_384", "HMAC_SHA_512"))

# Every request member of the served operations, by name: the service model gives a
# member name the same shape in each of them (the botocore comparison checks every use).
_MEMBERS: dict[str, Shape] = {
    "CiphertextBlob": CIPHERTEXT,
    "CustomKeyStoreId": Text(1, 64),
    "DestinationEncryptionAlgorithm": ENCRYPTION_ALGORITHM,
    "DestinationEncryptionContext": ENCRYPTION_CONTEXT,
    "DestinationKeyId": KEY_ID,
    "DryRun": DRY_RUN,
    "DryRunModifiers": DRY_RUN_MODIFIERS,
    "EncryptionAlgorithm": ENCRYPTION_ALGORITHM,
    "EncryptionContext": ENCRYPTION_CONTEXT,
    "GrantTokens": GRANT_TOKENS,
    "KeyAgreementAlgorithm": Text(enum=("ECDH",)),
    "KeyId": KEY_ID,
    "KeyPairSpec": DATA_KEY_PAIR_SPEC,
    "KeySpec": DATA_KEY_SPEC,
    "Limit": Integer(1, 1000),  # LimitType
    "Mac": CIPHERTEXT,
    "MacAlgorithm": MAC_ALGORITHM,
    "Marker": Text(1, 1024),  # MarkerType: what the previous page's NextMarker said
    "Message": PLAINTEXT,
    "MessageType": MESSAGE_TYPE,
    "NumberOfBytes": NUMBER_OF_BYTES,
    "Plaintext": PLAINTEXT,
    "PublicKey": Blob(1, 8192),
    "ResourceOwners": ListOf(Text(enum=("SELF", "OTHER_ACCOUNTS_VIA_RAM")), 1, 2),
    "Signature": CIPHERTEXT,
    "SigningAlgorithm": SIGNING_ALGORITHM,
    "SourceEncryptionAlgorithm": ENCRYPTION_ALGORITHM,
    "SourceEncryptionContext": ENCRYPTION_CONTEXT,
    "SourceKeyId": KEY_ID,
}


def _request(members: str) -> Struct:
    """A request body from its members' names in the model's order, each required one
    marked with a trailing ``!``: ``"KeyId! GrantTokens"``."""
    names = [name.removesuffix("!") for name in members.split()]
    required = tuple(name[:-1] for name in members.split() if name.endswith("!"))
    return Struct({name: _MEMBERS[name] for name in names}, required)


def _names(members: str) -> tuple[str, ...]:
    """Answer members, space-separated, in the model's order."""
    return tuple(members.split())


# -------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Operation:
    """What the agent must know of one served operation."""

    # The app's request body. Recipient operations: without Recipient (the agent's to add).
    request: Struct
    # The answer's members as KMS documents them for a call without Recipient, in the
    # model's order; the app gets these and no other.
    answer: tuple[str, ...]
    # Request members that name a KMS key: an exact key ARN among them that is not
    # trusted is refused before any call.
    key_members: tuple[str, ...] = ()
    # Where the answer names each key that did the work (a path of members): every one
    # must be trusted before the answer is used.
    answer_keys: tuple[tuple[str, ...], ...] = ()
    # Recipient operations: the answer member that holds the secret without Recipient.
    plaintext_member: str | None = None
    # Listings: the answer's list member, filtered to entries naming a trusted key.
    listing: str | None = None
    # The kms: actions a key policy grants for it; () for those only an IAM policy can
    # grant (the listings act on the account, not on a key).
    key_policy_actions: tuple[str, ...] = ()
    # At most and at least one of these members (KMS: "either ... or ..., not both").
    exactly_one_of: tuple[str, ...] = ()

    @property
    def recipient(self) -> bool:
        """The agent adds Recipient and opens the answer's envelope."""
        return self.plaintext_member is not None

    @property
    def takes_key(self) -> bool:
        """Subject to ``trusted_keys``: with none, refused before any call."""
        return bool(self.key_members or self.answer_keys or self.listing)


def _keyed(
    request: str,
    answer: str,
    *key_policy_actions: str,
    plaintext_member: str | None = None,
    exactly_one_of: tuple[str, ...] = (),
) -> Operation:
    """An operation on the one key its request's ``KeyId`` names and its answer's
    ``KeyId`` names back (as an ARN); ``request`` as ``_request`` reads it, ``answer``
    as ``_names`` does."""
    return Operation(
        _request(request),
        _names(answer),
        key_members=("KeyId",),
        answer_keys=(("KeyId",),),
        plaintext_member=plaintext_member,
        key_policy_actions=key_policy_actions,
        exactly_one_of=exactly_one_of,
    )


_KEY_SPEC_OR_BYTES = ("KeySpec", "NumberOfBytes")
_DATA_KEY_PAIR = "EncryptionContext KeyId! KeyPairSpec! GrantTokens DryRun"

OPERATION_TABLE: dict[str, Operation] = {
    # --- Recipient: the secret comes back only as CiphertextForRecipient --------------
    "Decrypt": _keyed(
        "CiphertextBlob EncryptionContext GrantTokens KeyId EncryptionAlgorithm DryRun "
        "DryRunModifiers",
        "KeyId Plaintext EncryptionAlgorithm KeyMaterialId",
        "kms:Decrypt",
        plaintext_member="Plaintext",
    ),
    "GenerateDataKey": _keyed(
        "KeyId! EncryptionContext NumberOfBytes KeySpec GrantTokens DryRun",
        "CiphertextBlob Plaintext KeyId KeyMaterialId",
        "kms:GenerateDataKey",
        plaintext_member="Plaintext",
        exactly_one_of=_KEY_SPEC_OR_BYTES,
    ),
    "GenerateRandom": Operation(
        _request("NumberOfBytes CustomKeyStoreId"),
        _names("Plaintext"),
        plaintext_member="Plaintext",
        key_policy_actions=("kms:GenerateRandom",),
    ),
    "GenerateDataKeyPair": _keyed(
        _DATA_KEY_PAIR,
        "PrivateKeyCiphertextBlob PrivateKeyPlaintext PublicKey KeyId KeyPairSpec KeyMaterialId",
        "kms:GenerateDataKeyPair",
        plaintext_member="PrivateKeyPlaintext",
    ),
    "DeriveSharedSecret": _keyed(
        "KeyId! KeyAgreementAlgorithm! PublicKey! GrantTokens DryRun",
        "KeyId SharedSecret KeyAgreementAlgorithm KeyOrigin",
        "kms:DeriveSharedSecret",
        plaintext_member="SharedSecret",
    ),
    # --- pass-through: nothing secret in the answer ------------------------------------
    "Encrypt": _keyed(
        "KeyId! Plaintext! EncryptionContext GrantTokens EncryptionAlgorithm DryRun",
        "CiphertextBlob KeyId EncryptionAlgorithm",
        "kms:Encrypt",
    ),
    "ReEncrypt": Operation(
        _request(
            "CiphertextBlob SourceEncryptionContext SourceKeyId DestinationKeyId! "
            "DestinationEncryptionContext SourceEncryptionAlgorithm "
            "DestinationEncryptionAlgorithm GrantTokens DryRun DryRunModifiers"
        ),
        _names(
            "CiphertextBlob SourceKeyId KeyId SourceEncryptionAlgorithm "
            "DestinationEncryptionAlgorithm SourceKeyMaterialId DestinationKeyMaterialId"
        ),
        key_members=("SourceKeyId", "DestinationKeyId"),
        answer_keys=(("SourceKeyId",), ("KeyId",)),
        key_policy_actions=("kms:ReEncryptFrom", "kms:ReEncryptTo"),
    ),
    "GenerateDataKeyWithoutPlaintext": _keyed(
        "KeyId! EncryptionContext KeySpec NumberOfBytes GrantTokens DryRun",
        "CiphertextBlob KeyId KeyMaterialId",
        "kms:GenerateDataKeyWithoutPlaintext",
        exactly_one_of=_KEY_SPEC_OR_BYTES,
    ),
    "GenerateDataKeyPairWithoutPlaintext": _keyed(
        _DATA_KEY_PAIR,
        "PrivateKeyCiphertextBlob PublicKey KeyId KeyPairSpec KeyMaterialId",
        "kms:GenerateDataKeyPairWithoutPlaintext",
    ),
    "DescribeKey": Operation(
        _request("KeyId! GrantTokens"),
        _names("KeyMetadata"),
        key_members=("KeyId",),
        answer_keys=(("KeyMetadata", "Arn"),),
        key_policy_actions=("kms:DescribeKey",),
    ),
    "GetPublicKey": _keyed(
        "KeyId! GrantTokens",
        "KeyId PublicKey CustomerMasterKeySpec KeySpec KeyUsage EncryptionAlgorithms "
        "SigningAlgorithms KeyAgreementAlgorithms EncapsulationAlgorithms",
        "kms:GetPublicKey",
    ),
    "Sign": _keyed(
        "KeyId! Message! MessageType GrantTokens SigningAlgorithm! DryRun",
        "KeyId Signature SigningAlgorithm",
        "kms:Sign",
    ),
    "Verify": _keyed(
        "KeyId! Message! MessageType Signature! SigningAlgorithm! GrantTokens DryRun",
        "KeyId SignatureValid SigningAlgorithm",
        "kms:Verify",
    ),
    "GenerateMac": _keyed(
        "Message! KeyId! MacAlgorithm! GrantTokens DryRun",
        "Mac MacAlgorithm KeyId",
        "kms:GenerateMac",
    ),
    "VerifyMac": _keyed(
        "Message! KeyId! MacAlgorithm! Mac! GrantTokens DryRun",
        "KeyId MacValid MacAlgorithm",
        "kms:VerifyMac",
    ),
    "ListAliases": Operation(
        _request("KeyId Limit Marker"),
        _names("Aliases NextMarker Truncated"),
        key_members=("KeyId",),
        listing="Aliases",
    ),
    "ListKeys": Operation(
        _request("Limit Marker ResourceOwners"),
        _names("Keys NextMarker Truncated"),
        listing="Keys",
    ),
}
OPERATIONS: tuple[str, ...] = tuple(OPERATION_TABLE)
RECIPIENT_OPERATIONS: tuple[str, ...] = tuple(
    name for name, operation in OPERATION_TABLE.items() if operation.recipient
)
PASS_THROUGH_OPERATIONS: tuple[str, ...] = tuple(
    name for name, operation in OPERATION_TABLE.items() if not operation.recipient
)
# Every member that can carry a secret in some served answer.
SECRET_MEMBERS: frozenset[str] = frozenset(
    operation.plaintext_member
    for operation in OPERATION_TABLE.values()
    if operation.plaintext_member is not None
)

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
class Text:
    """A JSON string: length bounds in characters, or one of ``enum``."""

    min: int | None = None
    max: int | None = None
    enum: tuple[str, ...] = ()


@dataclass(frozen=True)
class Integer:
    min: int | None = None
    max: int | None = None


@dataclass(frozen=True)
class Boolean:
    pass


@dataclass(frozen=True)
class Blob:
    """Bytes, base64 in JSON: length bounds in decoded bytes."""

    min: int | None = None
    max: int | None = None


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
LIMIT = Integer(1, 1000)  # LimitType
MARKER = Text(1, 1024)  # MarkerType: what the previous page's NextMarker said
_COMMON: dict[str, Shape] = {"GrantTokens": GRANT_TOKENS, "DryRun": DRY_RUN}


def _struct(required: tuple[str, ...], **members: Shape) -> Struct:
    return Struct(members, required)


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
    request: Struct,
    answer: tuple[str, ...],
    *,
    key_policy_actions: tuple[str, ...],
    plaintext_member: str | None = None,
    exactly_one_of: tuple[str, ...] = (),
) -> Operation:
    """An operation on the one key its request's ``KeyId`` names and its answer's
    ``KeyId`` names back (as an ARN)."""
    return Operation(
        request,
        answer,
        key_members=("KeyId",),
        answer_keys=(("KeyId",),),
        plaintext_member=plaintext_member,
        key_policy_actions=key_policy_actions,
        exactly_one_of=exactly_one_of,
    )


OPERATION_TABLE: dict[str, Operation] = {
    # --- Recipient: the secret comes back only as CiphertextForRecipient --------------
    "Decrypt": _keyed(
        _struct(
            (),
            CiphertextBlob=CIPHERTEXT,
            EncryptionContext=ENCRYPTION_CONTEXT,
            GrantTokens=GRANT_TOKENS,
            KeyId=KEY_ID,
            EncryptionAlgorithm=ENCRYPTION_ALGORITHM,
            DryRun=DRY_RUN,
            DryRunModifiers=DRY_RUN_MODIFIERS,
        ),
        ("KeyId", "Plaintext", "EncryptionAlgorithm", "KeyMaterialId"),
        plaintext_member="Plaintext",
        key_policy_actions=("kms:Decrypt",),
    ),
    "GenerateDataKey": _keyed(
        _struct(
            ("KeyId",),
            KeyId=KEY_ID,
            EncryptionContext=ENCRYPTION_CONTEXT,
            NumberOfBytes=NUMBER_OF_BYTES,
            KeySpec=DATA_KEY_SPEC,
            **_COMMON,
        ),
        ("CiphertextBlob", "Plaintext", "KeyId", "KeyMaterialId"),
        plaintext_member="Plaintext",
        key_policy_actions=("kms:GenerateDataKey",),
        exactly_one_of=("KeySpec", "NumberOfBytes"),
    ),
    "GenerateRandom": Operation(
        _struct((), NumberOfBytes=NUMBER_OF_BYTES, CustomKeyStoreId=Text(1, 64)),
        ("Plaintext",),
        plaintext_member="Plaintext",
        key_policy_actions=("kms:GenerateRandom",),
    ),
    "GenerateDataKeyPair": _keyed(
        _struct(
            ("KeyId", "KeyPairSpec"),
            EncryptionContext=ENCRYPTION_CONTEXT,
            KeyId=KEY_ID,
            KeyPairSpec=DATA_KEY_PAIR_SPEC,
            **_COMMON,
        ),
        (
            "PrivateKeyCiphertextBlob",
            "PrivateKeyPlaintext",
            "PublicKey",
            "KeyId",
            "KeyPairSpec",
            "KeyMaterialId",
        ),
        plaintext_member="PrivateKeyPlaintext",
        key_policy_actions=("kms:GenerateDataKeyPair",),
    ),
    "DeriveSharedSecret": _keyed(
        _struct(
            ("KeyId", "KeyAgreementAlgorithm", "PublicKey"),
            KeyId=KEY_ID,
            KeyAgreementAlgorithm=Text(enum=("ECDH",)),
            PublicKey=Blob(1, 8192),
            **_COMMON,
        ),
        ("KeyId", "SharedSecret", "KeyAgreementAlgorithm", "KeyOrigin"),
        plaintext_member="SharedSecret",
        key_policy_actions=("kms:DeriveSharedSecret",),
    ),
    # --- pass-through: nothing secret in the answer ------------------------------------
    "Encrypt": _keyed(
        _struct(
            ("KeyId", "Plaintext"),
            KeyId=KEY_ID,
            Plaintext=PLAINTEXT,
            EncryptionContext=ENCRYPTION_CONTEXT,
            GrantTokens=GRANT_TOKENS,
            EncryptionAlgorithm=ENCRYPTION_ALGORITHM,
            DryRun=DRY_RUN,
        ),
        ("CiphertextBlob", "KeyId", "EncryptionAlgorithm"),
        key_policy_actions=("kms:Encrypt",),
    ),
    "ReEncrypt": Operation(
        _struct(
            ("DestinationKeyId",),
            CiphertextBlob=CIPHERTEXT,
            SourceEncryptionContext=ENCRYPTION_CONTEXT,
            SourceKeyId=KEY_ID,
            DestinationKeyId=KEY_ID,
            DestinationEncryptionContext=ENCRYPTION_CONTEXT,
            SourceEncryptionAlgorithm=ENCRYPTION_ALGORITHM,
            DestinationEncryptionAlgorithm=ENCRYPTION_ALGORITHM,
            GrantTokens=GRANT_TOKENS,
            DryRun=DRY_RUN,
            DryRunModifiers=DRY_RUN_MODIFIERS,
        ),
        (
            "CiphertextBlob",
            "SourceKeyId",
            "KeyId",
            "SourceEncryptionAlgorithm",
            "DestinationEncryptionAlgorithm",
            "SourceKeyMaterialId",
            "DestinationKeyMaterialId",
        ),
        key_members=("SourceKeyId", "DestinationKeyId"),
        answer_keys=(("SourceKeyId",), ("KeyId",)),
        key_policy_actions=("kms:ReEncryptFrom", "kms:ReEncryptTo"),
    ),
    "GenerateDataKeyWithoutPlaintext": _keyed(
        _struct(
            ("KeyId",),
            KeyId=KEY_ID,
            EncryptionContext=ENCRYPTION_CONTEXT,
            KeySpec=DATA_KEY_SPEC,
            NumberOfBytes=NUMBER_OF_BYTES,
            **_COMMON,
        ),
        ("CiphertextBlob", "KeyId", "KeyMaterialId"),
        key_policy_actions=("kms:GenerateDataKeyWithoutPlaintext",),
        exactly_one_of=("KeySpec", "NumberOfBytes"),
    ),
    "GenerateDataKeyPairWithoutPlaintext": _keyed(
        _struct(
            ("KeyId", "KeyPairSpec"),
            EncryptionContext=ENCRYPTION_CONTEXT,
            KeyId=KEY_ID,
            KeyPairSpec=DATA_KEY_PAIR_SPEC,
            **_COMMON,
        ),
        ("PrivateKeyCiphertextBlob", "PublicKey", "KeyId", "KeyPairSpec", "KeyMaterialId"),
        key_policy_actions=("kms:GenerateDataKeyPairWithoutPlaintext",),
    ),
    "DescribeKey": Operation(
        _struct(("KeyId",), KeyId=KEY_ID, GrantTokens=GRANT_TOKENS),
        ("KeyMetadata",),
        key_members=("KeyId",),
        answer_keys=(("KeyMetadata", "Arn"),),
        key_policy_actions=("kms:DescribeKey",),
    ),
    "GetPublicKey": _keyed(
        _struct(("KeyId",), KeyId=KEY_ID, GrantTokens=GRANT_TOKENS),
        (
            "KeyId",
            "PublicKey",
            "CustomerMasterKeySpec",
            "KeySpec",
            "KeyUsage",
            "EncryptionAlgorithms",
            "SigningAlgorithms",
            "KeyAgreementAlgorithms",
            "EncapsulationAlgorithms",
        ),
        key_policy_actions=("kms:GetPublicKey",),
    ),
    "Sign": _keyed(
        _struct(
            ("KeyId", "Message", "SigningAlgorithm"),
            KeyId=KEY_ID,
            Message=PLAINTEXT,
            MessageType=MESSAGE_TYPE,
            GrantTokens=GRANT_TOKENS,
            SigningAlgorithm=SIGNING_ALGORITHM,
            DryRun=DRY_RUN,
        ),
        ("KeyId", "Signature", "SigningAlgorithm"),
        key_policy_actions=("kms:Sign",),
    ),
    "Verify": _keyed(
        _struct(
            ("KeyId", "Message", "Signature", "SigningAlgorithm"),
            KeyId=KEY_ID,
            Message=PLAINTEXT,
            MessageType=MESSAGE_TYPE,
            Signature=CIPHERTEXT,
            SigningAlgorithm=SIGNING_ALGORITHM,
            GrantTokens=GRANT_TOKENS,
            DryRun=DRY_RUN,
        ),
        ("KeyId", "SignatureValid", "SigningAlgorithm"),
        key_policy_actions=("kms:Verify",),
    ),
    "GenerateMac": _keyed(
        _struct(
            ("Message", "KeyId", "MacAlgorithm"),
            Message=PLAINTEXT,
            KeyId=KEY_ID,
            MacAlgorithm=MAC_ALGORITHM,
            **_COMMON,
        ),
        ("Mac", "MacAlgorithm", "KeyId"),
        key_policy_actions=("kms:GenerateMac",),
    ),
    "VerifyMac": _keyed(
        _struct(
            ("Message", "KeyId", "MacAlgorithm", "Mac"),
            Message=PLAINTEXT,
            KeyId=KEY_ID,
            MacAlgorithm=MAC_ALGORITHM,
            Mac=CIPHERTEXT,
            **_COMMON,
        ),
        ("KeyId", "MacValid", "MacAlgorithm"),
        key_policy_actions=("kms:VerifyMac",),
    ),
    "ListAliases": Operation(
        _struct((), KeyId=KEY_ID, Limit=LIMIT, Marker=MARKER),
        ("Aliases", "NextMarker", "Truncated"),
        key_members=("KeyId",),
        listing="Aliases",
    ),
    "ListKeys": Operation(
        _struct(
            (),
            Limit=LIMIT,
            Marker=MARKER,
            ResourceOwners=ListOf(Text(enum=("SELF", "OTHER_ACCOUNTS_VIA_RAM")), 1, 2),
        ),
        ("Keys", "NextMarker", "Truncated"),
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

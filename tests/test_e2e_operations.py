"""Every served operation end to end, on the local stack, through the agent.

One stack for the module (devtools.devstack): simulated NSM CA, the local KMS, the
proxy, and an agent with its loopback TCP listener, trusting five keys of the image
by exact ARN: two symmetric (A, A2), a signing key, an HMAC key and a key agreement
key, behind aliases. Each operation is called the two ways an app can: boto3 pointed
at the agent's TCP listener as an unmodified SDK would be (``endpoint_url`` and
placeholder credentials: the agent signs), and the agent's Unix-socket client
(``enclave_agent.client``). The answers are checked with independent oracles:
``cryptography`` verifies signatures with the public key and derives the peer's
side of the shared secret; the agent's own Decrypt opens what Encrypt made.

The parent is played by boto3 with the very credentials the proxy hands the agent
(``direct_kms_client``): it makes keys of its own (of every kind) behind aliases the
app uses, re-points the app's alias, and encrypts values it chose. Every such answer
is refused, naming the parent's key; the listings never show its keys. Last, every
log of the run is searched for the plaintexts, messages, signatures and MACs.
"""

from __future__ import annotations

import base64
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore import xform_name
from botocore.config import Config
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from devtools.devstack import DevStack, direct_kms_client, log_events
from enclave_agent.client import AgentClient, AgentError
from enclave_agent.runtime.kms_operations import OPERATION_TABLE, PASS_THROUGH_OPERATIONS
from tests.support.stack import find_leaks

PLAINTEXT = b"app data for Encrypt, never logged " + secrets.token_hex(8).encode()
MESSAGE = b"a message the app signs, never logged " + secrets.token_hex(8).encode()
PLANTED = b"planted by the parent " + secrets.token_hex(8).encode()
VIAS = ("boto3-tcp", "unix-socket")
# Answer members that are bytes (base64 in JSON): what boto3 decodes for the app.
BLOBS = frozenset(
    {
        "CiphertextBlob",
        "Plaintext",
        "PublicKey",
        "PrivateKeyCiphertextBlob",
        "PrivateKeyPlaintext",
        "Signature",
        "Mac",
        "SharedSecret",
    }
)


class Refused(Exception):
    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.message = message


class Boto3Kms:
    """boto3 pointed at the agent's TCP listener: an unmodified SDK's view."""

    def __init__(self, endpoint: str, region: str) -> None:
        self.client = boto3.client(
            "kms",
            endpoint_url=endpoint,
            region_name=region,
            aws_access_key_id="placeholder",  # the agent signs with the parent's credentials
            aws_secret_access_key="placeholder",
            config=Config(retries={"max_attempts": 1}),
        )

    def call(self, operation: str, **members: Any) -> dict[str, Any]:
        try:
            answer = dict(getattr(self.client, xform_name(operation))(**members))
        except ClientError as exc:
            error = exc.response["Error"]
            raise Refused(error["Code"], error.get("Message", "")) from None
        answer.pop("ResponseMetadata", None)
        return answer


class SocketKms:
    """The agent's Unix-socket client (standard library only): KMS JSON, base64 blobs."""

    def __init__(self, path: str) -> None:
        self.client = AgentClient(path)

    def call(self, operation: str, **members: Any) -> dict[str, Any]:
        body = {k: _b64(v) if isinstance(v, bytes) else v for k, v in members.items()}
        try:
            answer = self.client.kms(operation, body)
        except AgentError as exc:
            raise Refused(exc.error_type, exc.message) from None
        return {k: base64.b64decode(v) if k in BLOBS else v for k, v in answer.items()}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass
class Stack:
    dev: DevStack
    parent: Any  # boto3 straight to the local KMS with the role's credentials
    keys: dict[str, str]  # the image's keys: name → ARN (all trusted)
    parents: dict[str, str]  # the parent's keys: name → ARN (none trusted)
    socket: str
    learned: list[bytes] = field(default_factory=list)  # every secret the run handled

    def via(self, name: str) -> Boto3Kms | SocketKms:
        if name == "boto3-tcp":
            assert self.dev.agent_tcp_endpoint
            return Boto3Kms(self.dev.agent_tcp_endpoint, self.dev.region)
        return SocketKms(self.socket)


KINDS = {
    "A": {},
    "A2": {},
    "signer": {"KeySpec": "ECC_NIST_P256", "KeyUsage": "SIGN_VERIFY"},
    "mac": {"KeySpec": "HMAC_256", "KeyUsage": "GENERATE_VERIFY_MAC"},
    "agree": {"KeySpec": "ECC_NIST_P256", "KeyUsage": "KEY_AGREEMENT"},
}


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    work = Path(tempfile.mkdtemp(prefix="e2e-ops-"))
    dev = DevStack(work_dir=work, credentials="static", agent_tcp=True)
    try:
        dev.make_ca()
        dev.start_kms()
        dev.start_proxy()
        parent = direct_kms_client(dev.state())
        keys, parents = {}, {}
        for name, kind in KINDS.items():
            # Default key policy: the account (the role) may use them. What is tested
            # here is the agent's path and its trusted-keys check, not the policy.
            keys[name] = parent.create_key(Description=f"image {name}", **kind)["KeyMetadata"][
                "Arn"
            ]
            parent.create_alias(AliasName=f"alias/{name}", TargetKeyId=keys[name])
            parents[name] = parent.create_key(Description=f"parent {name}", **kind)["KeyMetadata"][
                "Arn"
            ]
            parent.create_alias(AliasName=f"alias/parents-{name}", TargetKeyId=parents[name])
        config = dev.write_agent_config(name="agent", trusted_keys=list(keys.values()))
        socket = dev.start_agent(config, name="agent")
        yield Stack(dev, parent, keys, parents, socket)
    finally:
        dev.stop()
        shutil.rmtree(work, ignore_errors=True)


def _public_key(stack: Stack, key: str) -> Any:
    der = stack.parent.get_public_key(KeyId=key)["PublicKey"]
    return serialization.load_der_public_key(der)


# --- every pass-through operation, both ways ------------------------------------------


@pytest.mark.parametrize("via", VIAS)
def test_encrypt_re_encrypt_and_data_keys_without_plaintext(stack: Stack, via: str) -> None:
    kms = stack.via(via)
    context = {"app": "e2e"}
    encrypted = kms.call("Encrypt", KeyId="alias/A", Plaintext=PLAINTEXT, EncryptionContext=context)
    assert encrypted["KeyId"] == stack.keys["A"]
    assert encrypted["EncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"
    blob = encrypted["CiphertextBlob"]
    assert kms.call("Decrypt", CiphertextBlob=blob, EncryptionContext=context)["Plaintext"] == (
        PLAINTEXT
    )
    moved = kms.call(
        "ReEncrypt",
        CiphertextBlob=blob,
        SourceEncryptionContext=context,
        DestinationKeyId="alias/A2",
        DestinationEncryptionContext=context,
    )
    assert (moved["SourceKeyId"], moved["KeyId"]) == (stack.keys["A"], stack.keys["A2"])
    opened = kms.call("Decrypt", CiphertextBlob=moved["CiphertextBlob"], EncryptionContext=context)
    assert (opened["Plaintext"], opened["KeyId"]) == (PLAINTEXT, stack.keys["A2"])

    data_key = kms.call("GenerateDataKeyWithoutPlaintext", KeyId="alias/A", KeySpec="AES_256")
    assert set(data_key) == {"CiphertextBlob", "KeyId"} and data_key["KeyId"] == stack.keys["A"]
    plaintext = kms.call("Decrypt", CiphertextBlob=data_key["CiphertextBlob"])["Plaintext"]
    assert len(plaintext) == 32
    stack.learned.append(plaintext)

    pair = kms.call(
        "GenerateDataKeyPairWithoutPlaintext", KeyId=stack.keys["A"], KeyPairSpec="ECC_NIST_P256"
    )
    assert "PrivateKeyPlaintext" not in pair and pair["KeyPairSpec"] == "ECC_NIST_P256"
    private_der = kms.call("Decrypt", CiphertextBlob=pair["PrivateKeyCiphertextBlob"])["Plaintext"]
    stack.learned.append(private_der)
    private = serialization.load_der_private_key(private_der, password=None)
    assert (
        private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == pair["PublicKey"]
    )


@pytest.mark.parametrize("via", VIAS)
def test_describe_key_and_get_public_key(stack: Stack, via: str) -> None:
    kms = stack.via(via)
    metadata = kms.call("DescribeKey", KeyId="alias/signer")["KeyMetadata"]
    assert metadata["Arn"] == stack.keys["signer"] and metadata["KeyUsage"] == "SIGN_VERIFY"
    public = kms.call("GetPublicKey", KeyId="alias/signer")
    assert public["KeyId"] == stack.keys["signer"]
    assert public["SigningAlgorithms"] == ["ECDSA_SHA_256"]
    assert (
        public["PublicKey"] == stack.parent.get_public_key(KeyId=stack.keys["signer"])["PublicKey"]
    )


@pytest.mark.parametrize("via", VIAS)
def test_sign_and_verify(stack: Stack, via: str) -> None:
    kms = stack.via(via)
    request = {"KeyId": "alias/signer", "Message": MESSAGE, "SigningAlgorithm": "ECDSA_SHA_256"}
    signed = kms.call("Sign", **request)
    assert signed["KeyId"] == stack.keys["signer"]
    signature = signed["Signature"]
    stack.learned.append(signature)
    # An independent check: the signature verifies offline with the public key.
    _public_key(stack, stack.keys["signer"]).verify(signature, MESSAGE, ec.ECDSA(hashes.SHA256()))
    verified = kms.call("Verify", Signature=signature, **request)
    assert (verified["SignatureValid"], verified["KeyId"]) == (True, stack.keys["signer"])
    with pytest.raises(Refused) as forged:
        kms.call("Verify", Signature=signature[:-1] + bytes([signature[-1] ^ 1]), **request)
    assert forged.value.error_type == "KMSInvalidSignatureException"


@pytest.mark.parametrize("via", VIAS)
def test_generate_mac_and_verify_mac(stack: Stack, via: str) -> None:
    kms = stack.via(via)
    request = {"KeyId": "alias/mac", "Message": MESSAGE, "MacAlgorithm": "HMAC_SHA_256"}
    made = kms.call("GenerateMac", **request)
    assert made["KeyId"] == stack.keys["mac"] and len(made["Mac"]) == 32
    stack.learned.append(made["Mac"])
    verified = kms.call("VerifyMac", Mac=made["Mac"], **request)
    assert (verified["MacValid"], verified["KeyId"]) == (True, stack.keys["mac"])
    with pytest.raises(Refused) as wrong:
        kms.call("VerifyMac", Mac=bytes(32), **request)
    assert wrong.value.error_type == "KMSInvalidMacException"


@pytest.mark.parametrize("via", VIAS)
def test_listings_show_the_trusted_keys_only(stack: Stack, via: str) -> None:
    """The parent's keys and their aliases exist in the account; the app never sees
    them. Pages of one entry, as a paginating app asks, add up to the trusted keys."""
    kms = stack.via(via)
    seen: list[str] = []
    request: dict[str, Any] = {"Limit": 1}
    while True:
        page = kms.call("ListKeys", **request)
        seen += [entry["KeyArn"] for entry in page["Keys"]]
        if not page["Truncated"]:
            break
        request = {"Limit": 1, "Marker": page["NextMarker"]}
    assert sorted(seen) == sorted(stack.keys.values())
    everything = stack.parent.list_keys()["Keys"]
    assert len(everything) == 2 * len(stack.keys)  # the parent's are there, unlisted
    aliases = kms.call("ListAliases")["Aliases"]
    assert sorted(a["AliasName"] for a in aliases) == sorted(f"alias/{name}" for name in KINDS)
    only = kms.call("ListAliases", KeyId=stack.keys["A"])["Aliases"]
    assert [a["AliasName"] for a in only] == ["alias/A"]


@pytest.mark.parametrize("via", VIAS)
def test_derive_shared_secret_with_the_local_kms(stack: Stack, via: str) -> None:
    """Recipient end to end: the local KMS derives the ECDH secret and answers it only
    as CiphertextForRecipient; the agent opens it; the peer derives the same secret."""
    kms = stack.via(via)
    peer = ec.generate_private_key(ec.SECP256R1())
    spki = peer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    answer = kms.call(
        "DeriveSharedSecret", KeyId="alias/agree", KeyAgreementAlgorithm="ECDH", PublicKey=spki
    )
    expected = peer.exchange(ec.ECDH(), _public_key(stack, stack.keys["agree"]))
    assert answer["SharedSecret"] == expected and answer["KeyId"] == stack.keys["agree"]
    assert "CiphertextForRecipient" not in answer
    stack.learned.append(expected)
    # KMS answered the secret only inside CiphertextForRecipient: a SharedSecret in its
    # answer would have been refused by the agent. Without Recipient, the parent's own
    # call gets the plaintext secret, which is why the agent always adds one.
    direct = stack.parent.derive_shared_secret(
        KeyId=stack.keys["agree"], KeyAgreementAlgorithm="ECDH", PublicKey=spki
    )
    assert direct["SharedSecret"] == expected


def test_the_agent_serves_exactly_the_table(stack: Stack) -> None:
    """The unmodified SDK's other operations get UnknownOperationException naming what
    is served; unknown members are refused with ValidationException (sent raw, since
    boto3 itself refuses to send them)."""
    sdk = stack.via("boto3-tcp")
    with pytest.raises(Refused) as unknown:
        sdk.call("ScheduleKeyDeletion", KeyId=stack.keys["A"])
    assert unknown.value.error_type == "UnknownOperationException"
    assert all(name in unknown.value.message for name in OPERATION_TABLE)
    client = AgentClient(stack.socket)
    for operation in PASS_THROUGH_OPERATIONS:
        with pytest.raises(AgentError) as extra:
            client.kms(operation, {"Bogus": 1})
        assert extra.value.error_type == "ValidationException"
        assert "Bogus: unknown member" in extra.value.message
    assert stack.parent.describe_key(KeyId=stack.keys["A"])["KeyMetadata"]["Enabled"]


# --- the parent chooses the key: every operation refuses its keys ----------------------


def _parents_request(stack: Stack, operation: str, key: str) -> dict[str, Any]:
    """A request naming ``key`` (an alias of the parent's key, or its ARN) for each
    pass-through operation that takes one."""
    planted = stack.parent.encrypt(KeyId=stack.parents["A"], Plaintext=PLANTED)["CiphertextBlob"]
    return {
        "Encrypt": {"KeyId": key, "Plaintext": PLAINTEXT},
        "ReEncrypt": {"CiphertextBlob": planted, "DestinationKeyId": "alias/A"},
        "GenerateDataKeyWithoutPlaintext": {"KeyId": key, "NumberOfBytes": 32},
        "GenerateDataKeyPairWithoutPlaintext": {"KeyId": key, "KeyPairSpec": "ECC_NIST_P256"},
        "DescribeKey": {"KeyId": key},
        "GetPublicKey": {"KeyId": key},
        "Sign": {"KeyId": key, "Message": MESSAGE, "SigningAlgorithm": "ECDSA_SHA_256"},
        "Verify": {
            "KeyId": key,
            "Message": MESSAGE,
            "Signature": stack.parent.sign(
                KeyId=stack.parents["signer"], Message=MESSAGE, SigningAlgorithm="ECDSA_SHA_256"
            )["Signature"],
            "SigningAlgorithm": "ECDSA_SHA_256",
        },
        "GenerateMac": {"KeyId": key, "Message": MESSAGE, "MacAlgorithm": "HMAC_SHA_256"},
        "VerifyMac": {
            "KeyId": key,
            "Message": MESSAGE,
            "MacAlgorithm": "HMAC_SHA_256",
            "Mac": stack.parent.generate_mac(
                KeyId=stack.parents["mac"], Message=MESSAGE, MacAlgorithm="HMAC_SHA_256"
            )["Mac"],
        },
    }[operation]


KIND_OF = {"GetPublicKey": "signer", "Sign": "signer", "Verify": "signer"}
KIND_OF |= {"GenerateMac": "mac", "VerifyMac": "mac"}
KEYED = [op for op in PASS_THROUGH_OPERATIONS if OPERATION_TABLE[op].answer_keys]


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("operation", KEYED)
def test_an_answer_from_the_parents_key_is_refused(stack: Stack, via: str, operation: str) -> None:
    """KMS answers honestly, under the parent's key (an alias of the parent's, or, for
    ReEncrypt, a ciphertext the parent made): the agent refuses the answer and names
    the key; the app gets nothing of it."""
    kind = KIND_OF.get(operation, "A")
    request = _parents_request(stack, operation, f"alias/parents-{kind}")
    with pytest.raises(Refused) as refused:
        stack.via(via).call(operation, **request)
    assert refused.value.error_type == "AccessDeniedException"
    assert stack.parents[kind] in refused.value.message
    assert "trusted_keys" in refused.value.message


@pytest.mark.parametrize("operation", KEYED)
def test_the_parents_key_arn_is_refused_before_any_call(stack: Stack, operation: str) -> None:
    kind = KIND_OF.get(operation, "A")
    request = _parents_request(stack, operation, stack.parents[kind])
    if operation == "ReEncrypt":
        request = {**request, "SourceKeyId": stack.parents["A"]}
    with pytest.raises(Refused) as refused:
        stack.via("boto3-tcp").call(operation, **request)
    assert "before any call" in refused.value.message
    # The agent logs each call before it answers: this one made no attempt at KMS.
    events = log_events(stack.dev.log_path("agent"))
    last = [e for e in events if e["event"] == "kms_call" and e["operation"] == operation][-1]
    assert (last["outcome"], last["attempts"]) == ("error", 0)


def test_re_encrypt_to_the_parents_key_is_refused(stack: Stack) -> None:
    """Re-pointed destination: alias/A2 now names the parent's key. KMS re-encrypts the
    app's data under it; the agent refuses the answer, so the app never stores (or
    hands on) a ciphertext the parent can open."""
    kms = stack.via("boto3-tcp")
    blob = kms.call("Encrypt", KeyId="alias/A", Plaintext=PLAINTEXT)["CiphertextBlob"]
    stack.parent.update_alias(AliasName="alias/A2", TargetKeyId=stack.parents["A"])
    try:
        with pytest.raises(Refused) as refused:
            kms.call("ReEncrypt", CiphertextBlob=blob, DestinationKeyId="alias/A2")
    finally:
        stack.parent.update_alias(AliasName="alias/A2", TargetKeyId=stack.keys["A2"])
    assert refused.value.error_type == "AccessDeniedException"
    assert stack.parents["A"] in refused.value.message


def test_encrypt_under_a_re_pointed_alias_is_refused(stack: Stack) -> None:
    """The parent re-points the app's alias to its own key: an app storing what Encrypt
    returns would store data the parent can decrypt. The agent refuses the answer."""
    stack.parent.update_alias(AliasName="alias/A", TargetKeyId=stack.parents["A"])
    try:
        with pytest.raises(Refused) as refused:
            stack.via("unix-socket").call("Encrypt", KeyId="alias/A", Plaintext=PLAINTEXT)
    finally:
        stack.parent.update_alias(AliasName="alias/A", TargetKeyId=stack.keys["A"])
    assert stack.parents["A"] in refused.value.message


# --- logs ------------------------------------------------------------------------------


def test_zz_no_plaintext_message_signature_or_mac_in_any_log(stack: Stack) -> None:
    """After every test above (success and refusal paths, both clients): no plaintext,
    signed message, signature, MAC, data key or shared secret in any log of the run
    (agent, proxy, local KMS), raw, base64 or hex."""
    assert len(stack.learned) >= 8, "the tests above ran first and recorded their secrets"
    logs = {p.name: p.read_bytes() for p in sorted(stack.dev.work_dir.glob("*.log"))}
    assert {"agent.log", "proxy.log", "kms.log"} <= set(logs)
    needles: dict[str, bytes] = {}
    for number, value in enumerate([PLAINTEXT, MESSAGE, PLANTED, *stack.learned]):
        needles[f"secret {number}"] = value
        needles[f"secret {number} (base64)"] = base64.b64encode(value)
        needles[f"secret {number} (hex)"] = value.hex().encode()
    assert find_leaks(needles, logs) == []
    events = log_events(stack.dev.log_path("agent"))
    calls = {e["operation"] for e in events if e["event"] == "kms_call"}
    assert set(PASS_THROUGH_OPERATIONS) <= calls  # every operation was logged, by name only

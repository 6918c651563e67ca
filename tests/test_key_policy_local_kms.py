"""The policy `enclave-agent key-policy` prints, enforced by the local KMS stand-in.

The simulated NSM's PCRs stand in for nitro-cli's measurements: written in
nitro-cli's output shape, turned into a policy by the real command, given to
CreateKey through boto3. Then Decrypt with a Recipient document from a simulated
enclave with those PCRs succeeds, and is denied (AccessDeniedException) for an
enclave whose PCR0 or PCR1 differs and for a call without any attestation. The
docs/deploy.md's upgrade flow (old image, old + new, new only) runs through PutKeyPolicy.

The role half of the policy is enforced too: credentials minted for the named role
decrypt, credentials of another role of the same account do not (the account's
default credentials stand for every principal of it, the named role included).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from devtools.devstack import local_kms_client, local_operator_arn, minted_kms_client
from enclave_agent.runtime.recipient import RecipientKey
from enclave_agent.simulated.nsm import SimulatedNsm
from tests.conftest import REPO_ROOT

ROLE_NAME = "enclave-parent"


def _printed_policy(
    tmp_path: Path,
    account_id: str,
    *enclaves: SimulatedNsm,
    encrypt: bool = True,
    extra: tuple[str, ...] = (),
) -> str:
    arguments = ["--region", "us-east-1", *extra]
    if encrypt:
        arguments += ["--encrypt-principal", local_operator_arn(account_id)]
    for number, enclave in enumerate(enclaves):
        measurements = {
            "Measurements": {
                "HashAlgorithm": "Sha384 { ... }",
                **{f"PCR{i}": enclave.pcrs[i].hex() for i in (0, 1, 2)},
            }
        }
        path = tmp_path / f"measurements-{number}.json"
        path.write_text(json.dumps(measurements, indent=2))
        arguments += ["--measurements", str(path)]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "enclave_agent.cli",
            "key-policy",
            *arguments,
            "--role-arn",
            f"arn:aws:iam::{account_id}:role/{ROLE_NAME}",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout


def _decrypt_in(enclave: SimulatedNsm, client: Any, blob: bytes) -> bytes:
    recipient = RecipientKey.generate()
    document = enclave.attestation(public_key=recipient.public_key_der)
    answer = client.decrypt(
        CiphertextBlob=blob,
        EncryptionContext={"app": "enclave-kms-example"},
        Recipient={"AttestationDocument": document, "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256"},
    )
    assert answer.get("Plaintext") is None, "with a Recipient, KMS answers no Plaintext"
    return recipient.open(answer["CiphertextForRecipient"])


def _other_pcr(label: str) -> bytes:
    return hashlib.sha384(label.encode()).digest()


def test_printed_policy_admits_the_measured_enclave_only(
    tmp_path: Path, enclave_ca: Path, local_kms: dict[str, Any]
) -> None:
    enclave = SimulatedNsm.load(enclave_ca)
    client = local_kms_client(local_kms)
    policy = _printed_policy(tmp_path, local_kms["account_id"], enclave)
    key_id = client.create_key(Policy=policy, Description="key-policy test")["KeyMetadata"]["KeyId"]

    secret = os.urandom(32)
    # The operator may encrypt (--encrypt-principal) ...
    blob = client.encrypt(
        KeyId=key_id, Plaintext=secret, EncryptionContext={"app": "enclave-kms-example"}
    )["CiphertextBlob"]

    # ... the enclave with the measured PCRs may decrypt ...
    assert _decrypt_in(enclave, client, blob) == secret

    # ... an enclave running another image (PCR0), or the same image with another
    # kernel/boot ramdisk (PCR1), may not ...
    for index in (0, 1):
        pcrs = {**enclave.pcrs, index: _other_pcr(f"another image, PCR{index}")}
        other = SimulatedNsm.load(enclave_ca, pcrs=pcrs)
        with pytest.raises(ClientError) as denied:
            _decrypt_in(other, client, blob)
        assert denied.value.response["Error"]["Code"] == "AccessDeniedException"

    # ... and the same credentials without an attestation document may not either.
    with pytest.raises(ClientError) as no_attestation:
        client.decrypt(CiphertextBlob=blob, EncryptionContext={"app": "enclave-kms-example"})
    assert no_attestation.value.response["Error"]["Code"] == "AccessDeniedException"

    # Only the named role's credentials, not another role's of the same account.
    def as_role(name: str) -> Any:
        account = local_kms["account_id"]
        return minted_kms_client(local_kms, principal=f"arn:aws:iam::{account}:role/{name}")

    assert _decrypt_in(enclave, as_role(ROLE_NAME), blob) == secret
    with pytest.raises(ClientError) as other_role:
        _decrypt_in(enclave, as_role("another-role"), blob)
    assert other_role.value.response["Error"]["Code"] == "AccessDeniedException"
    assert "role/another-role" in other_role.value.response["Error"]["Message"]

    # The key keeps the policy it was given.
    stored = client.get_key_policy(KeyId=key_id, PolicyName="default")["Policy"]
    assert json.loads(stored) == json.loads(policy)


def test_upgrade_flow_of_the_guide(
    tmp_path: Path, enclave_ca: Path, local_kms: dict[str, Any]
) -> None:
    """docs/deploy.md, 'Upgrading': old image only -> old and new -> new only, with PutKeyPolicy."""
    old = SimulatedNsm.load(enclave_ca)
    new = SimulatedNsm.load(enclave_ca, pcrs={**old.pcrs, 0: _other_pcr("new image")})
    third = SimulatedNsm.load(enclave_ca, pcrs={**old.pcrs, 0: _other_pcr("third image")})
    client = local_kms_client(local_kms)
    account = local_kms["account_id"]
    key_id = client.create_key(Policy=_printed_policy(tmp_path, account, old))["KeyMetadata"][
        "KeyId"
    ]
    blob = client.encrypt(
        KeyId=key_id, Plaintext=b"rolling", EncryptionContext={"app": "enclave-kms-example"}
    )["CiphertextBlob"]

    def admitted(enclave: SimulatedNsm) -> bool:
        try:
            return _decrypt_in(enclave, client, blob) == b"rolling"
        except ClientError as error:
            assert error.response["Error"]["Code"] == "AccessDeniedException"
            return False

    assert [admitted(e) for e in (old, new, third)] == [True, False, False]
    both = _printed_policy(tmp_path, account, old, new)
    client.put_key_policy(KeyId=key_id, PolicyName="default", Policy=both)
    assert [admitted(e) for e in (old, new, third)] == [True, True, False]
    client.put_key_policy(
        KeyId=key_id, PolicyName="default", Policy=_printed_policy(tmp_path, account, new)
    )
    assert [admitted(e) for e in (old, new, third)] == [False, True, False]


def test_without_an_encrypt_principal_nobody_may_encrypt(
    tmp_path: Path, enclave_ca: Path, local_kms: dict[str, Any]
) -> None:
    """The account root no longer grants kms:Encrypt: the key refuses it unless the
    policy names an operator (so the parent's role cannot plant a valid ciphertext)."""
    enclave = SimulatedNsm.load(enclave_ca)
    client = local_kms_client(local_kms)
    policy = _printed_policy(tmp_path, local_kms["account_id"], enclave, encrypt=False)
    key_id = client.create_key(Policy=policy)["KeyMetadata"]["KeyId"]
    with pytest.raises(ClientError) as denied:
        client.encrypt(KeyId=key_id, Plaintext=b"planted value")
    assert denied.value.response["Error"]["Code"] == "AccessDeniedException"
    assert "kms:Encrypt" in denied.value.response["Error"]["Message"]


def test_pass_through_grants_are_the_roles_without_attestation(
    tmp_path: Path, enclave_ca: Path, local_kms: dict[str, Any]
) -> None:
    """--pass-through Sign Verify GetPublicKey: the role signs with no attestation
    document (so the parent could too, which is why it is asked for by name); another
    role may not; without the grant, the enclave statement's condition, which needs a
    Recipient, denies the role's Sign."""
    enclave = SimulatedNsm.load(enclave_ca)
    account = local_kms["account_id"]
    client = local_kms_client(local_kms)
    role = minted_kms_client(local_kms, principal=f"arn:aws:iam::{account}:role/{ROLE_NAME}")
    other = minted_kms_client(local_kms, principal=f"arn:aws:iam::{account}:role/another-role")
    keys = {}
    for name, extra in (
        ("granted", ("--pass-through", "Sign", "Verify", "GetPublicKey")),
        ("not granted", ()),
    ):
        policy = _printed_policy(tmp_path, account, enclave, extra=extra)
        keys[name] = client.create_key(
            Policy=policy, KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY"
        )["KeyMetadata"]["KeyId"]
    message = {"Message": b"signed by the role", "SigningAlgorithm": "ECDSA_SHA_256"}
    signature = role.sign(KeyId=keys["granted"], **message)["Signature"]
    assert role.verify(KeyId=keys["granted"], Signature=signature, **message)["SignatureValid"]
    assert role.get_public_key(KeyId=keys["granted"])["KeyUsage"] == "SIGN_VERIFY"
    for caller, key in ((other, keys["granted"]), (role, keys["not granted"])):
        with pytest.raises(ClientError) as denied:
            caller.sign(KeyId=key, **message)
        assert denied.value.response["Error"]["Code"] == "AccessDeniedException"

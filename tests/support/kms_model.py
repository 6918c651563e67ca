"""botocore's KMS service model and requests shaped by the agent's operations table
(for the tests of kms_operations, kms_protocol and the pass-through end to end).

botocore is a test and development dependency only: the agent's runtime carries its
own table (enclave_agent/runtime/kms_operations.py), checked against this model.
"""

from __future__ import annotations

import base64
import functools
from typing import Any

import botocore.session

from enclave_agent.runtime.kms_operations import OPERATION_TABLE

KEY_ARN = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
B64 = base64.b64encode(b"x" * 40).decode()


@functools.cache
def service_model() -> Any:
    return botocore.session.get_session().get_service_model("kms")


def botocore_operation(name: str) -> Any:
    """botocore's model of one KMS operation."""
    return service_model().operation_model(name)


def sample_request(operation: str, key_id: str = KEY_ARN) -> dict[str, Any]:
    """A valid request for every served operation, naming ``key_id`` in each of its
    key members."""
    keys = {name: key_id for name in OPERATION_TABLE[operation].key_members}
    return {
        "Decrypt": {"CiphertextBlob": B64},
        "GenerateDataKey": {"KeySpec": "AES_256"},
        "GenerateRandom": {"NumberOfBytes": 16},
        "GenerateDataKeyPair": {"KeyPairSpec": "RSA_2048"},
        "DeriveSharedSecret": {"KeyAgreementAlgorithm": "ECDH", "PublicKey": B64},
        "Encrypt": {"Plaintext": B64, "EncryptionContext": {"app": "demo"}},
        "ReEncrypt": {"CiphertextBlob": B64},
        "GenerateDataKeyWithoutPlaintext": {"NumberOfBytes": 32},
        "GenerateDataKeyPairWithoutPlaintext": {"KeyPairSpec": "ECC_NIST_P256"},
        "DescribeKey": {},
        "GetPublicKey": {},
        "Sign": {"Message": B64, "SigningAlgorithm": "ECDSA_SHA_256"},
        "Verify": {"Message": B64, "Signature": B64, "SigningAlgorithm": "ECDSA_SHA_256"},
        "GenerateMac": {"Message": B64, "MacAlgorithm": "HMAC_SHA_256"},
        "VerifyMac": {"Message": B64, "Mac": B64, "MacAlgorithm": "HMAC_SHA_256"},
        "ListAliases": {"Limit": 10},
        "ListKeys": {"Limit": 10, "Marker": "next"},
    }[operation] | keys


def answer_from(operation: str, key_id: object) -> dict[str, Any]:
    """A success answer naming ``key_id`` wherever the operation's answer names a key
    (nowhere when None)."""
    body: dict[str, Any] = {}
    if OPERATION_TABLE[operation].recipient:
        body["CiphertextForRecipient"] = base64.b64encode(b"envelope").decode()
    for path in OPERATION_TABLE[operation].answer_keys:
        if key_id is not None:
            *outer, last = path
            place = body
            for name in outer:
                place = place.setdefault(name, {})
            place[last] = key_id
    return body

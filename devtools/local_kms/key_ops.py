"""The key operations the stand-in does itself, with the key material moto keeps.

Why: moto lacks ``DeriveSharedSecret``, and does ``GetPublicKey``, ``Sign``,
``Verify``, ``GenerateMac`` and ``VerifyMac`` differently from KMS: it signs and MACs
the base64 text of ``Message`` rather than its bytes (so no signature it makes
verifies with the key's public key); it answers ``GetPublicKey``'s and the MAC
operations' ``KeyId`` as a bare key id or as the caller named it, where KMS answers
the key ARN; a failed ``Verify`` is ``SignatureValid: false`` instead of
``KMSInvalidSignatureException``; ``GetPublicKey`` of a symmetric key answers a
made-up RSA key. Here each is done as the KMS API reference describes it
(https://docs.aws.amazon.com/kms/latest/APIReference/API_<Operation>.html, and
"Cryptographic details", AWS KMS): an app that checks a signature offline with
``GetPublicKey``'s key, or derives the same secret on the peer's side, gets what
AWS would give it.

Pure, no I/O: each function takes the key's material and the checked request body
and returns the answer, or raises ``KeyOpError`` in KMS's vocabulary. Policy and key
lookup happened before (``service.LocalKms``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.serialization import load_der_public_key

from enclave_common.errors import ShownError

# Signing algorithm → (hash, RSA padding kind or None for ECDSA); the hash named at
# the end of each name (KMS API reference, Sign: MessageType).
_SIGNING: dict[str, tuple[type[hashes.HashAlgorithm], str | None]] = {
    "RSASSA_PSS_SHA_256": (hashes.SHA256, "pss"),
    "RSASSA_PSS_SHA_384": (hashes.SHA384, "pss"),
    "RSASSA_PSS_SHA_512": (hashes.SHA512, "pss"),
    "RSASSA_PKCS1_V1_5_SHA_256": (hashes.SHA256, "pkcs1"),
    "RSASSA_PKCS1_V1_5_SHA_384": (hashes.SHA384, "pkcs1"),
    "RSASSA_PKCS1_V1_5_SHA_512": (hashes.SHA512, "pkcs1"),
    "ECDSA_SHA_256": (hashes.SHA256, None),
    "ECDSA_SHA_384": (hashes.SHA384, None),
    "ECDSA_SHA_512": (hashes.SHA512, None),
}
# Which ECDSA algorithm each ECC key spec signs with (KMS developer guide,
# "Asymmetric key specs": ECC_NIST_P256 and ECC_SECG_P256K1 → ECDSA_SHA_256, ...).
_ECDSA_FOR_SPEC = {
    "ECC_NIST_P256": "ECDSA_SHA_256",
    "ECC_SECG_P256K1": "ECDSA_SHA_256",
    "ECC_NIST_P384": "ECDSA_SHA_384",
    "ECC_NIST_P521": "ECDSA_SHA_512",
}
# Key agreement: NIST curves only (SM2 is for China Regions; moto has none).
KEY_AGREEMENT_SPECS = frozenset({"ECC_NIST_P256", "ECC_NIST_P384", "ECC_NIST_P521"})
# An HMAC key spec computes only its own algorithm (HMAC_256 → HMAC_SHA_256, ...).
_MAC_FOR_SPEC = {
    "HMAC_224": ("HMAC_SHA_224", hashlib.sha224),
    "HMAC_256": ("HMAC_SHA_256", hashlib.sha256),
    "HMAC_384": ("HMAC_SHA_384", hashlib.sha384),
    "HMAC_512": ("HMAC_SHA_512", hashlib.sha512),
}


class KeyOpError(ShownError):
    """KMS's refusal of the operation (status 400)."""


@dataclass(frozen=True, repr=False)
class KeyMaterial:
    """What moto keeps of one key that these operations need."""

    arn: str
    usage: str  # KeyUsage: ENCRYPT_DECRYPT, SIGN_VERIFY, GENERATE_VERIFY_MAC, KEY_AGREEMENT
    spec: str  # KeySpec
    private_key: Any  # cryptography's RSA or EC private key (moto makes one for every key)
    secret: bytes  # the symmetric key material (HMAC keys)
    origin: str = "AWS_KMS"


def _usage(material: KeyMaterial, usage: str, operation: str) -> None:
    if material.usage != usage:
        raise KeyOpError(
            "InvalidKeyUsageException",
            f"{operation} needs a key whose KeyUsage is {usage}; {material.arn} is "
            f"{material.usage}",
        )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _signing(material: KeyMaterial, body: dict[str, Any], operation: str) -> tuple[Any, Any]:
    """(padding or ECDSA algorithm, hash or Prehashed) for Sign/Verify on this key."""
    _usage(material, "SIGN_VERIFY", operation)
    algorithm = body["SigningAlgorithm"]
    hash_type, kind = _SIGNING.get(algorithm, (None, None))
    rsa_key = isinstance(material.private_key, rsa.RSAPrivateKey)
    fits = hash_type is not None and (
        (rsa_key and kind is not None) or _ECDSA_FOR_SPEC.get(material.spec) == algorithm
    )
    if not fits or hash_type is None:
        raise KeyOpError(
            "InvalidKeyUsageException",
            f"the signing algorithm {algorithm} is not one of the algorithms {material.arn} "
            f"({material.spec}) supports",
        )
    digest = hash_type()
    message = base64.b64decode(body["Message"])
    message_type = body.get("MessageType", "RAW")
    if message_type not in ("RAW", "DIGEST"):  # EXTERNAL_MU is for ML-DSA keys only
        raise KeyOpError(
            "ValidationException", f"MessageType must be RAW or DIGEST for {algorithm}"
        )
    if message_type == "DIGEST" and len(message) != digest.digest_size:
        raise KeyOpError(
            "ValidationException",
            f"a DIGEST message for {algorithm} is {digest.digest_size} bytes, got {len(message)}",
        )
    hashing = utils.Prehashed(digest) if message_type == "DIGEST" else digest
    if kind == "pss":
        # KMS's PSS salt is as long as the digest ("Cryptographic details", RSASSA-PSS).
        scheme: Any = padding.PSS(mgf=padding.MGF1(hash_type()), salt_length=digest.digest_size)
    elif kind == "pkcs1":
        scheme = padding.PKCS1v15()
    else:
        scheme = ec.ECDSA(hashing)
    return scheme, hashing


def sign(material: KeyMaterial, body: dict[str, Any]) -> dict[str, Any]:
    scheme, hashing = _signing(material, body, "Sign")
    message = base64.b64decode(body["Message"])
    key = material.private_key
    if isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(message, scheme, hashing)
    else:  # DER-encoded ECDSA signature (ANS X9.62), as KMS answers
        signature = key.sign(message, scheme)
    return {
        "KeyId": material.arn,
        "Signature": _b64(signature),
        "SigningAlgorithm": body["SigningAlgorithm"],
    }


def verify(material: KeyMaterial, body: dict[str, Any]) -> dict[str, Any]:
    scheme, hashing = _signing(material, body, "Verify")
    message = base64.b64decode(body["Message"])
    signature = base64.b64decode(body["Signature"])
    public = material.private_key.public_key()
    try:
        if isinstance(public, rsa.RSAPublicKey):
            public.verify(signature, message, scheme, hashing)
        else:
            public.verify(signature, message, scheme)
    except InvalidSignature:
        # KMS API reference, Verify: a signature that does not verify fails the call.
        raise KeyOpError("KMSInvalidSignatureException", "") from None
    return {
        "KeyId": material.arn,
        "SignatureValid": True,
        "SigningAlgorithm": body["SigningAlgorithm"],
    }


def _mac(material: KeyMaterial, body: dict[str, Any], operation: str) -> bytes:
    _usage(material, "GENERATE_VERIFY_MAC", operation)
    algorithm, digest = _MAC_FOR_SPEC.get(material.spec, ("", hashlib.sha256))
    if body["MacAlgorithm"] != algorithm:
        raise KeyOpError(
            "InvalidKeyUsageException",
            f"{material.arn} ({material.spec}) computes {algorithm or 'no MAC'} only",
        )
    return hmac.new(material.secret, base64.b64decode(body["Message"]), digest).digest()


def generate_mac(material: KeyMaterial, body: dict[str, Any]) -> dict[str, Any]:
    mac = _mac(material, body, "GenerateMac")
    return {"Mac": _b64(mac), "MacAlgorithm": body["MacAlgorithm"], "KeyId": material.arn}


def verify_mac(material: KeyMaterial, body: dict[str, Any]) -> dict[str, Any]:
    expected = _mac(material, body, "VerifyMac")
    if not hmac.compare_digest(expected, base64.b64decode(body["Mac"])):
        raise KeyOpError("KMSInvalidMacException", "")
    return {"KeyId": material.arn, "MacValid": True, "MacAlgorithm": body["MacAlgorithm"]}


def derive_shared_secret(material: KeyMaterial, body: dict[str, Any]) -> dict[str, Any]:
    """ECDH between the KMS key pair's private key and the peer's public key (a DER
    SubjectPublicKeyInfo on the same curve): the raw shared secret, the x-coordinate
    of the shared point (NIST curves have cofactor 1, so cofactor ECDH is plain ECDH)."""
    _usage(material, "KEY_AGREEMENT", "DeriveSharedSecret")
    if material.spec not in KEY_AGREEMENT_SPECS:
        raise KeyOpError(
            "InvalidKeyUsageException",
            f"{material.arn} ({material.spec}) is not a key agreement key",
        )
    if body["KeyAgreementAlgorithm"] != "ECDH":
        raise KeyOpError("ValidationException", "KeyAgreementAlgorithm must be ECDH")
    try:
        peer = load_der_public_key(base64.b64decode(body["PublicKey"]))
    except (ValueError, UnsupportedAlgorithm):
        raise KeyOpError(
            "ValidationException", "PublicKey is not a DER-encoded SubjectPublicKeyInfo"
        ) from None
    own = material.private_key
    if not isinstance(peer, ec.EllipticCurvePublicKey) or peer.curve.name != own.curve.name:
        raise KeyOpError(
            "ValidationException",
            f"PublicKey must be an elliptic curve key on the curve of {material.spec}",
        )
    shared = own.exchange(ec.ECDH(), peer)
    return {
        "KeyId": material.arn,
        "SharedSecret": _b64(shared),
        "KeyAgreementAlgorithm": "ECDH",
        "KeyOrigin": material.origin,
    }


def get_public_key(material: KeyMaterial, body: dict[str, Any]) -> dict[str, Any]:
    """The public half of an asymmetric key, DER SubjectPublicKeyInfo, with what the
    key may do (moto answers a bare key id, and a "public key" for symmetric keys too)."""
    if not material.spec.startswith(("RSA_", "ECC_")):
        raise KeyOpError(
            "UnsupportedOperationException",
            f"{material.arn} is not an asymmetric KMS key ({material.spec})",
        )
    public = material.private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    answer: dict[str, Any] = {
        "KeyId": material.arn,
        "PublicKey": _b64(public),
        "CustomerMasterKeySpec": material.spec,
        "KeySpec": material.spec,
        "KeyUsage": material.usage,
    }
    if material.usage == "SIGN_VERIFY":
        rsa_key = isinstance(material.private_key, rsa.RSAPrivateKey)
        answer["SigningAlgorithms"] = (
            [name for name, (_, kind) in _SIGNING.items() if kind is not None]
            if rsa_key
            else [_ECDSA_FOR_SPEC[material.spec]]
        )
    elif material.usage == "KEY_AGREEMENT":
        answer["KeyAgreementAlgorithms"] = ["ECDH"]
    else:
        answer["EncryptionAlgorithms"] = ["RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256"]
    return answer


OPERATIONS = {
    "GetPublicKey": get_public_key,
    "Sign": sign,
    "Verify": verify,
    "GenerateMac": generate_mac,
    "VerifyMac": verify_mac,
    "DeriveSharedSecret": derive_shared_secret,
}

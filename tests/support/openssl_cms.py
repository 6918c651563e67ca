"""The OpenSSL CLI as an independent CMS consumer, and the certificate it needs.

OpenSSL picks a CMS recipient by a certificate: these are throwaway self-signed ones
whose SubjectKeyIdentifier is SHA-256 of the key's SubjectPublicKeyInfo, as KMS names
the recipient.
"""

from __future__ import annotations

import datetime
import hashlib
import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID


def spki(key: rsa.RSAPrivateKey) -> bytes:
    """The DER SubjectPublicKeyInfo of ``key``'s public half."""
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def kms_recipient_certificate(key: rsa.RSAPrivateKey) -> x509.Certificate:
    """A throwaway certificate whose SubjectKeyIdentifier is SHA-256 of the SPKI, as KMS uses."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "enclave recipient")])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectKeyIdentifier(hashlib.sha256(spki(key)).digest()), False)
        .sign(key, hashes.SHA256())
    )


def openssl_decrypt(tmp_path: Path, envelope: bytes, key: rsa.RSAPrivateKey) -> bytes:
    (tmp_path / "env.der").write_bytes(envelope)
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "cert.pem").write_bytes(
        kms_recipient_certificate(key).public_bytes(serialization.Encoding.PEM)
    )
    # -recip makes openssl pick the recipient by identifier and fail when none matches,
    # and -debug_decrypt turns off the random-key fallback (without them openssl may
    # "decrypt" to garbage without an error).
    result = subprocess.run(
        [
            "openssl", "cms", "-decrypt", "-inform", "DER", "-in", str(tmp_path / "env.der"),
            "-inkey", str(tmp_path / "key.pem"), "-recip", str(tmp_path / "cert.pem"),
            "-binary", "-debug_decrypt",
        ],
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(result.stderr.decode(errors="replace"))
    return result.stdout

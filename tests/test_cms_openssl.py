"""The OpenSSL CLI as an independent producer of envelopes for our key."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from enclave_agent.runtime.cms import CmsError, WrongRecipientError
from enclave_agent.runtime.recipient import RecipientKey
from tests.support.openssl_cms import kms_recipient_certificate

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not found")


@pytest.fixture(scope="module")
def recipient() -> RecipientKey:
    return RecipientKey.generate()


def _certificate(key: RecipientKey, directory: Path) -> Path:
    path = directory / "recipient.pem"
    certificate = kms_recipient_certificate(key._private_key)
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return path


KMS_KEY_OPTIONS = (
    "-keyopt", "rsa_padding_mode:oaep",
    "-keyopt", "rsa_oaep_md:sha256",
    "-keyopt", "rsa_mgf1_md:sha256",
)  # fmt: skip


def _openssl_encrypt(
    certificate: Path,
    plaintext: bytes,
    tmp_path: Path,
    *,
    stream: bool,
    cipher: str = "-aes-256-cbc",
    key_options: tuple[str, ...] = KMS_KEY_OPTIONS,
) -> bytes:
    """``openssl cms -encrypt`` for ``certificate``; by default in KMS's shape."""
    source = tmp_path / "plaintext.bin"
    source.write_bytes(plaintext)
    command = [
        "openssl", "cms", "-encrypt", "-binary", cipher, "-keyid",
        "-recip", str(certificate), *key_options,
        "-outform", "DER", "-in", str(source),
    ]  # fmt: skip
    if stream:
        command.insert(3, "-stream")
    result = subprocess.run(command, capture_output=True, timeout=60, check=True)
    return result.stdout


@pytest.mark.parametrize("stream", [False, True], ids=["definite", "streamed"])
@pytest.mark.parametrize("size", [1, 15, 16, 32, 5000, 12345])
def test_openssl_envelopes_decrypt_to_the_input(
    recipient: RecipientKey, tmp_path: Path, stream: bool, size: int
) -> None:
    plaintext = os.urandom(size)
    envelope = _openssl_encrypt(
        _certificate(recipient, tmp_path), plaintext, tmp_path, stream=stream
    )
    if stream:
        assert envelope[1] == 0x80  # indefinite length, the shape KMS sends
    # The identifier OpenSSL copied from the certificate is the one KMS would use.
    assert hashlib.sha256(recipient.public_key_der).digest() in envelope
    assert recipient.open(envelope) == plaintext
    assert recipient.open(envelope + bytes(7)) == plaintext  # KMS-style zero padding


def test_openssl_envelope_for_another_key_is_refused(
    recipient: RecipientKey, tmp_path: Path
) -> None:
    other = RecipientKey.generate()
    envelope = _openssl_encrypt(_certificate(other, tmp_path), b"secret", tmp_path, stream=True)
    with pytest.raises(WrongRecipientError):
        recipient.open(envelope)


@pytest.mark.parametrize(
    ("cipher", "key_options", "reason"),
    [
        ("-aes-256-cbc", (), "RSAES-OAEP"),  # PKCS#1 v1.5 key transport
        ("-aes-128-cbc", KMS_KEY_OPTIONS, "AES-256-CBC"),
        ("-aes-256-cbc", ("-keyopt", "rsa_padding_mode:oaep"), "sha1"),  # OAEP with SHA-1
    ],
    ids=["pkcs1-padding", "aes128", "sha1-oaep"],
)
def test_openssl_envelope_not_in_kms_shape_is_refused(
    recipient: RecipientKey,
    tmp_path: Path,
    cipher: str,
    key_options: tuple[str, ...],
    reason: str,
) -> None:
    envelope = _openssl_encrypt(
        _certificate(recipient, tmp_path),
        b"secret",
        tmp_path,
        stream=False,
        cipher=cipher,
        key_options=key_options,
    )
    with pytest.raises(CmsError, match=reason):
        recipient.open(envelope)

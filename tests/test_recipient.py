"""The in-memory recipient keypair."""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from enclave_agent.runtime.recipient import RecipientKey


def test_generate_is_rsa_2048_with_standard_exponent() -> None:
    key = RecipientKey.generate()
    public = serialization.load_der_public_key(key.public_key_der)
    assert isinstance(public, rsa.RSAPublicKey)
    assert public.key_size == 2048
    assert public.public_numbers().e == 65537


def test_key_identifier_is_sha256_of_spki() -> None:
    key = RecipientKey.generate()
    assert key.key_identifier == hashlib.sha256(key.public_key_der).digest()


def test_each_generation_is_fresh() -> None:
    assert RecipientKey.generate().public_key_der != RecipientKey.generate().public_key_der


def test_repr_shows_no_key_material() -> None:
    key = RecipientKey.generate()
    text = repr(key) + str(key)
    assert key.key_identifier.hex() in text
    assert "PRIVATE" not in text
    assert key.public_key_der.hex() not in text


def test_no_plaintext_or_key_reaches_the_logs() -> None:
    """Drive the whole crypto core with marker values; none may appear in the log stream."""
    import io

    import structlog

    from enclave_agent.operator.attestation import verify_attestation
    from enclave_agent.runtime.cms import CmsError
    from enclave_agent.simulated.nsm import SimulatedNsm
    from enclave_common.logs import configure_logging
    from tests.support.cms_builder import build

    stream = io.StringIO()
    saved = structlog.get_config(), structlog.contextvars.get_contextvars()
    configure_logging("debug", stream=stream, process="test")
    try:
        marker = b"PLAINTEXT-MARKER-7f3a"
        key = RecipientKey.generate()
        nsm = SimulatedNsm.create()
        document = nsm.attestation(user_data=b"USERDATA-MARKER-19c2", public_key=key.public_key_der)
        verify_attestation(document, root=nsm.root_pem)
        assert key.open(build(key, marker)) == marker
        try:
            key.open(build(key, marker.ljust(32, b"!"), pad=False))
        except CmsError as exc:
            assert marker.decode() not in str(exc)
    finally:
        # Put back whatever logging set-up the rest of the suite runs with.
        structlog.configure(**saved[0])
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(**saved[1])
    logged = stream.getvalue()
    assert "NOT a real" in logged  # the stream did receive the simulated NSM's warning
    private_pem = key._private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    for secret in ("PLAINTEXT-MARKER-7f3a", "USERDATA-MARKER-19c2", private_pem.splitlines()[1]):
        assert secret not in logged

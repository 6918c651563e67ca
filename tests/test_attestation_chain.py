"""Chain rules, on documents signed here by hand-made chains that each break one rule."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from enclave_agent.operator.attestation import (
    CertificateChainError,
    MalformedDocumentError,
    SignatureError,
    verify_attestation,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
DAY = timedelta(days=1)
ES384 = cbor2.dumps({1: -35})  # the protected header: alg ES384


_KEY_USAGE_BITS = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
    "encipher_only",
    "decipher_only",
)


def _usage(*granted: str) -> x509.KeyUsage:
    """A keyUsage extension granting exactly the named bits (cryptography's names)."""
    assert set(granted) <= set(_KEY_USAGE_BITS), granted
    return x509.KeyUsage(**{bit: bit in granted for bit in _KEY_USAGE_BITS})


CA_USAGE = _usage("digital_signature", "key_cert_sign", "crl_sign")
LEAF_USAGE = _usage("digital_signature")


def _certificate(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer_name: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool | None,
    path_length: int | None = None,
    usage: x509.KeyUsage | None,
    not_before: datetime = NOW - DAY,
    not_after: datetime = NOW + DAY,
    unknown_critical: bool = False,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    if ca is not None:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=ca, path_length=path_length), critical=True
        )
    if usage is not None:
        builder = builder.add_extension(usage, critical=True)
    if unknown_critical:
        unknown = x509.UnrecognizedExtension(
            x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x05\x00"
        )
        builder = builder.add_extension(unknown, critical=True)
    return builder.sign(issuer_key, hashes.SHA384())


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _document(
    leaf_key: ec.EllipticCurvePrivateKey,
    leaf: x509.Certificate,
    cabundle: list[x509.Certificate],
) -> bytes:
    payload = cbor2.dumps(
        {
            "module_id": "i-test-enc0",
            "digest": "SHA384",
            "timestamp": int(NOW.timestamp() * 1000),
            "pcrs": {i: bytes(48) for i in range(16)},
            "certificate": leaf.public_bytes(serialization.Encoding.DER),
            "cabundle": [c.public_bytes(serialization.Encoding.DER) for c in cabundle],
            "public_key": None,
            "user_data": None,
            "nonce": None,
        }
    )
    protected = ES384
    signed = cbor2.dumps(["Signature1", protected, b"", payload])
    r, s = decode_dss_signature(leaf_key.sign(signed, ec.ECDSA(hashes.SHA384())))
    return cbor2.dumps([protected, {}, payload, r.to_bytes(48, "big") + s.to_bytes(48, "big")])


class Chain:
    """root → intermediate A (pathLen 1) → intermediate B (pathLen 0) → leaf, all valid."""

    def __init__(self, **overrides: dict[str, object]) -> None:
        self.root_key, self.a_key, self.b_key, self.leaf_key = _key(), _key(), _key(), _key()
        ca = {"ca": True, "usage": CA_USAGE}
        self.root = self._make("root", self.root_key, "root", self.root_key,
                               {**ca, "not_after": NOW + 3650 * DAY}, overrides)  # fmt: skip
        self.a = self._make("a", self.a_key, "root", self.root_key,
                            {**ca, "path_length": 1}, overrides)  # fmt: skip
        self.b = self._make("b", self.b_key, "a", self.a_key,
                            {**ca, "path_length": 0}, overrides)  # fmt: skip
        leaf = {"ca": False, "usage": LEAF_USAGE}
        self.leaf = self._make("leaf", self.leaf_key, "b", self.b_key, leaf, overrides)

    @staticmethod
    def _make(
        name: str,
        key: ec.EllipticCurvePrivateKey,
        issuer: str,
        issuer_key: ec.EllipticCurvePrivateKey,
        defaults: dict[str, object],
        overrides: dict[str, dict[str, object]],
    ) -> x509.Certificate:
        options = {**defaults, **overrides.get(name, {})}
        return _certificate(name, key, issuer, issuer_key, **options)  # type: ignore[arg-type]

    def document(self) -> bytes:
        return _document(self.leaf_key, self.leaf, [self.root, self.a, self.b])

    @property
    def root_pem(self) -> bytes:
        return self.root.public_bytes(serialization.Encoding.PEM)


def test_a_well_formed_chain_verifies() -> None:
    chain = Chain()
    parsed = verify_attestation(chain.document(), root=chain.root_pem, at=NOW)
    assert parsed.module_id == "i-test-enc0"
    assert parsed.public_key is None and parsed.nonce is None


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"b": {"ca": False, "path_length": None}}, "not a CA"),
        ({"b": {"ca": None, "path_length": None}}, "not a CA"),
        ({"a": {"path_length": 0}}, "path length"),
        ({"b": {"usage": LEAF_USAGE}}, "keyCertSign"),
        ({"b": {"usage": None}}, "keyCertSign"),
        ({"leaf": {"usage": _usage()}}, "digitalSignature"),
        ({"leaf": {"usage": None}}, "digitalSignature"),
        ({"leaf": {"ca": True}}, "leaf certificate is a CA"),
        ({"a": {"not_after": NOW - timedelta(seconds=1)}}, "not valid at"),
        ({"b": {"not_before": NOW + timedelta(seconds=1)}}, "not valid at"),
        ({"root": {"not_after": NOW - DAY / 2}}, "not valid at"),
        ({"leaf": {"unknown_critical": True}}, "critical extension"),
        ({"b": {"unknown_critical": True}}, "critical extension"),
    ],
)
def test_each_broken_rule_is_refused(overrides: dict[str, dict[str, object]], reason: str) -> None:
    chain = Chain(**overrides)
    with pytest.raises(CertificateChainError, match=reason):
        verify_attestation(chain.document(), root=chain.root_pem, at=NOW)


def test_cabundle_out_of_order_is_refused() -> None:
    chain = Chain()
    document = _document(chain.leaf_key, chain.leaf, [chain.root, chain.b, chain.a])
    with pytest.raises(CertificateChainError, match="not issued by"):
        verify_attestation(document, root=chain.root_pem, at=NOW)


def test_leaf_signed_by_another_key_is_refused() -> None:
    chain = Chain()
    forged = _certificate("leaf", chain.leaf_key, "b", _key(), ca=False, usage=LEAF_USAGE)
    document = _document(chain.leaf_key, forged, [chain.root, chain.a, chain.b])
    with pytest.raises(CertificateChainError, match="not issued by"):
        verify_attestation(document, root=chain.root_pem, at=NOW)


def test_document_signed_by_another_key_is_refused() -> None:
    chain = Chain()
    document = _document(_key(), chain.leaf, [chain.root, chain.a, chain.b])
    with pytest.raises(SignatureError):
        verify_attestation(document, root=chain.root_pem, at=NOW)


def test_leaf_with_a_p256_key_is_refused() -> None:
    chain = Chain()
    p256 = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf")]))
        .issuer_name(chain.b.subject)
        .public_key(p256.public_key())
        .serial_number(1)
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + DAY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(LEAF_USAGE, critical=True)
        .sign(chain.b_key, hashes.SHA384())
    )
    document = _document(chain.leaf_key, leaf, [chain.root, chain.a, chain.b])
    with pytest.raises(SignatureError, match="P-384"):
        verify_attestation(document, root=chain.root_pem, at=NOW)


def test_garbage_certificate_bytes_are_refused() -> None:
    chain = Chain()
    payload_fields = cbor2.loads(cbor2.loads(chain.document())[2])
    payload_fields["cabundle"][1] = b"\x30\x03\x02\x01\x00"
    protected = ES384
    document = cbor2.dumps([protected, {}, cbor2.dumps(payload_fields), bytes(96)])
    with pytest.raises(CertificateChainError, match="not valid DER"):
        verify_attestation(document, root=chain.root_pem, at=NOW)


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("digest", "SHA256", "digest"),
        ("timestamp", -1, "timestamp"),
        ("timestamp", 1.5, "timestamp"),
        ("pcrs", {0: b"short"}, "PCR0"),
        ("pcrs", {40: bytes(48)}, "PCR index"),
        ("pcrs", {}, "pcrs"),
        ("module_id", "", "module_id"),
        ("nonce", b"x" * 1025, "nonce"),
        ("user_data", "text", "user_data"),
        ("certificate", None, "certificate"),
        ("cabundle", [b""], "cabundle"),
    ],
)
def test_bad_fields_are_named(field: str, value: object, reason: str) -> None:
    chain = Chain()
    fields = cbor2.loads(cbor2.loads(chain.document())[2])
    fields[field] = value
    document = cbor2.dumps([ES384, {}, cbor2.dumps(fields), bytes(96)])
    with pytest.raises(MalformedDocumentError, match=reason):
        verify_attestation(document, root=chain.root_pem, at=NOW)


def test_wrong_cose_algorithm_is_refused() -> None:
    chain = Chain()
    message = cbor2.loads(chain.document())
    message[0] = cbor2.dumps({1: -7})  # ES256
    with pytest.raises(MalformedDocumentError, match="ES384"):
        verify_attestation(cbor2.dumps(message), root=chain.root_pem, at=NOW)


def test_indefinite_length_payload_map_is_accepted() -> None:
    chain = Chain()
    message = cbor2.loads(chain.document())
    fields = cbor2.loads(message[2])
    # Re-encode the payload map with indefinite length (0xBF ... 0xFF), then re-sign.
    body = b"".join(cbor2.dumps(k) + cbor2.dumps(v) for k, v in fields.items())
    payload = b"\xbf" + body + b"\xff"
    protected = message[0]
    signed = cbor2.dumps(["Signature1", protected, b"", payload])
    r, s = decode_dss_signature(chain.leaf_key.sign(signed, ec.ECDSA(hashes.SHA384())))
    document = cbor2.dumps([protected, {}, payload, r.to_bytes(48, "big") + s.to_bytes(48, "big")])
    assert verify_attestation(document, root=chain.root_pem, at=NOW).module_id == "i-test-enc0"


def _signed(chain: Chain, protected: bytes, payload: bytes) -> bytes:
    signed = cbor2.dumps(["Signature1", protected, b"", payload])
    r, s = decode_dss_signature(chain.leaf_key.sign(signed, ec.ECDSA(hashes.SHA384())))
    return cbor2.dumps([protected, {}, payload, r.to_bytes(48, "big") + s.to_bytes(48, "big")])


def _entries(fields: dict[object, object]) -> bytes:
    return b"".join(cbor2.dumps(k) + cbor2.dumps(v) for k, v in fields.items())


def _map_plus(fields: dict[object, object], entry: bytes) -> bytes:
    """The CBOR map of ``fields`` with one more raw ``entry`` (a key, then its value)."""
    return bytes([0xA0 + len(fields) + 1]) + _entries(fields) + entry


def _assert_refused_though_signed(
    chain: Chain, payload: bytes, reason: str, protected: bytes = ES384
) -> None:
    """A document the chain's leaf really signed is refused for its CBOR shape alone."""
    with pytest.raises(MalformedDocumentError, match=reason):
        verify_attestation(_signed(chain, protected, payload), root=chain.root_pem, at=NOW)


def test_repeated_payload_key_is_refused_even_when_signed() -> None:
    """cbor2 keeps the last of two "pcrs" entries; another reader would keep the first."""
    chain = Chain()
    fields = cbor2.loads(cbor2.loads(chain.document())[2])
    other_pcrs = {i: b"\x11" * 48 for i in range(16)}
    payload = _map_plus(fields, _entries({"pcrs": other_pcrs}))
    _assert_refused_though_signed(chain, payload, "repeats a map key")


def test_repeated_pcr_index_is_refused_even_when_signed() -> None:
    chain = Chain()
    fields = cbor2.loads(cbor2.loads(chain.document())[2])
    pcrs = b"\xa3" + _entries({0: bytes(48), 1: bytes(48)}) + _entries({0: b"\x22" * 48})
    del fields["pcrs"]
    _assert_refused_though_signed(
        chain, _map_plus(fields, cbor2.dumps("pcrs") + pcrs), "repeats a map key"
    )


def test_repeated_protected_header_key_is_refused_even_when_signed() -> None:
    chain = Chain()
    fields = cbor2.loads(cbor2.loads(chain.document())[2])
    protected = b"\xa2" + _entries({1: -7}) + _entries({1: -35})  # ES256, then ES384
    with pytest.raises(MalformedDocumentError, match="repeats a map key"):
        verify_attestation(_signed(chain, protected, cbor2.dumps(fields)), root=chain.root_pem)


def test_tag_inside_the_payload_is_refused_even_when_signed() -> None:
    chain = Chain()
    fields = cbor2.loads(cbor2.loads(chain.document())[2])
    fields["user_data"] = cbor2.CBORTag(24, cbor2.dumps(b"embedded"))
    _assert_refused_though_signed(chain, cbor2.dumps(fields), "tag")


def test_critical_protected_header_parameters_are_refused_even_when_signed() -> None:
    chain = Chain()
    fields = cbor2.loads(cbor2.loads(chain.document())[2])
    critical = cbor2.dumps({1: -35, 2: [99]})
    _assert_refused_though_signed(chain, cbor2.dumps(fields), "crit", protected=critical)


def test_bytes_after_the_cose_array_are_refused() -> None:
    chain = Chain()
    with pytest.raises(MalformedDocumentError, match="unexpected bytes after"):
        verify_attestation(chain.document() + b"\x00", root=chain.root_pem, at=NOW)


def test_signed_parts_with_every_cbor_shape_still_parse() -> None:
    """The key-count check walks every CBOR form (indefinite strings and arrays,
    floats, simple values) that a payload could carry in a field we ignore."""
    chain = Chain()
    fields = cbor2.loads(cbor2.loads(chain.document())[2])
    extra = (
        b"\x9f\x01\x39\x01\x00\xf9\x3c\x00\xfb" + bytes(8) + b"\xf5\xf6\xf7"  # [_ 1, -257, ...
        b"\x5f\x41\x00\xff\x7f\x61\x61\xff"  # (_ h'00'), (_ "a")
        b"\xa1\x61\x6b\x1b" + bytes(8) + b"\xff"  # {"k": 0 (8-byte)}]
    )
    document = _signed(chain, ES384, _map_plus(fields, cbor2.dumps("extra") + extra))
    assert verify_attestation(document, root=chain.root_pem, at=NOW).module_id == "i-test-enc0"

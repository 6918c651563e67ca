"""A simulated NSM for development and tests, without Nitro hardware.

It answers the device's own CBOR messages and signs attestation documents (ES384
COSE_Sign1) with a locally generated P-384 chain shaped like AWS's: root (30 years)
→ two intermediates (days) → a leaf made fresh per process (about 3 hours). Real
KMS refuses these documents; only a verifier that trusts the simulated root accepts
them. It says so loudly in the logs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from enclave_agent.runtime.nsm import MAX_PCR_INDEX, NsmClient, NsmError
from enclave_common.logs import get_logger

PCR_BYTES = 48
ROOT_LIFETIME = timedelta(days=365 * 30)
INTERMEDIATE_LIFETIME = timedelta(days=20)
LEAF_LIFETIME = timedelta(hours=3)
LEAF_RENEW_BEFORE = timedelta(minutes=30)
CLOCK_SKEW = timedelta(minutes=5)
RANDOM_BYTES = 256

ROOT_FILE = "root.pem"
INTERMEDIATES_FILE = "intermediates.pem"  # root side first
ISSUER_KEY_FILE = "issuer-key.pem"  # key of the last intermediate, which signs leaves

DEFAULT_SIMULATED_PCRS: dict[int, bytes] = {
    index: (
        hashlib.sha384(f"simulated-nsm-pcr{index}".encode()).digest()
        if index in (0, 1, 2)
        else bytes(PCR_BYTES)
    )
    for index in range(16)
}


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Simulated NSM (not AWS)"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _issue(
    *,
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    not_before: datetime,
    lifetime: timedelta,
    path_length: int | None,
    ca: bool,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + lifetime)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(_key_usage(cert_sign=ca), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA384())


def _check_pcrs(pcrs: Mapping[int, bytes] | None) -> dict[int, bytes]:
    values = dict(DEFAULT_SIMULATED_PCRS)
    for index, value in (pcrs or {}).items():
        if not isinstance(index, int) or not 0 <= index < 16:
            raise ValueError(f"simulated PCR index must be 0..15, got {index!r}")
        if not isinstance(value, bytes) or len(value) != PCR_BYTES:
            raise ValueError(f"simulated PCR{index} must be {PCR_BYTES} bytes")
        values[index] = value
    return values


class SimulatedNsm(NsmClient):
    """Implements the Nsm protocol in memory; see the module docstring."""

    def __init__(
        self,
        *,
        root: x509.Certificate,
        intermediates: Sequence[x509.Certificate],
        issuer_key: ec.EllipticCurvePrivateKey,
        pcrs: Mapping[int, bytes] | None = None,
        leaf_lifetime: timedelta = LEAF_LIFETIME,
    ) -> None:
        self.pcrs: dict[int, bytes] = _check_pcrs(pcrs)
        # A real NSM's leaf lives about 3 hours; tests shorten it to play a leaf that
        # has only minutes left (it is then re-issued for every document).
        self.leaf_lifetime = leaf_lifetime
        self.fail_with: str | None = None
        self.root_pem: bytes = root.public_bytes(serialization.Encoding.PEM)
        self._root = root
        self._intermediates = list(intermediates)
        self._issuer_key = issuer_key
        self._lock = threading.Lock()
        self.module_id = f"i-00000000simulated-enc{secrets.token_hex(8)}"
        self._leaf_key = ec.generate_private_key(ec.SECP384R1())
        self._leaf = self._issue_leaf()
        get_logger().warning(
            "simulated_nsm",
            message="using a SIMULATED NSM: this is NOT a real Nitro Secure Module; "
            "its attestation documents prove nothing and real AWS KMS rejects them",
            module_id=self.module_id,
        )

    # --- construction -------------------------------------------------------

    @classmethod
    def create(
        cls, pcrs: Mapping[int, bytes] | None = None, *, leaf_lifetime: timedelta = LEAF_LIFETIME
    ) -> SimulatedNsm:
        """A fresh in-memory CA: root → regional → zonal intermediate."""
        now = datetime.now(UTC) - CLOCK_SKEW
        root_key = ec.generate_private_key(ec.SECP384R1())
        root = _issue(
            subject=_name("simulated.nitro-enclaves"),
            public_key=root_key.public_key(),
            issuer=None,
            issuer_key=root_key,
            not_before=now,
            lifetime=ROOT_LIFETIME,
            path_length=None,
            ca=True,
        )
        chain = [root]
        issuer_key = root_key
        for depth, label in enumerate(("regional", "zonal")):
            key = ec.generate_private_key(ec.SECP384R1())
            chain.append(
                _issue(
                    subject=_name(f"{label}.simulated.nitro-enclaves"),
                    public_key=key.public_key(),
                    issuer=chain[-1],
                    issuer_key=issuer_key,
                    not_before=now,
                    lifetime=INTERMEDIATE_LIFETIME,
                    path_length=1 - depth,
                    ca=True,
                )
            )
            issuer_key = key
        return cls(
            root=root,
            intermediates=chain[1:],
            issuer_key=issuer_key,
            pcrs=pcrs,
            leaf_lifetime=leaf_lifetime,
        )

    @classmethod
    def load(cls, ca_dir: Path, pcrs: Mapping[int, bytes] | None = None) -> SimulatedNsm:
        """Issue documents under a CA saved by ``save_ca`` (e.g. by another process)."""
        ca_dir = Path(ca_dir)
        root = x509.load_pem_x509_certificate((ca_dir / ROOT_FILE).read_bytes())
        intermediates = x509.load_pem_x509_certificates((ca_dir / INTERMEDIATES_FILE).read_bytes())
        key = serialization.load_pem_private_key((ca_dir / ISSUER_KEY_FILE).read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{ca_dir / ISSUER_KEY_FILE} is not an EC private key")
        # Intermediates live 20 days, like AWS's: a CA directory kept longer than that
        # would issue documents every verifier refuses, so say so here instead.
        expiry = min(c.not_valid_after_utc for c in [root, *intermediates])
        if expiry - datetime.now(UTC) < LEAF_LIFETIME:
            raise ValueError(
                f"the simulated NSM CA in {ca_dir} expires at {expiry.isoformat()}; "
                "create a new one with `python -m enclave_agent.simulated.nsm init-ca DIR`"
            )
        return cls(root=root, intermediates=intermediates, issuer_key=key, pcrs=pcrs)

    def save_ca(self, ca_dir: Path) -> None:
        """Write root.pem, the intermediates and the issuing key (mode 0600) to ``ca_dir``."""
        ca_dir = Path(ca_dir)
        ca_dir.mkdir(parents=True, exist_ok=True)
        (ca_dir / ROOT_FILE).write_bytes(self.root_pem)
        (ca_dir / INTERMEDIATES_FILE).write_bytes(
            b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self._intermediates)
        )
        key_pem = self._issuer_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        key_path = ca_dir / ISSUER_KEY_FILE
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        # The mode given to open applies only to a new file: an older, wider one is narrowed.
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as key_file:
            key_file.write(key_pem)

    # --- the device's messages ----------------------------------------------

    def exchange(self, request: bytes) -> bytes:
        if self.fail_with is not None:
            raise NsmError(self.fail_with, "injected failure (simulated NSM)")
        return self.handle(request)

    def handle(self, request: bytes) -> bytes:
        """Answer one raw CBOR request the way the NSM does (errors as ``{"Error": ...}``)."""
        try:
            message = cbor2.loads(request)
        except Exception:  # noqa: BLE001 - any undecodable request is InvalidArgument
            return _error("InvalidArgument")
        if message == "GetRandom":
            return cbor2.dumps({"GetRandom": {"random": secrets.token_bytes(RANDOM_BYTES)}})
        if message == "DescribeNSM":
            return cbor2.dumps({"DescribeNSM": self._describe()})
        if not isinstance(message, dict) or len(message) != 1:
            return _error("InvalidOperation")
        ((name, body),) = message.items()
        if not isinstance(body, dict):
            return _error("InvalidArgument")
        if name == "DescribePCR":
            index = body.get("index")
            if isinstance(index, bool) or not isinstance(index, int):
                return _error("InvalidArgument")
            if not 0 <= index <= MAX_PCR_INDEX:
                return _error("InvalidIndex")
            value = self.pcrs.get(index, bytes(PCR_BYTES))
            return cbor2.dumps({"DescribePCR": {"lock": index < 16, "data": value}})
        if name == "Attestation":
            fields = {k: body.get(k) for k in ("user_data", "nonce", "public_key")}
            for field in fields.values():
                if field is not None and (not isinstance(field, bytes) or len(field) > 1024):
                    return _error(
                        "InputTooLarge" if isinstance(field, bytes) else "InvalidArgument"
                    )
            document = self._document(**fields)
            return cbor2.dumps({"Attestation": {"document": document}})
        return _error("InvalidOperation")

    def _describe(self) -> dict[str, Any]:
        return {
            "version_major": 1,
            "version_minor": 0,
            "version_patch": 0,
            "module_id": self.module_id,
            "max_pcrs": MAX_PCR_INDEX + 1,
            "locked_pcrs": list(range(16)),
            "digest": "SHA384",
        }

    def _issue_leaf(self) -> x509.Certificate:
        return _issue(
            subject=_name(f"{self.module_id}.simulated.nitro-enclaves"),
            public_key=self._leaf_key.public_key(),
            issuer=self._intermediates[-1] if self._intermediates else self._root,
            issuer_key=self._issuer_key,
            not_before=datetime.now(UTC) - CLOCK_SKEW,
            lifetime=self.leaf_lifetime,
            path_length=None,
            ca=False,
        )

    def _document(
        self, *, user_data: bytes | None, nonce: bytes | None, public_key: bytes | None
    ) -> bytes:
        with self._lock:
            # A long-running agent outlives a 3-hour leaf: re-issue it before it expires.
            if self._leaf.not_valid_after_utc - datetime.now(UTC) < LEAF_RENEW_BEFORE:
                self._leaf = self._issue_leaf()
            leaf = self._leaf
        payload = cbor2.dumps(
            {
                "module_id": self.module_id,
                "digest": "SHA384",
                "timestamp": time.time_ns() // 1_000_000,
                "pcrs": {index: self.pcrs.get(index, bytes(PCR_BYTES)) for index in range(16)},
                "certificate": leaf.public_bytes(serialization.Encoding.DER),
                "cabundle": [
                    c.public_bytes(serialization.Encoding.DER)
                    for c in [self._root, *self._intermediates]
                ],
                "public_key": public_key,
                "user_data": user_data,
                "nonce": nonce,
            }
        )
        protected = cbor2.dumps({1: -35})
        to_sign = cbor2.dumps(["Signature1", protected, b"", payload])
        r, s = decode_dss_signature(self._leaf_key.sign(to_sign, ec.ECDSA(hashes.SHA384())))
        signature = r.to_bytes(48, "big") + s.to_bytes(48, "big")
        return cbor2.dumps([protected, {}, payload, signature])


def _error(name: str) -> bytes:
    return cbor2.dumps({"Error": name})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m enclave_agent.simulated.nsm", description="Simulated NSM tooling."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    init_ca = commands.add_parser("init-ca", help="create a simulated NSM CA and save it to DIR")
    init_ca.add_argument("directory", type=Path, metavar="DIR")
    args = parser.parse_args(argv)
    nsm = SimulatedNsm.create()
    nsm.save_ca(args.directory)
    print(args.directory / ROOT_FILE)
    return 0


if __name__ == "__main__":
    sys.exit(main())

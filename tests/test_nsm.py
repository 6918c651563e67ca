"""The NSM client: ioctl packing through a kernel stand-in, messages, size limits."""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives import serialization

from enclave_agent.operator.attestation import parse_attestation, verify_attestation
from enclave_agent.runtime import nsm as nsm_module
from enclave_agent.runtime.nsm import (
    NSM_IOCTL_REQUEST,
    RESPONSE_BUFFER_BYTES,
    NsmDevice,
    NsmError,
    exchange_raw,
)
from enclave_agent.simulated.nsm import SimulatedNsm

IOVECS = struct.Struct("=QQQQ")


class FakeKernel:
    """Stands in for the NSM driver: reads the request through the iovec addresses and
    writes the answer into the response buffer, updating its length, as the kernel does."""

    def __init__(self, answer: Callable[[bytes], bytes]) -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self.calls = 0

    def __call__(self, fd: int, request: int, argument: bytearray) -> int:
        self.calls += 1
        assert request == NSM_IOCTL_REQUEST == 0xC0200A00
        assert isinstance(argument, bytearray) and len(argument) == 32
        req_addr, req_len, resp_addr, resp_cap = IOVECS.unpack(argument)
        assert resp_cap == RESPONSE_BUFFER_BYTES
        message = ctypes.string_at(req_addr, req_len)
        self.requests.append(message)
        response = self.answer(message)
        if len(response) > resp_cap:
            raise OSError(errno.ENOMEM, "response too large")
        ctypes.memmove(resp_addr, response, len(response))
        argument[:] = IOVECS.pack(req_addr, req_len, resp_addr, len(response))
        return 0


@pytest.fixture(scope="module")
def simulated() -> SimulatedNsm:
    return SimulatedNsm.create()


def _device(kernel: FakeKernel) -> NsmDevice:
    # Any real descriptor will do: the stand-in never touches it.
    fd = os.open(os.devnull, os.O_RDWR)
    return NsmDevice(fd, ioctl=kernel)


def test_attestation_through_the_ioctl_packing(simulated: SimulatedNsm) -> None:
    kernel = FakeKernel(simulated.handle)
    with _device(kernel) as device:
        document = device.attestation(public_key=b"k" * 1024, nonce=b"n" * 32, user_data=None)
    assert cbor2.loads(kernel.requests[0]) == {
        "Attestation": {"user_data": None, "nonce": b"n" * 32, "public_key": b"k" * 1024}
    }
    parsed = verify_attestation(document, root=simulated.root_pem)
    assert parsed.public_key == b"k" * 1024
    assert parsed.nonce == b"n" * 32
    assert parsed.user_data is None


def test_other_requests_through_the_ioctl(simulated: SimulatedNsm) -> None:
    kernel = FakeKernel(simulated.handle)
    with _device(kernel) as device:
        assert len(device.get_random()) == 256
        assert device.describe_pcr(0) == (True, simulated.pcrs[0])
        description = device.describe_nsm()
    assert description["digest"] == "SHA384"
    assert description["module_id"] == simulated.module_id
    assert [cbor2.loads(r) for r in kernel.requests] == [
        "GetRandom",
        {"DescribePCR": {"index": 0}},
        "DescribeNSM",
    ]


@pytest.mark.parametrize("error", sorted(nsm_module.NSM_ERROR_NAMES))
def test_nsm_error_answers_carry_the_name(error: str) -> None:
    kernel = FakeKernel(lambda _: cbor2.dumps({"Error": error}))
    with _device(kernel) as device, pytest.raises(NsmError) as caught:
        device.attestation()
    assert caught.value.error_name == error


def test_field_over_1024_bytes_is_refused_before_the_ioctl() -> None:
    kernel = FakeKernel(lambda _: b"")
    with _device(kernel) as device:
        for field in ("user_data", "nonce", "public_key"):
            with pytest.raises(NsmError, match="1024") as caught:
                device.attestation(**{field: b"x" * 1025})
            assert caught.value.error_name == "FieldTooLarge"
    assert kernel.calls == 0


def test_request_over_4096_bytes_is_refused_before_the_ioctl() -> None:
    kernel = FakeKernel(lambda _: b"")
    with pytest.raises(NsmError, match="4096") as caught:
        exchange_raw(0, b"x" * 4097, kernel)
    assert caught.value.error_name == "RequestTooLarge"
    assert kernel.calls == 0


def test_three_full_fields_fit_in_one_request(simulated: SimulatedNsm) -> None:
    kernel = FakeKernel(simulated.handle)
    with _device(kernel) as device:
        device.attestation(user_data=b"u" * 1024, nonce=b"n" * 1024, public_key=b"p" * 1024)
    assert len(kernel.requests[0]) <= 4096


def test_missing_device_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NsmError, match="cannot open") as caught:
        NsmDevice.open(str(tmp_path / "nsm"))
    assert caught.value.error_name == "DeviceUnavailable"


def test_ioctl_failure_is_an_nsm_error() -> None:
    def failing(fd: int, request: int, argument: bytearray) -> int:
        raise OSError(errno.EIO, "I/O error")

    with _device(FakeKernel(lambda _: b"")) as device:
        device._ioctl = failing
        with pytest.raises(NsmError) as caught:
            device.get_random()
    assert caught.value.error_name == "DeviceUnavailable"


def test_closed_device_refuses_calls() -> None:
    device = _device(FakeKernel(lambda _: b""))
    device.close()
    device.close()  # idempotent
    with pytest.raises(NsmError, match="closed"):
        device.get_random()


@pytest.mark.parametrize(
    "response",
    [
        b"",
        b"\xff",
        cbor2.dumps("GetRandom"),
        cbor2.dumps({"Attestation": {"document": b"x"}}),  # answer to another request
        cbor2.dumps({"GetRandom": {"random": "text"}}),
        cbor2.dumps({"GetRandom": {"random": b""}}),
        cbor2.dumps({"Error": "NotAnNsmError"}),
        cbor2.dumps({"GetRandom": {"random": b"x"}}) + b"\x00",
    ],
)
def test_bad_responses_are_refused(response: bytes) -> None:
    with _device(FakeKernel(lambda _: response)) as device, pytest.raises(NsmError) as caught:
        device.get_random()
    assert caught.value.error_name == "BadResponse"


def test_describe_pcr_index_is_checked() -> None:
    kernel = FakeKernel(lambda _: b"")
    with _device(kernel) as device:
        for index in (-1, 32, True):
            with pytest.raises(NsmError) as caught:
                device.describe_pcr(index)
            assert caught.value.error_name == "InvalidIndex"
    assert kernel.calls == 0


# --- simulated NSM --------------------------------------------------------------


def test_simulated_documents_verify_with_their_root_not_aws(simulated: SimulatedNsm) -> None:
    from enclave_agent.operator.attestation import AttestationError

    document = simulated.attestation(public_key=b"pk")
    parsed = verify_attestation(document, root=simulated.root_pem)
    assert parsed.pcrs == simulated.pcrs
    assert parsed.digest == "SHA384"
    with pytest.raises(AttestationError, match="trusted root"):
        verify_attestation(document)


def test_simulated_fail_with(simulated: SimulatedNsm) -> None:
    nsm = SimulatedNsm.create()
    nsm.fail_with = "InternalError"
    with pytest.raises(NsmError) as caught:
        nsm.attestation()
    assert caught.value.error_name == "InternalError"
    nsm.fail_with = None
    assert nsm.attestation()


def test_simulated_pcrs_are_configurable() -> None:
    from enclave_agent.simulated.nsm import DEFAULT_SIMULATED_PCRS

    assert all(DEFAULT_SIMULATED_PCRS[i] != bytes(48) for i in (0, 1, 2))
    nsm = SimulatedNsm.create(pcrs={3: b"\x33" * 48})
    parsed = parse_attestation(nsm.attestation())
    assert parsed.pcrs[3] == b"\x33" * 48
    assert parsed.pcrs[0] == DEFAULT_SIMULATED_PCRS[0]
    with pytest.raises(ValueError):
        SimulatedNsm.create(pcrs={0: b"short"})


def test_simulated_ca_saved_and_loaded(tmp_path: Path, simulated: SimulatedNsm) -> None:
    simulated.save_ca(tmp_path / "ca")
    assert (tmp_path / "ca" / "root.pem").read_bytes() == simulated.root_pem
    other = SimulatedNsm.load(tmp_path / "ca")
    verify_attestation(other.attestation(), root=(tmp_path / "ca" / "root.pem").read_bytes())
    key_files = [p for p in (tmp_path / "ca").iterdir() if b"PRIVATE" in p.read_bytes()]
    assert key_files and all(p.stat().st_mode & 0o077 == 0 for p in key_files)


def test_saving_over_a_readable_key_file_narrows_its_mode(
    tmp_path: Path, simulated: SimulatedNsm
) -> None:
    (tmp_path / "issuer-key.pem").write_bytes(b"old")
    (tmp_path / "issuer-key.pem").chmod(0o644)
    simulated.save_ca(tmp_path)
    assert (tmp_path / "issuer-key.pem").stat().st_mode & 0o777 == 0o600


def test_simulated_nsm_announces_itself() -> None:
    import io

    import structlog

    from enclave_common.logs import configure_logging

    stream = io.StringIO()
    saved = structlog.get_config(), structlog.contextvars.get_contextvars()
    configure_logging("info", stream=stream, process="test")
    try:
        SimulatedNsm.create()
    finally:
        # Put back whatever logging set-up the rest of the suite runs with.
        structlog.configure(**saved[0])
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(**saved[1])
    assert "NOT a real Nitro Secure Module" in stream.getvalue()
    assert '"level": "warning"' in stream.getvalue()


def test_simulated_chain_is_shaped_like_aws(simulated: SimulatedNsm) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    parsed = parse_attestation(simulated.attestation())
    chain = [x509.load_der_x509_certificate(der) for der in parsed.cabundle]
    leaf = x509.load_der_x509_certificate(parsed.certificate)
    assert len(chain) == 3  # root, then two intermediates
    assert chain[0].public_bytes(serialization.Encoding.PEM) == simulated.root_pem
    for certificate in [*chain, leaf]:
        key = certificate.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp384r1"
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert timedelta(hours=2) < lifetime <= timedelta(hours=4)
    assert chain[0].not_valid_after_utc - chain[0].not_valid_before_utc > timedelta(days=365 * 29)
    for intermediate in chain[1:]:
        days = (intermediate.not_valid_after_utc - intermediate.not_valid_before_utc).days
        assert 1 <= days <= 20


def test_simulated_leaf_expires_and_is_renewed(monkeypatch: pytest.MonkeyPatch) -> None:
    from enclave_agent.operator.attestation import CertificateChainError
    from enclave_agent.simulated import nsm as nsm_sim

    nsm = SimulatedNsm.create()
    document = nsm.attestation()
    later = datetime.now(UTC) + timedelta(hours=4)
    with pytest.raises(CertificateChainError, match="not valid at"):
        verify_attestation(document, root=nsm.root_pem, at=later)
    first_leaf = parse_attestation(document).certificate
    # With a renewal margin longer than the leaf's life, every document gets a new leaf.
    monkeypatch.setattr(nsm_sim, "LEAF_RENEW_BEFORE", timedelta(hours=5))
    renewed = nsm.attestation()
    assert parse_attestation(renewed).certificate != first_leaf
    verify_attestation(renewed, root=nsm.root_pem)


def test_simulated_nsm_answers_bad_requests_with_nsm_errors(simulated: SimulatedNsm) -> None:
    cases = {
        b"\xff": "InvalidArgument",
        cbor2.dumps("Reboot"): "InvalidOperation",
        cbor2.dumps({"DescribePCR": {"index": 99}}): "InvalidIndex",
        cbor2.dumps({"DescribePCR": {"index": "0"}}): "InvalidArgument",
        cbor2.dumps({"Attestation": {"nonce": b"x" * 1025}}): "InputTooLarge",
        cbor2.dumps({"Attestation": {"nonce": "text"}}): "InvalidArgument",
    }
    for request, error in cases.items():
        assert cbor2.loads(simulated.handle(request)) == {"Error": error}


def test_init_ca_command(tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "enclave_agent.simulated.nsm", "init-ca", str(tmp_path / "ca")],
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    root = (tmp_path / "ca" / "root.pem").read_bytes()
    nsm = SimulatedNsm.load(tmp_path / "ca", pcrs={4: b"\x04" * 48})
    assert nsm.root_pem == root
    assert verify_attestation(nsm.attestation(), root=root).pcrs[4] == b"\x04" * 48


@pytest.mark.parametrize("reported", [0, RESPONSE_BUFFER_BYTES + 1, 2**63])
def test_impossible_response_length_is_refused(reported: int) -> None:
    def kernel(fd: int, request: int, argument: bytearray) -> int:
        fields = list(IOVECS.unpack(argument))
        fields[3] = reported
        argument[:] = IOVECS.pack(*fields)
        return 0

    with pytest.raises(NsmError) as caught:
        exchange_raw(0, cbor2.dumps("GetRandom"), kernel)
    assert caught.value.error_name == "BadResponse"


def test_request_bytes_reach_the_kernel_unchanged() -> None:
    seen: list[bytes] = []

    def kernel(fd: int, request: int, argument: bytearray) -> int:
        address, length, response_address, _ = IOVECS.unpack(argument)
        seen.append(ctypes.string_at(address, length))
        answer = cbor2.dumps({"GetRandom": {"random": b"\x07" * 32}})
        ctypes.memmove(response_address, answer, len(answer))
        argument[24:32] = struct.pack("=Q", len(answer))
        return 0

    request = cbor2.dumps("GetRandom")
    assert exchange_raw(5, request, kernel) == cbor2.dumps({"GetRandom": {"random": b"\x07" * 32}})
    assert seen == [request]


def test_loading_an_expiring_simulated_ca_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from enclave_agent.simulated import nsm as nsm_sim

    monkeypatch.setattr(nsm_sim, "INTERMEDIATE_LIFETIME", timedelta(hours=1))
    SimulatedNsm.create().save_ca(tmp_path)
    with pytest.raises(ValueError, match="init-ca"):
        SimulatedNsm.load(tmp_path)

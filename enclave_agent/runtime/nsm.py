"""Client for the Nitro Secure Module (``/dev/nsm``): the raw ioctl and its CBOR messages.

The driver takes one ioctl, ``_IOWR(0x0A, 0, struct nsm_raw)``, whose argument is two
iovecs ``{u64 addr; u64 len;}``: the CBOR request and a response buffer; the kernel
writes the response's length back into the second iovec. The ioctl itself is behind
a seam (``Ioctl``) so tests can stand in for the kernel and still run the packing code.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import io
import os
import struct
import threading
from collections.abc import Callable
from typing import Any, Protocol

import cbor2
import trio

NSM_DEVICE_PATH = "/dev/nsm"
NSM_IOCTL_REQUEST = 0xC0200A00  # _IOWR(0x0A, 0, 32-byte struct nsm_raw)
MAX_REQUEST_BYTES = 4096
RESPONSE_BUFFER_BYTES = 12288
MAX_FIELD_BYTES = 1024  # user_data, nonce, public_key each
MAX_PCR_INDEX = 31
_IOVECS = struct.Struct("=QQQQ")  # request {addr, len}, response {addr, len}

# The seam: (fd, request code, the 32-byte nsm_raw buffer, mutated in place).
Ioctl = Callable[[int, int, bytearray], object]

NSM_ERROR_NAMES = frozenset(
    {
        "InvalidArgument",
        "InvalidIndex",
        "InvalidResponse",
        "ReadOnlyIndex",
        "InvalidOperation",
        "BufferTooSmall",
        "InputTooLarge",
        "InternalError",
    }
)


class NsmError(Exception):
    """Every NSM failure. ``error_name`` is the NSM's error name or one of ours:
    DeviceUnavailable, RequestTooLarge, FieldTooLarge, BadResponse."""

    def __init__(self, error_name: str, message: str | None = None) -> None:
        self.error_name = error_name
        super().__init__(f"{error_name}: {message}" if message else error_name)


class Attester(Protocol):
    """An NSM's attestation call alone (what the KMS gateway needs); blocking."""

    def attestation(
        self,
        *,
        user_data: bytes | None = None,
        nonce: bytes | None = None,
        public_key: bytes | None = None,
    ) -> bytes: ...


class Nsm(Attester, Protocol):
    """What the agent needs from an NSM; blocking calls (run them in a worker thread)."""

    def get_random(self) -> bytes: ...

    def describe_pcr(self, index: int) -> tuple[bool, bytes]: ...

    def describe_nsm(self) -> dict[str, Any]: ...


async def request_attestation(
    nsm: Attester,
    *,
    user_data: bytes | None = None,
    nonce: bytes | None = None,
    public_key: bytes | None = None,
) -> bytes:
    """The attestation document, from every caller this way: off the event loop (the
    ioctl blocks) and cancellable. A cancelled caller returns at once; a hung ioctl
    keeps its worker thread, and one of trio's thread tokens, until it returns, so
    hung calls stay bounded. Any failure of the NSM (device or simulator) is an
    ``NsmError``, named by its NSM error name when it has one."""
    call = functools.partial(
        nsm.attestation, user_data=user_data, nonce=nonce, public_key=public_key
    )
    try:
        return await trio.to_thread.run_sync(call, abandon_on_cancel=True)
    except NsmError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever implements the protocol
        raise NsmError(getattr(exc, "error_name", None) or type(exc).__name__) from None


# --- messages (pure) ------------------------------------------------------------


def encode_attestation_request(
    *, user_data: bytes | None, nonce: bytes | None, public_key: bytes | None
) -> bytes:
    fields = {"user_data": user_data, "nonce": nonce, "public_key": public_key}
    for name, value in fields.items():
        if value is None:
            continue
        if not isinstance(value, bytes):
            raise NsmError("InvalidArgument", f"{name} must be bytes or None")
        if len(value) > MAX_FIELD_BYTES:
            raise NsmError(
                "FieldTooLarge", f"{name} is {len(value)} bytes, the NSM takes at most 1024"
            )
    return _check_request_size(cbor2.dumps({"Attestation": fields}))


def encode_describe_pcr_request(index: int) -> bytes:
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= MAX_PCR_INDEX:
        raise NsmError("InvalidIndex", f"PCR index must be an integer 0..{MAX_PCR_INDEX}")
    return cbor2.dumps({"DescribePCR": {"index": index}})


def encode_simple_request(name: str) -> bytes:
    """``"GetRandom"`` and ``"DescribeNSM"`` are bare text strings on the wire."""
    return cbor2.dumps(name)


def _check_request_size(request: bytes) -> bytes:
    if len(request) > MAX_REQUEST_BYTES:
        raise NsmError(
            "RequestTooLarge",
            f"request is {len(request)} bytes, the NSM takes at most {MAX_REQUEST_BYTES}",
        )
    return request


def decode_response(raw: bytes, expected: str) -> dict[str, Any]:
    """Decode an NSM answer: ``{expected: {...}}`` or ``{"Error": name}`` (raised)."""
    try:
        decoder = cbor2.CBORDecoder(io.BytesIO(raw))
        message = decoder.decode()
        trailing = len(raw) - decoder.fp.tell()
    except Exception as exc:  # noqa: BLE001 - cbor2 raises many types on malformed input
        raise NsmError("BadResponse", f"undecodable NSM response: {type(exc).__name__}") from None
    if trailing:
        raise NsmError("BadResponse", f"{trailing} bytes after the NSM response")
    if not isinstance(message, dict) or len(message) != 1:
        raise NsmError("BadResponse", "NSM response is not a one-entry map")
    ((name, body),) = message.items()
    if name == "Error":
        if isinstance(body, str) and body in NSM_ERROR_NAMES:
            raise NsmError(body, "the NSM refused the request")
        raise NsmError("BadResponse", "NSM answered an unknown error")
    if name != expected:
        raise NsmError("BadResponse", f"NSM answered {name!r} to a {expected} request")
    if not isinstance(body, dict) or not all(isinstance(key, str) for key in body):
        raise NsmError("BadResponse", f"{expected} response body is not a map")
    return body


def _bytes_field(body: dict[str, Any], name: str, what: str, max_len: int) -> bytes:
    value = body.get(name)
    if not isinstance(value, bytes) or not value or len(value) > max_len:
        raise NsmError("BadResponse", f"{what} response lacks a valid {name!r}")
    return value


def read_attestation(raw: bytes) -> bytes:
    return _bytes_field(
        decode_response(raw, "Attestation"), "document", "Attestation", RESPONSE_BUFFER_BYTES
    )


def read_random(raw: bytes) -> bytes:
    return _bytes_field(decode_response(raw, "GetRandom"), "random", "GetRandom", 256)


def read_describe_pcr(raw: bytes) -> tuple[bool, bytes]:
    body = decode_response(raw, "DescribePCR")
    lock = body.get("lock")
    if not isinstance(lock, bool):
        raise NsmError("BadResponse", "DescribePCR response lacks a boolean 'lock'")
    data = _bytes_field(body, "data", "DescribePCR", 64)
    return lock, data


def read_describe_nsm(raw: bytes) -> dict[str, Any]:
    body = decode_response(raw, "DescribeNSM")
    for name in ("version_major", "version_minor", "version_patch", "max_pcrs"):
        if isinstance(body.get(name), bool) or not isinstance(body.get(name), int):
            raise NsmError("BadResponse", f"DescribeNSM response lacks an integer {name!r}")
    for name in ("module_id", "digest"):
        if not isinstance(body.get(name), str):
            raise NsmError("BadResponse", f"DescribeNSM response lacks a text {name!r}")
    locked = body.get("locked_pcrs")
    if not isinstance(locked, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in locked
    ):
        raise NsmError("BadResponse", "DescribeNSM response lacks a 'locked_pcrs' list")
    return body


class NsmClient:
    """The four NSM calls over any transport that exchanges raw CBOR messages."""

    def exchange(self, request: bytes) -> bytes:
        raise NotImplementedError

    def attestation(
        self,
        *,
        user_data: bytes | None = None,
        nonce: bytes | None = None,
        public_key: bytes | None = None,
    ) -> bytes:
        request = encode_attestation_request(
            user_data=user_data, nonce=nonce, public_key=public_key
        )
        return read_attestation(self.exchange(request))

    def get_random(self) -> bytes:
        return read_random(self.exchange(encode_simple_request("GetRandom")))

    def describe_pcr(self, index: int) -> tuple[bool, bytes]:
        return read_describe_pcr(self.exchange(encode_describe_pcr_request(index)))

    def describe_nsm(self) -> dict[str, Any]:
        return read_describe_nsm(self.exchange(encode_simple_request("DescribeNSM")))


# --- the device (I/O) -----------------------------------------------------------


def kernel_ioctl(fd: int, request: int, argument: bytearray) -> object:
    return fcntl.ioctl(fd, request, argument, True)


def exchange_raw(fd: int, request: bytes, ioctl: Ioctl = kernel_ioctl) -> bytes:
    """One NSM round trip: pack the iovecs, run the ioctl, read the response."""
    _check_request_size(request)
    request_buffer = ctypes.create_string_buffer(request, len(request))
    response_buffer = ctypes.create_string_buffer(RESPONSE_BUFFER_BYTES)
    argument = bytearray(
        _IOVECS.pack(
            ctypes.addressof(request_buffer),
            len(request),
            ctypes.addressof(response_buffer),
            RESPONSE_BUFFER_BYTES,
        )
    )
    try:
        ioctl(fd, NSM_IOCTL_REQUEST, argument)
    except OSError as exc:
        raise NsmError("DeviceUnavailable", f"NSM ioctl failed: {exc.strerror}") from None
    used = _IOVECS.unpack(argument)[3]
    if not 0 < used <= RESPONSE_BUFFER_BYTES:
        raise NsmError("BadResponse", f"NSM reported a response length of {used}")
    return ctypes.string_at(response_buffer, used)


class NsmDevice(NsmClient):
    """The real NSM behind ``/dev/nsm`` (only present inside a Nitro Enclave)."""

    def __init__(self, fd: int, *, ioctl: Ioctl = kernel_ioctl) -> None:
        self._fd = fd
        self._ioctl = ioctl
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str = NSM_DEVICE_PATH, *, ioctl: Ioctl = kernel_ioctl) -> NsmDevice:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise NsmError(
                "DeviceUnavailable",
                f"cannot open {path}: {exc.strerror} (not inside a Nitro Enclave? "
                "use the simulated NSM for development)",
            ) from None
        return cls(fd, ioctl=ioctl)

    def exchange(self, request: bytes) -> bytes:
        with self._lock:
            if self._fd < 0:
                raise NsmError("DeviceUnavailable", "the NSM device is closed")
            return exchange_raw(self._fd, request, self._ioctl)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> NsmDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

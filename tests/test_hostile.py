"""Hostile input against the real processes: the agent's socket and the proxy's port.

One stack for the module (local KMS, proxy, agent as subprocesses), with short
timeouts and small connection limits so slow and idle clients are cut off quickly.
Each hand-written case goes over a fresh raw socket; then the process must still
answer a valid request, the answer must carry no traceback or internal detail, and
the agent or proxy must have logged the case exactly once. A seeded, bounded fuzzer
mutates valid requests the same way. At the end every log of the run is scanned for
every secret, data key and credential the run handled (test_zz_*: runs last).
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from devtools.devstack import log_events
from enclave_agent.client import AgentClient
from tests.support.stack import (
    AgentStack,
    FaultStack,
    connect,
    events_since,
    find_leaks,
    raw_exchange,
    read_until_closed,
    status_of,
    temporary_stack,
)

HEADER_TIMEOUT = 1.0
IDLE_TIMEOUT = 2.0
AGENT_MAX_CONNECTIONS = 16
AGENT_CONNECTIONS_PER_UID = 8  # every client here is root: this is the share they exhaust
PROXY_MAX_TUNNELS = 32
PROXY_TUNNELS_PER_PEER = 16  # every client here is 127.0.0.1: one peer
MAX_BODY = 64 * 1024
FUZZ_CASES = 150
SECRET = b"hostile-named-secret-" + secrets.token_hex(16).encode()

# What must never reach a client: a traceback, a source path, or the name of a Python
# exception (the agent's own error types all end in "Exception", KMS's vocabulary).
FORBIDDEN = re.compile(
    rb"Traceback|File \"|\.py\b|/work/|site-packages|/usr/lib|"
    rb"\b(Key|Value|Type|Attribute|Index|Recursion|Overflow|Assertion|Runtime|Lookup|"
    rb"Unicode(De|En)code|JSONDecode|OS|Connection|Memory|NotImplemented)Error\b|"
    rb"binascii|\bh11\b|ProtocolError|NsmError|CmsError|the agent failed"
)


@dataclass
class Stack(AgentStack):
    handled: dict[str, bytes] = field(default_factory=dict)  # secrets the run saw
    answers: list[bytes] = field(default_factory=list)  # every raw answer a client got

    @property
    def proxy_port(self) -> int:
        return int(self.dev.proxy_address.rsplit(":", 1)[1])

    @property
    def agent_socket(self) -> str:
        return self.dev.agent_socket

    def client(self) -> AgentClient:
        return AgentClient(self.agent_socket, timeout=30)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    def make(work: Path) -> FaultStack:
        proxy_config = work / "proxy.toml"
        proxy_config.write_text(
            f"header_timeout = {HEADER_TIMEOUT}\nmax_tunnels = {PROXY_MAX_TUNNELS}\n"
            f"max_tunnels_per_peer = {PROXY_TUNNELS_PER_PEER}\n"
        )
        return FaultStack(work_dir=work, proxy_args=["--config", str(proxy_config)])

    with temporary_stack("hostile-", make) as dev:
        limits = {
            "header_timeout": HEADER_TIMEOUT,
            "idle_timeout": IDLE_TIMEOUT,
            "max_connections": AGENT_MAX_CONNECTIONS,
            "max_connections_per_uid": AGENT_CONNECTIONS_PER_UID,
            "max_body_bytes": MAX_BODY,
        }
        plaintext = b"hostile-plaintext-" + secrets.token_hex(16).encode()
        result = Stack.start(dev, plaintext=plaintext, secret=SECRET, limits=limits)
        result.handled.update(
            secret=SECRET,
            plaintext=plaintext,
            root_secret_key=dev.state()["aws_secret_access_key"].encode(),
        )
        yield result


# --- requests -----------------------------------------------------------------------


def http(method: str, target: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: localhost"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def kms(operation: str, body: bytes | str) -> bytes:
    raw = body.encode() if isinstance(body, str) else body
    return http(
        "POST",
        "/",
        {
            "X-Amz-Target": f"TrentService.{operation}",
            "Content-Type": "application/x-amz-json-1.1",
        },
        raw,
    )


VALID_AGENT = kms("GenerateRandom", '{"NumberOfBytes": 16}')
HEALTH = http("GET", "/healthz", {})


def agent_probe(stack: Stack) -> None:
    """The agent still serves: health and a real KMS call."""
    answer = raw_exchange(stack.agent_socket, [HEALTH])
    assert status_of(answer) == 200, answer[:200]
    with stack.client() as client:
        assert len(client.generate_random(16)) == 16


def proxy_probe(stack: Stack) -> None:
    answer = raw_exchange(("127.0.0.1", stack.proxy_port), [HEALTH])
    assert status_of(answer) == 200, answer[:200]
    answer = raw_exchange(("127.0.0.1", stack.proxy_port), [http("GET", "/v1/credentials", {})])
    assert status_of(answer) == 200, answer[:200]
    creds = json.loads(answer.partition(b"\r\n\r\n")[2])
    stack.handled["proxy_secret_key"] = creds["SecretAccessKey"].encode()
    if creds.get("Token"):
        stack.handled["proxy_session_token"] = creds["Token"].encode()


def wait_logged(path: Path, before: int, names: tuple[str, ...]) -> list[dict[str, Any]]:
    """The events logged since ``before``, once one named ``names`` is there (a server
    may log after the client has its answer) and a moment has passed for repeats."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if any(e.get("event") in names for e in events_since(path, before)):
            break
        time.sleep(0.05)
    time.sleep(0.2)
    return events_since(path, before)


def check_answer(answer: bytes) -> None:
    leak = FORBIDDEN.search(answer)
    assert leak is None, f"internal detail {leak.group()!r} reached the client: {answer[:400]!r}"


def body_of(answer: bytes) -> Any:
    return json.loads(answer.partition(b"\r\n\r\n")[2] or b"null")


# The events a process logs a request under: each case is logged once, as one of them.
REQUEST_EVENTS = {"agent": ("request", "request_rejected"), "proxy": ("request",)}


def hostile_case(
    stack: Stack,
    process: str,
    address: str | tuple[str, int],
    name: str,
    pieces: list[bytes],
    expected: int,
) -> tuple[bytes, list[dict[str, Any]]]:
    """One case sent to ``process``: its answer, checked for the ``expected`` status and
    for leaks, and the events it logged (its request among them, no error)."""
    log_path = stack.dev.log_path(process)
    before = len(log_events(log_path))
    pause = 0.1 if name == "slow sender" else 0.0
    answer = raw_exchange(address, pieces, pause=pause)
    stack.answers.append(answer)
    assert status_of(answer) == expected, answer[:300]
    check_answer(answer)
    events = wait_logged(log_path, before, REQUEST_EVENTS[process])
    assert [e for e in events if e.get("level") == "error"] == []
    return answer, events


# --- the agent's socket ---------------------------------------------------------------

DEEP = "[" * 50_000
GARBAGE = random.Random(6).randbytes(64).replace(b"\n", b"")  # fixed: same run every time
AGENT_CASES: list[tuple[str, list[bytes], int | None]] = [
    ("garbage", [GARBAGE], 400),
    ("no version", [b"GET /healthz\r\n\r\n"], 400),
    ("header without colon", [b"GET /healthz HTTP/1.1\r\nHost x\r\n\r\n"], 400),
    ("nul in header", [b"GET /healthz HTTP/1.1\r\nHost: x\x00y\r\n\r\n"], 400),
    ("huge header", [http("GET", "/healthz", {"X-Big": "a" * 20_000})], 431),
    ("many headers", [http("GET", "/healthz", {f"X-{i}": "v" for i in range(3000)})], 431),
    (
        "huge declared body",
        [kms("Decrypt", b"").replace(b"Length: 0", b"Length: 10000000") + b"{"],
        413,
    ),
    ("huge sent body", [kms("Decrypt", b"{" + b" " * (MAX_BODY + 10) + b"}")], 413),
    (
        "huge chunked body",
        [
            kms("Decrypt", b"").replace(b"Content-Length: 0", b"Transfer-Encoding: chunked")
            + b"%x\r\n" % (MAX_BODY + 100)
            + b"a" * (MAX_BODY + 100)
            + b"\r\n0\r\n\r\n"
        ],
        413,
    ),
    ("bad content-length", [kms("Decrypt", b"").replace(b"Length: 0", b"Length: abc")], 400),
    ("negative content-length", [kms("Decrypt", b"").replace(b"Length: 0", b"Length: -5")], 400),
    ("short body", [kms("Decrypt", b'{"CiphertextBlob": "AAAA"}')[:-10]], 400),
    ("invalid json", [kms("Decrypt", "{")], 400),
    ("json array", [kms("Decrypt", "[1, 2]")], 400),
    ("deeply nested json", [kms("Decrypt", DEEP)], 400),
    ("not utf-8", [kms("Decrypt", b'{"CiphertextBlob": "\xff\xfe"}')], 400),
    ("invalid base64", [kms("Decrypt", '{"CiphertextBlob": "!!!not base64!!!"}')], 400),
    ("undecryptable blob", [kms("Decrypt", '{"CiphertextBlob": "AAAAAAAAAAAAAAAA"}')], 400),
    ("blob of wrong type", [kms("Decrypt", '{"CiphertextBlob": 12345}')], 400),
    ("bytes of wrong type", [kms("GenerateRandom", '{"NumberOfBytes": "16"}')], 400),
    ("bytes negative", [kms("GenerateRandom", '{"NumberOfBytes": -1}')], 400),
    ("bytes huge", [kms("GenerateRandom", '{"NumberOfBytes": 1e309}')], 400),
    ("bool for int", [kms("GenerateRandom", '{"NumberOfBytes": true}')], 400),
    (
        "context a list",
        [kms("Decrypt", '{"CiphertextBlob": "AAAA", "EncryptionContext": []}')],
        400,
    ),
    ("recipient smuggled", [kms("Decrypt", '{"CiphertextBlob": "AAAA", "Recipient": {}}')], 400),
    (  # json keeps the last of repeated members: the refusal must not see only null
        "recipient smuggled then nulled",
        [kms("Decrypt", '{"CiphertextBlob": "AAAA", "Recipient": {"x": 1}, "Recipient": null}')],
        400,
    ),
    ("unknown operation", [kms("ScheduleKeyDeletion", '{"KeyId": "x"}')], 400),
    ("odd target", [kms("Decrypt", "{}").replace(b"TrentService.", b"Other.")], 400),
    ("no target", [http("POST", "/", {}, b"{}")], 400),
    ("bad content type", [kms("Decrypt", "{}").replace(b"x-amz-json-1.1", b"text/plain")], 400),
    ("unknown path", [http("GET", "/../../etc/passwd", {})], 404),
    ("bad secret name", [http("GET", "/v1/secrets/..%2f..%2fetc", {})], 400),
    ("absent secret", [http("GET", "/v1/secrets/absent", {})], 404),
    ("wrong method", [http("DELETE", "/healthz", {})], 405),
    ("attestation bad base64", [http("POST", "/v1/attestation", {}, b'{"nonce": "@@"}')], 400),
    (
        "attestation too long",
        [http("POST", "/v1/attestation", {}, json.dumps({"nonce": "A" * 2000}).encode())],
        400,
    ),
    ("attestation wrong type", [http("POST", "/v1/attestation", {}, b'{"nonce": 5}')], 400),
    ("slow sender", [bytes([b]) for b in VALID_AGENT[:30]], 408),
]


@pytest.mark.parametrize(
    ("name", "pieces", "expected"), AGENT_CASES, ids=[c[0] for c in AGENT_CASES]
)
def test_agent_hostile_case(stack: Stack, name: str, pieces: list[bytes], expected: int) -> None:
    answer, events = hostile_case(stack, "agent", stack.agent_socket, name, pieces, expected)
    assert body_of(answer)["__type"].endswith(("Exception", "TooLarge"))
    logged = [e for e in events if e.get("event") in REQUEST_EVENTS["agent"]]
    assert len(logged) == 1, events  # once: not lost, not repeated
    agent_probe(stack)


def test_agent_fuzzer(stack: Stack) -> None:
    rng = random.Random(0xE6)
    seeds = [
        VALID_AGENT,
        kms("Decrypt", json.dumps({"CiphertextBlob": base64.b64encode(stack.ciphertext).decode()})),
        http("POST", "/v1/attestation", {"Content-Type": "application/json"}, b'{"nonce": "AAAA"}'),
        http("GET", "/v1/secrets/db", {}),
    ]
    statuses: dict[int | None, int] = {}
    deadline = time.monotonic() + 60
    for case in range(FUZZ_CASES):
        if time.monotonic() > deadline:
            break
        data = mutate(rng, rng.choice(seeds))
        answer = raw_exchange(stack.agent_socket, [data])
        status = status_of(answer)
        statuses[status] = statuses.get(status, 0) + 1
        if status == 200:
            answer = answer.partition(b"\r\n\r\n")[0]  # a served value: the app's to see
        stack.answers.append(answer)
        check_answer(answer)
        if case % 25 == 24:
            agent_probe(stack)
    agent_probe(stack)
    assert sum(statuses.values()) >= 50
    events = log_events(stack.dev.log_path("agent"))
    assert [e for e in events if e.get("level") == "error"] == []


def mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        where = rng.randrange(len(out))
        kind = rng.randrange(7)
        if kind == 0:
            out[where] ^= 1 << rng.randrange(8)
        elif kind == 1:
            del out[where : where + rng.randint(1, 16)]
        elif kind == 2:
            out[where:where] = rng.randbytes(rng.randint(1, 16))
        elif kind == 3:
            span = out[where : where + rng.randint(1, 32)]
            out[where:where] = span * rng.randint(2, 200)
        elif kind == 4:
            out = out[: rng.randint(1, len(out))]
        elif kind == 5:
            out[where:where] = rng.choice(
                [b"\r\n", b"\r\n\r\n", b":", b" ", b"\x00", b'"', b"{", b"}", b"%", b"\xff"]
            )
        else:
            out[where:where] = rng.choice([b"Content-Length: 99999\r\n", b"\r\nX: y", b"0" * 40])
        if not out:
            out = bytearray(b"x")
    return bytes(out)


def test_agent_idle_and_slow_clients_cannot_exhaust_connections(stack: Stack) -> None:
    clients = [connect(stack.agent_socket) for _ in range(AGENT_CONNECTIONS_PER_UID)]
    try:
        time.sleep(0.3)  # let the agent accept (and count) all of them
        answer = raw_exchange(stack.agent_socket, [HEALTH])
        assert status_of(answer) == 503 and body_of(answer)["__type"] == "ThrottlingException"
        check_answer(answer)
        # Half stay silent, half trickle a request a byte at a time: a request has
        # header_timeout to arrive whole, so neither keeps its connection.
        for sock in clients:
            sock.setblocking(False)
        received = {index: b"" for index in range(len(clients))}
        open_ = set(received)
        deadline = time.monotonic() + HEADER_TIMEOUT + 8
        sent = 0
        while open_ and time.monotonic() < deadline:
            for index in sorted(open_):
                try:
                    data = clients[index].recv(65536)
                except BlockingIOError:
                    if index % 2 and sent < len(VALID_AGENT):
                        try:
                            clients[index].send(VALID_AGENT[sent : sent + 1])
                        except OSError:
                            open_.discard(index)
                    continue
                except OSError:
                    open_.discard(index)
                    continue
                received[index] += data
                if not data:
                    open_.discard(index)
            sent += 1
            time.sleep(0.2)
        assert not open_, "idle or trickling clients were not cut off"
        for index, data in received.items():
            if index % 2:
                assert status_of(data) == 408, data[:200]
                check_answer(data)
    finally:
        for sock in clients:
            sock.close()
    agent_probe(stack)


# --- the proxy's port ---------------------------------------------------------------------

PROXY_CASES: list[tuple[str, list[bytes], int | None]] = [
    ("garbage", [GARBAGE], 400),
    ("huge header", [http("GET", "/healthz", {"X-Big": "a" * 20_000})], 431),
    ("many headers", [http("GET", "/healthz", {f"X-{i}": "v" for i in range(3000)})], 431),
    ("bad connect target", [b"CONNECT ::::: HTTP/1.1\r\nHost: x\r\n\r\n"], 400),
    ("connect without port", [b"CONNECT example.com HTTP/1.1\r\nHost: x\r\n\r\n"], 400),
    ("connect not allowed", [b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: x\r\n\r\n"], 403),
    ("connect to metadata", [b"CONNECT 169.254.169.254:80 HTTP/1.1\r\nHost: x\r\n\r\n"], 403),
    ("post", [http("POST", "/v1/credentials", {}, b"{}")], 405),
    ("unknown path", [http("GET", "/etc/passwd", {})], 404),
    ("big body on get", [http("GET", "/healthz", {}, b"x" * 200_000)], 400),
    ("bad content-length", [b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: z\r\n\r\n"], 400),
    ("nul in header", [b"GET /healthz HTTP/1.1\r\nHost: x\x00\r\n\r\n"], 400),
    ("slow sender", [bytes([b]) for b in http("GET", "/healthz", {})[:30]], 408),
]


@pytest.mark.parametrize(
    ("name", "pieces", "expected"), PROXY_CASES, ids=[c[0] for c in PROXY_CASES]
)
def test_proxy_hostile_case(stack: Stack, name: str, pieces: list[bytes], expected: int) -> None:
    address = ("127.0.0.1", stack.proxy_port)
    answer, events = hostile_case(stack, "proxy", address, name, pieces, expected)
    assert isinstance(body_of(answer)["error"], str)
    logged = [e for e in events if e.get("event") in REQUEST_EVENTS["proxy"]]
    assert len(logged) == 1 and logged[0]["status"] == expected, events
    proxy_probe(stack)


def test_proxy_fuzzer(stack: Stack) -> None:
    rng = random.Random(0x9E)
    kms_target = f"{stack.dev.kms['host']}:{stack.dev.kms['port']}"
    seeds = [
        f"CONNECT {kms_target} HTTP/1.1\r\nHost: {kms_target}\r\n\r\n".encode(),
        http("GET", "/v1/credentials", {}),
        HEALTH,
    ]
    deadline = time.monotonic() + 60
    count = 0
    for case in range(FUZZ_CASES):
        if time.monotonic() > deadline:
            break
        answer = raw_exchange(("127.0.0.1", stack.proxy_port), [mutate(rng, rng.choice(seeds))])
        if answer.startswith(b"HTTP/1.1 200 Connection established"):
            answer = b""  # a tunnel opened: what follows is the upstream's
        elif b"SecretAccessKey" in answer:
            answer = answer.partition(b"\r\n\r\n")[0]  # credentials: not ours to print
        stack.answers.append(answer)
        check_answer(answer)
        count += 1
        if case % 25 == 24:
            proxy_probe(stack)
    proxy_probe(stack)
    assert count >= 50
    events = log_events(stack.dev.log_path("proxy"))
    assert [e for e in events if e.get("level") == "error"] == []


def test_proxy_idle_and_slow_clients_cannot_exhaust_connections(stack: Stack) -> None:
    address = ("127.0.0.1", stack.proxy_port)
    clients = [connect(address, timeout=HEADER_TIMEOUT + 10) for _ in range(PROXY_MAX_TUNNELS + 8)]
    try:
        started = time.monotonic()
        for index, sock in enumerate(clients):
            if index % 2:
                sock.sendall(b"GET /hea")  # a head that never completes
        for sock in clients:
            read_until_closed(sock)  # returns when the proxy closes (or 11 s pass)
        assert time.monotonic() - started < HEADER_TIMEOUT + 10
    finally:
        for sock in clients:
            sock.close()
    proxy_probe(stack)


# --- core dumps and secrets -----------------------------------------------------------------


def test_agent_runs_without_core_dumps(stack: Stack) -> None:
    pid = stack.dev.pid("agent")
    limits = Path(f"/proc/{pid}/limits").read_text()
    core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"], core
    names = [e.get("event") for e in log_events(stack.dev.log_path("agent"))]
    assert "core_dumps_disabled" in names
    assert names.index("core_dumps_disabled") < names.index("ready")


def test_disable_core_dumps_makes_the_process_undumpable() -> None:
    import ctypes

    from enclave_agent.runtime import init

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            ok = init.disable_core_dumps()
            libc = ctypes.CDLL(None, use_errno=True)
            dumpable = libc.prctl(init.PR_GET_DUMPABLE, 0, 0, 0, 0)
            import resource

            core = resource.getrlimit(resource.RLIMIT_CORE)
            os.write(write_end, json.dumps([ok, dumpable, list(core)]).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        data = b""
        while chunk := os.read(read_end, 1024):
            data += chunk
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    assert json.loads(data) == [True, 0, [0, 0]]


def test_zz_no_secret_in_any_log_or_answer(stack: Stack) -> None:
    """Runs last: every case above has been logged. Also exercises the success paths
    whose values must not leak (data keys, randoms, the named secret)."""
    with stack.client() as client:
        assert client.decrypt(stack.ciphertext) == stack.plaintext
        assert client.secret("db") == SECRET
        for index in range(3):
            data_key = client.generate_data_key(stack.key_id)
            stack.handled[f"data_key_{index}"] = data_key.plaintext
            stack.handled[f"data_key_{index}_b64"] = base64.b64encode(data_key.plaintext)
            stack.handled[f"random_{index}"] = client.generate_random(32)
    proxy_probe(stack)
    needles = dict(stack.handled)
    for name in ("secret", "plaintext"):
        needles[f"{name}_b64"] = base64.b64encode(stack.handled[name])
    logs = stack.dev.all_logs()
    assert {"agent.log", "proxy.log", "kms.log"} <= set(logs)
    blobs = {**logs, "answers to hostile clients": b"\n".join(stack.answers)}
    assert find_leaks(needles, blobs) == []
    for name, content in logs.items():
        assert b"Traceback" not in content, f"a traceback in {name}"

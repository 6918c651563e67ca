"""A deployed enclave watched from the parent, with real processes: the agent ships its
log events and metrics snapshots to the proxy, the proxy writes them to its log and
serves them on its loopback metrics port. The parent's view carries no secret.

One stack for the module (tests.stack.FaultStack): local KMS, the proxy with
``metrics_listen`` on loopback, the agent (simulated NSM) with one named secret and
``[metrics] push_interval = 1``.
"""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from devtools.devstack import create_enclave_key, direct_kms_client, log_events
from enclave_agent.client import AgentClient
from tests.support.stack import FaultStack

MARKER = b"observed-secret-" + secrets.token_hex(16).encode()


@dataclass
class Stack:
    dev: FaultStack
    socket: str
    metrics_port: int
    proxy_port: int

    def proxy_events(self, event: str) -> list[dict[str, Any]]:
        return [e for e in log_events(self.dev.log_path("proxy")) if e.get("event") == event]


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    work = Path(tempfile.mkdtemp(prefix="e2e-watch-"))
    proxy_config = work / "proxy.toml"
    proxy_config.write_text('metrics_listen = "tcp:127.0.0.1:0"\n')
    dev = FaultStack(work_dir=work, proxy_args=["--config", str(proxy_config)])
    try:
        dev.make_ca()
        dev.start_kms()
        dev.start_proxy()
        state = dev.state()
        kms = direct_kms_client(state)
        key_id = create_enclave_key(kms, state["account_id"], dev.pcrs()["0"])
        ciphertext = kms.encrypt(KeyId=key_id, Plaintext=MARKER)["CiphertextBlob"]
        config = dev.write_agent_config(
            secrets_toml=(
                f'\n[secrets.marker]\nciphertext = "{base64.b64encode(ciphertext).decode()}"\n'
                "\n[metrics]\npush_interval = 1\n"
            )
        )
        socket_path = dev.start_agent(config)
        (listening,) = [
            e for e in log_events(dev.log_path("proxy")) if e.get("event") == "listening"
        ]
        yield Stack(
            dev,
            socket_path,
            int(listening["metrics"].rsplit(":", 1)[1]),
            int(listening["address"].rsplit(":", 1)[1]),
        )
    finally:
        dev.stop()
        shutil.rmtree(work, ignore_errors=True)


def get(port: int, path: str) -> tuple[int, str]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while piece := sock.recv(65536):
            data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def wait_for(check: Any) -> None:
    with trio.fail_after(60):
        while not check():
            await trio.sleep(0.05)


async def test_the_agents_events_are_in_the_proxys_log(stack: Stack) -> None:
    def shipped() -> list[str]:
        return [
            json.loads(e["line"])["event"]
            for e in stack.proxy_events("enclave_log")
            if e["stream"] == "agent"
        ]

    await wait_for(lambda: "ready" in shipped())
    assert "secret_loaded" in shipped()
    (event,) = [e for e in stack.proxy_events("enclave_log") if '"ready"' in e["line"]]
    assert event["enclave"] == "tcp:127.0.0.1" and event["level"] == "info"


async def test_the_proxys_metrics_carry_the_enclaves_snapshot(stack: Stack) -> None:
    with AgentClient(stack.socket) as client:
        assert client.secret("marker") == MARKER
        client.generate_random(16)
    enclave = ("enclave", "tcp:127.0.0.1")

    def seen() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        return samples(get(stack.metrics_port, "/metrics")[1])

    decrypted = (
        "enclave_agent_kms_calls_total",
        frozenset({enclave, ("operation", "Decrypt"), ("outcome", "ok")}),
    )
    random = (
        "enclave_agent_requests_total",
        frozenset({enclave, ("operation", "GenerateRandom"), ("outcome", "ok")}),
    )
    await wait_for(lambda: random in seen())
    now = seen()
    assert now[decrypted] >= 1
    age = ("enclave_agent_secret_age_seconds", frozenset({enclave, ("secret", "marker")}))
    assert now[age] >= 0
    # The agent keeps its TLS connection to KMS pooled: a tunnel stays open.
    assert now[("enclave_proxy_tunnels_open", frozenset())] >= 1
    lines = ("enclave_proxy_enclave_log_lines_total", frozenset({enclave, ("stream", "agent")}))
    assert now[lines] > 0


def test_metrics_are_not_served_on_the_enclaves_port(stack: Stack) -> None:
    status, body = get(stack.proxy_port, "/metrics")
    assert status == 404
    assert "enclave_" not in body


def test_the_agent_serves_its_metrics_on_its_socket(stack: Stack) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(stack.socket)
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
        data = b""
        while piece := sock.recv(65536):
            data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"content-type: text/plain; version=0.0.4" in head.lower()
    found = samples(body.decode())
    metrics = (
        "enclave_agent_requests_total",
        frozenset({("operation", "metrics"), ("outcome", "ok")}),
    )
    assert metrics in found or any(name == "enclave_agent_connections_total" for name, _ in found)


def test_no_secret_reaches_the_parent(stack: Stack) -> None:
    """Runs last: every log of the run, the proxy's (the shipped stream) most of all,
    and the metrics the parent reads, against the secret, raw and base64."""
    shipped = [e for e in stack.proxy_events("enclave_log") if e["stream"] == "agent"]
    assert len(shipped) > 5, "the proxy should hold the agent's shipped events"
    parent_sees = get(stack.metrics_port, "/metrics")[1].encode()
    for needle in (MARKER, base64.b64encode(MARKER)):
        assert needle not in parent_sees
        for name, content in stack.dev.all_logs().items():
            assert needle not in content, f"the secret reached {name}"

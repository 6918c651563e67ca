"""Load with real processes: many callers through the agent, many tunnels through the proxy.

- 1000 app requests from 64 concurrent callers through app → agent → proxy → local
  KMS: every caller has its own plaintext and encryption context, so an answer that
  went to the wrong caller, or twice, shows as a wrong or repeated value.
- enclave-proxy (a subprocess) holding 1000 open tunnels to a loopback echo server
  while new ones keep opening and closing; every tunnel still carries its own bytes.
"""

from __future__ import annotations

import os
import resource
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from devtools.devstack import DevStack, create_enclave_key, direct_kms_client, log_events
from enclave_agent.client import AgentClient
from tests.support.proxy_harness import echo_handler, open_tunnel, tcp_server
from tests.support.stack import ProxyProcess, agent_config, start_proxy, temporary_stack

CALLERS = 64
REQUESTS = 1000
TUNNELS = 1000
NEW_TUNNELS = 200
NEW_BATCH = 16


def _raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"needs {wanted} file descriptors, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


@pytest.fixture(scope="module")
def dev() -> Iterator[DevStack]:
    with temporary_stack("load-", DevStack) as stack:
        stack.start(agent=False)
        # All the callers are one uid (this test's): its share must hold all their
        # connections at once (its KMS calls beyond its share wait in its queue).
        limits = {"max_connections_per_uid": 2 * CALLERS}
        stack.start_agent(agent_config(stack, "agent", limits=limits))
        yield stack


def test_1000_requests_from_64_callers_none_lost_crossed_or_duplicated(dev: DevStack) -> None:
    state = dev.state()
    kms = direct_kms_client(state)
    key_id = create_enclave_key(kms, state["account_id"], dev.pcrs()["0"])
    plaintexts = [f"caller-{i:02d}-".encode() + secrets.token_bytes(24) for i in range(CALLERS)]
    contexts = [{"caller": str(i)} for i in range(CALLERS)]
    blobs = [
        kms.encrypt(KeyId=key_id, Plaintext=p, EncryptionContext=c)["CiphertextBlob"]
        for p, c in zip(plaintexts, contexts, strict=True)
    ]
    agent_log = Path(state["agent_log"])
    before = len(log_events(agent_log))

    counts = [REQUESTS // CALLERS + (1 if i < REQUESTS % CALLERS else 0) for i in range(CALLERS)]
    problems: list[str] = []
    randoms: list[bytes] = []
    lock = threading.Lock()
    start = threading.Barrier(CALLERS)

    def caller(index: int) -> None:
        wrong: list[str] = []
        mine: list[bytes] = []
        try:
            with AgentClient(state["agent_socket"], timeout=60) as client:
                start.wait()
                for n in range(counts[index]):
                    if n % 5 == 4:
                        # A size of its own: an answer meant for another caller has another length.
                        size = 17 + index
                        value = client.generate_random(size)
                        if len(value) != size:
                            wrong.append(f"caller {index}: random of {len(value)} bytes")
                        mine.append(value)
                        continue
                    got = client.decrypt(blobs[index], encryption_context=contexts[index])
                    if got != plaintexts[index]:
                        wrong.append(f"caller {index} request {n}: another caller's plaintext")
        except Exception as exc:  # noqa: BLE001 - reported below, with the caller
            wrong.append(f"caller {index}: {type(exc).__name__}: {exc}")
        with lock:
            problems.extend(wrong)
            randoms.extend(mine)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(CALLERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    assert problems == []
    assert len(set(randoms)) == len(randoms) == sum(len(range(4, c, 5)) for c in counts)

    requests = [e for e in log_events(agent_log)[before:] if e.get("event") == "request"]
    assert len(requests) == REQUESTS  # each answered once, none duplicated
    assert {e["status"] for e in requests} == {200}


async def test_proxy_holds_1000_tunnels_while_new_ones_open(tmp_path: Path) -> None:
    # Each tunnel is two sockets here (client end, echo server end).
    _raise_fd_limit(2 * (TUNNELS + NEW_BATCH) + 256)
    async with tcp_server(echo_handler) as echo_port:
        target = f"127.0.0.1:{echo_port}"
        # Headroom over held + opening: a closed tunnel is counted until the proxy has
        # torn down both ends, which may lag behind the next batch.
        config = tmp_path / "proxy.toml"
        # All from one peer (127.0.0.1): its share must hold them all.
        config.write_text(
            f"max_tunnels = {2 * TUNNELS + 1}\nmax_tunnels_per_peer = {2 * TUNNELS}\n"
        )
        with start_proxy(
            tmp_path,
            *("--config", str(config), "--listen", "tcp:127.0.0.1:0"),
            *("--allow", target, "--region", "us-east-1"),
        ) as proxy:
            port = await proxy.port()
            held: list[tuple[trio.SocketStream, bytes]] = []

            async def open_one(token: bytes, keep: bool) -> None:
                status, stream, rest = await open_tunnel(port, target)
                assert (status, rest) == (200, b""), f"CONNECT answered {status}"
                await _echo(stream, token)
                if keep:
                    held.append((stream, token))
                else:
                    await stream.aclose()

            with trio.fail_after(180):
                for first in range(0, TUNNELS, 100):  # the listener's backlog stays unflooded
                    async with trio.open_nursery() as nursery:
                        for i in range(first, min(first + 100, TUNNELS)):
                            nursery.start_soon(open_one, b"held-%05d" % i, True)
                assert len(held) == TUNNELS
                # The proxy really holds them: a client end and an upstream end each.
                held_fds = len(os.listdir(f"/proc/{proxy.process.pid}/fd"))
                assert held_fds >= 2 * TUNNELS
                for first in range(0, NEW_TUNNELS, NEW_BATCH):
                    async with trio.open_nursery() as nursery:
                        for i in range(first, first + NEW_BATCH):
                            nursery.start_soon(open_one, b"new-%05d" % i, False)
                # Every held tunnel still carries its own bytes, and only those.
                async with trio.open_nursery() as nursery:
                    for stream, token in held:
                        nursery.start_soon(_echo, stream, token + b"-again")
                for stream, _ in held:
                    await stream.aclose()
            events = await _wait_for_requests(proxy, TUNNELS + NEW_TUNNELS)
            assert {e["status"] for e in events} == {200}
            assert proxy.process.poll() is None


async def _echo(stream: trio.SocketStream, token: bytes) -> None:
    await stream.send_all(token)
    got = b""
    while len(got) < len(token):
        chunk = await stream.receive_some(len(token) - len(got))
        assert chunk, "tunnel closed"
        got += chunk
    assert got == token


async def _wait_for_requests(proxy: ProxyProcess, count: int) -> list[dict[str, Any]]:
    with trio.fail_after(60):
        while True:
            events = [e for e in proxy.events() if e.get("event") == "request"]
            if len(events) >= count:
                return events
            await trio.sleep(0.1)

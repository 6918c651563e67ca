"""The enclave side of the log channel (enclave_agent.runtime.logship) against receivers
that work, are absent, never read, read slowly or answer garbage: offering a line
never blocks, the app's pipe never fills, and every line is either delivered or
counted in a ``dropped`` record that reaches the receiver."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio

from enclave_agent.runtime.logship import LogBuffer, LogShipper, push_metrics, ship_pipe
from enclave_common.address import TcpAddress, UnixAddress, open_listener
from enclave_common.http_server import Answer, HttpServer, Limits, Request
from enclave_common.logs import configure_logging
from enclave_common.logstream import LOGS_PATH, Dropped, Line, RecordReader, Snapshot
from enclave_common.metrics import Registry
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.usefixtures("restore_logging")
FAST = {"stall_timeout": 0.5, "keepalive": 0.2, "backoff_cap": 0.1}


class Receiver:
    """A log endpoint on the project's own HTTP driver, as the proxy's is."""

    def __init__(self, pause: float = 0.0) -> None:
        self.records: list[object] = []
        self.streams = 0
        self.pause = pause
        self.server = HttpServer(Limits(), errors=lambda status, reason: Answer(status))

    async def handler(self, request: Request) -> Answer:
        assert (request.method, request.target) == ("POST", LOGS_PATH)
        self.streams += 1
        reader = RecordReader()
        async for piece in request.stream(limit=None, piece_timeout=60):
            self.records += reader.feed(piece)
            await trio.sleep(self.pause)
        return Answer(200)

    def lines(self, stream: str = "stdout") -> list[str]:
        return [r.text for r in self.records if isinstance(r, Line) and r.stream == stream]

    def announced(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for record in self.records:
            if isinstance(record, Dropped):
                total.update(record.counts)
        return total

    async def serve(self, stream: trio.abc.Stream) -> None:
        await self.server.serve(stream, self.handler)


async def listen(
    nursery: trio.Nursery, handler: Callable[[trio.SocketStream], Awaitable[None]], port: int = 0
) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, handler, port, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def eventually(check: Callable[[], bool]) -> None:
    with trio.fail_after(60):
        while not check():
            await trio.sleep(0.01)


@asynccontextmanager
async def shipping(
    address: TcpAddress | UnixAddress, buffer: LogBuffer, **options: float
) -> AsyncIterator[LogShipper]:
    shipper = LogShipper(address, buffer, **{**FAST, **options})
    async with trio.open_nursery() as nursery:
        await nursery.start(shipper.run)
        yield shipper
        nursery.cancel_scope.cancel()


def first_event(logs: io.StringIO) -> dict[str, object]:
    """The first event the code under test logged (library records left out)."""
    (event,) = [
        e for e in map(json.loads, logs.getvalue().splitlines()) if e["event"] != "library"
    ][:1]
    assert isinstance(event, dict)
    return event


def accounted(receiver: Receiver, offered: int, stream: str = "stdout") -> bool:
    return len(receiver.lines(stream)) + receiver.announced()[stream] == offered


async def test_lines_drops_and_snapshots_arrive_in_order() -> None:
    drops: Counter[str] = Counter()
    buffer = LogBuffer(2000, on_drop=lambda stream, n: drops.update({stream: n}))
    for n in range(100):  # no shipper yet: most of these do not fit
        buffer.offer("stdout", f"line {n}")
    kept = 100 - drops["stdout"]
    assert 0 < kept < 100
    receiver = Receiver()
    async with trio.open_nursery() as nursery:
        port = await listen(nursery, receiver.serve)
        async with shipping(TcpAddress("127.0.0.1", port), buffer):
            await eventually(lambda: accounted(receiver, 100))
            assert isinstance(receiver.records[0], Dropped)  # the news comes first
            assert receiver.lines() == [f"line {n}" for n in range(kept)]
            registry = Registry()
            registry.gauge("enclave_agent_up", "Up.").set(1)
            async with trio.open_nursery() as pushing:
                pushing.start_soon(push_metrics, registry.collect, buffer, 0.05)
                await eventually(lambda: any(isinstance(r, Snapshot) for r in receiver.records))
                pushing.cancel_scope.cancel()
            buffer.offer("agent", '{"event": "x"}')
            await eventually(lambda: receiver.lines("agent") == ['{"event": "x"}'])
        nursery.cancel_scope.cancel()
    assert receiver.announced() == drops
    (snapshot,) = {json.dumps(r.data) for r in receiver.records if isinstance(r, Snapshot)}
    assert json.loads(snapshot) == [
        ["enclave_agent_up", "gauge", "Up.", [["enclave_agent_up", {}, 1.0]]]
    ]


async def test_an_absent_proxy_costs_nothing_and_its_return_hears_of_the_drops() -> None:
    logs = io.StringIO()
    configure_logging("info", stream=logs, process="test")
    buffer = LogBuffer(4096)
    port = free_port()
    receiver = Receiver()
    async with shipping(TcpAddress("127.0.0.1", port), buffer):
        for n in range(5000):
            buffer.offer("stdout", f"line {n}")
            if n % 100 == 0:
                await trio.sleep(0)
        async with trio.open_nursery() as nursery:
            await listen(nursery, receiver.serve, port)
            await eventually(lambda: accounted(receiver, 5000))
            nursery.cancel_scope.cancel()
    assert receiver.announced()["stdout"] > 0
    events = [json.loads(line)["event"] for line in logs.getvalue().splitlines()]
    # Said once while the proxy was away, not at every retry; then once on its return.
    assert events[:2] == ["log_shipping_interrupted", "log_shipping_resumed"]


async def test_a_proxy_that_never_reads_is_left_and_the_loss_announced(tmp_path: Path) -> None:
    """A unix socket (small kernel buffers): the first connection is accepted and not
    read; the shipper gives up on it after stall_timeout, counts what it was sending as
    dropped, and says so on the next connection. What the kernel had already taken for
    the stalled connection is the one loss it cannot count (docs/observability.md): read
    here afterwards, it makes the sum whole."""
    path = str(tmp_path / "proxy.sock")
    receiver = Receiver()
    accepted = 0
    release = trio.Event()

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal accepted
        accepted += 1
        if accepted == 1:
            await release.wait()
        await receiver.serve(stream)

    buffer = LogBuffer(64 * 1024)
    offered = 0
    async with trio.open_nursery() as nursery:
        listener = await open_listener(UnixAddress(path))
        nursery.start_soon(trio.serve_listeners, handler, [listener])
        async with shipping(UnixAddress(path), buffer):
            while accepted < 2 and offered < 200_000:
                buffer.offer("stdout", f"{offered:06d} " + "x" * 500)
                offered += 1
                if offered % 50 == 0:
                    await trio.sleep(0.001)
            assert accepted == 2
            await eventually(lambda: not buffer)
            release.set()
            await eventually(lambda: accounted(receiver, offered))
        nursery.cancel_scope.cancel()
    assert receiver.announced()["stdout"] > 0
    assert receiver.streams == 2


async def test_a_slow_reader_loses_lines_only_with_notice() -> None:
    receiver = Receiver(pause=0.02)
    buffer = LogBuffer(8 * 1024)
    async with trio.open_nursery() as nursery:
        port = await listen(nursery, receiver.serve)
        async with shipping(TcpAddress("127.0.0.1", port), buffer, stall_timeout=60):
            for n in range(3000):
                buffer.offer("stderr", f"{n:05d} " + "y" * 200)
                if n % 20 == 0:
                    await trio.sleep(0)
            await eventually(lambda: accounted(receiver, 3000, "stderr"))
        nursery.cancel_scope.cancel()
    assert receiver.streams == 1
    got = [int(line[:5]) for line in receiver.lines("stderr")]
    assert got == sorted(got)


@pytest.mark.parametrize(
    "garbage",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"\x00\xff not http at all\r\n\r\n",
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 999999999\r\n\r\n",
        b"",  # closes at once
    ],
)
async def test_a_proxy_answering_garbage_is_left_and_tried_again(garbage: bytes) -> None:
    logs = io.StringIO()
    configure_logging("info", stream=logs, process="test")
    connections = 0

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        if garbage:
            await stream.send_all(garbage)
            await trio.sleep(30)  # and then hold the connection open

    buffer = LogBuffer(4096)
    async with trio.open_nursery() as nursery:
        port = await listen(nursery, handler)
        async with shipping(TcpAddress("127.0.0.1", port), buffer):
            await eventually(lambda: connections >= 3)
        nursery.cancel_scope.cancel()
    event = first_event(logs)
    assert event["event"] == "log_shipping_interrupted"
    assert "proxy" in str(event["reason"])


async def test_a_proxy_answering_100_continue_for_ever_is_left() -> None:
    """Interim answers never end an answer: a parent sending them without end would
    keep the shipper parsing them (an enclave core) for as long as it liked. They
    count toward the answer's head limit, so the shipper leaves and comes back later."""
    logs = io.StringIO()
    configure_logging("info", stream=logs, process="test")
    connections = 0
    interim = b"HTTP/1.1 100 Continue\r\n\r\n" * 1000

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        with contextlib.suppress(trio.BrokenResourceError):
            for _ in range(2000):  # 50 MB at most
                await stream.send_all(interim)
            await trio.sleep(30)

    async with trio.open_nursery() as nursery:
        port = await listen(nursery, handler)
        async with shipping(TcpAddress("127.0.0.1", port), LogBuffer(4096)):
            with trio.fail_after(30):
                await eventually(lambda: connections >= 2)
        nursery.cancel_scope.cancel()
    event = first_event(logs)
    assert event["event"] == "log_shipping_interrupted"
    assert event["reason"] == "the proxy closed the stream (malformed)"


async def test_flush_waits_for_the_buffer_when_connected_and_not_when_not() -> None:
    receiver = Receiver()
    buffer = LogBuffer(1 << 20)
    async with trio.open_nursery() as nursery:
        port = await listen(nursery, receiver.serve)
        async with shipping(TcpAddress("127.0.0.1", port), buffer) as shipper:
            await eventually(lambda: shipper.connected)
            for n in range(1000):
                buffer.offer("agent", f"event {n}")
            with trio.fail_after(30):
                await shipper.flush()
            assert not buffer
            await eventually(lambda: len(receiver.lines("agent")) == 1000)
        nursery.cancel_scope.cancel()
    buffer.offer("agent", "nobody listens")
    async with shipping(TcpAddress("127.0.0.1", free_port()), buffer) as shipper:
        with trio.fail_after(30):
            await shipper.flush()  # not connected: returns at once
        assert buffer


async def test_the_apps_pipe_never_fills_when_nobody_ships() -> None:
    """An app writes 20 MB to stdout with no proxy at all: it finishes, and every line
    is kept or counted."""
    drops: Counter[str] = Counter()
    buffer = LogBuffer(64 * 1024, on_drop=lambda stream, n: drops.update({stream: n}))
    read_end, write_end = os.pipe()
    lines = 200_000
    app = subprocess.Popen(
        [sys.executable, "-c", f"import sys\nfor n in range({lines}): print('z' * 99)"],
        stdout=write_end,
    )
    os.close(write_end)
    try:
        with trio.fail_after(120):
            await ship_pipe(read_end, "stdout", buffer)
        assert await trio.to_thread.run_sync(app.wait) == 0
    finally:
        if app.poll() is None:
            app.kill()
            app.wait()
    _, taken = buffer.take(1 << 30)
    assert taken["stdout"] + drops["stdout"] == lines
    assert drops["stdout"] > 0


async def test_a_pipe_line_longer_than_line_max_goes_in_pieces_and_the_tail_is_kept() -> None:
    buffer = LogBuffer(1 << 20)
    read_end, write_end = os.pipe()
    payload = "é" * 10_000 + "\nlast line without a newline"
    os.write(write_end, payload.encode())
    os.close(write_end)
    await ship_pipe(read_end, "stderr", buffer)
    data, taken = buffer.take(1 << 30)
    records = RecordReader().feed(data)
    texts = [r.text for r in records if isinstance(r, Line)]
    assert "".join(texts[:-1]) == "é" * 10_000
    assert texts[-1] == "last line without a newline"
    assert taken["stderr"] == len(texts) >= 3


# --- enclave-agent run: the agent's events and the app's output, as a real process ----


def agent_config(tmp_path: Path, proxy: str, logs: str = "") -> Path:
    """No secrets, no KMS: the proxy address is dialled for the log channel only."""
    tmp_path.mkdir(exist_ok=True)
    config = tmp_path / "agent.toml"
    config.write_text(
        f'region = "us-east-1"\nproxy = "{proxy}"\nnsm = "simulated"\n'
        f'[listen]\nsocket = "{tmp_path / "agent.sock"}"\n{logs}'
    )
    return config


async def run_agent_with(tmp_path: Path, proxy: str, logs: str, app: str) -> tuple[int, str, str]:
    """``enclave-agent run -- python -c APP``: its status, stdout and stderr."""
    argv = [sys.executable, "-m", "enclave_agent.cli", "run", "--config"]
    argv += [str(agent_config(tmp_path, proxy, logs)), "--", sys.executable, "-c", app]
    process = subprocess.Popen(
        argv,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = await trio.to_thread.run_sync(lambda: process.communicate(timeout=120))
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return process.returncode, out.decode(errors="replace"), err.decode(errors="replace")


APP = "import sys\nprint('to stdout')\nprint('to stderr', file=sys.stderr)\nsys.exit(3)"


async def test_run_ships_the_apps_output_only_when_the_operator_opts_in(tmp_path: Path) -> None:
    receiver = Receiver()
    async with trio.open_nursery() as nursery:
        port = await listen(nursery, receiver.serve)
        proxy = f"tcp:127.0.0.1:{port}"
        status, out, err = await run_agent_with(tmp_path, proxy, "[logs]\napp_output = true\n", APP)
        assert status == 3, err
        assert (out, receiver.lines("stdout"), receiver.lines("stderr")) == (
            "",
            ["to stdout"],
            ["to stderr"],
        )
        assert "to stderr" not in err
        shipped = [json.loads(line)["event"] for line in receiver.lines("agent")]
        # The agent's events, its last ones too (flushed on the way out).
        assert shipped[-1] == "command_exited" and "ready" in shipped
        assert err.splitlines() == receiver.lines("agent")  # the console keeps them too

        # Without the opt-in, the app's output stays on the console.
        first = len(receiver.records)
        status, out, err = await run_agent_with(tmp_path / "b", proxy, "", APP)
        assert status == 3
        assert out == "to stdout\n" and "to stderr\n" in err
        assert not [
            r for r in receiver.records[first:] if isinstance(r, Line) and r.stream != "agent"
        ]
        assert any(isinstance(r, Line) for r in receiver.records[first:])
        nursery.cancel_scope.cancel()


async def test_ship_false_sends_nothing(tmp_path: Path) -> None:
    connections = 0

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1

    async with trio.open_nursery() as nursery:
        port = await listen(nursery, handler)
        status, _, err = await run_agent_with(
            tmp_path, f"tcp:127.0.0.1:{port}", "[logs]\nship = false\n", "pass"
        )
        nursery.cancel_scope.cancel()
    assert status == 0, err
    assert connections == 0


@pytest.mark.parametrize("proxy_kind", ["absent", "never_reads"])
async def test_a_chatty_app_is_never_held_up_by_the_proxy(tmp_path: Path, proxy_kind: str) -> None:
    """20 MB of output, the proxy gone or never reading: the app runs to its end and the
    agent exits with its status."""
    app = "import sys\nfor n in range(200_000): print('w' * 99)\nsys.exit(5)"

    async def never_reads(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        port = await listen(nursery, never_reads) if proxy_kind == "never_reads" else free_port()
        with trio.fail_after(300):
            status, out, err = await run_agent_with(
                tmp_path, f"tcp:127.0.0.1:{port}", "[logs]\napp_output = true\n", app
            )
        nursery.cancel_scope.cancel()
    assert status == 5, err
    assert out == ""

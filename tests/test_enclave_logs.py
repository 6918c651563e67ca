"""The proxy's end of the log channel (proxy.enclave_logs) on the project's HTTP driver,
against well-behaved and hostile streams: an endless line, a huge line, a fast flood,
a slow trickle, garbage, many connections from one enclave. The client side writes
HTTP/1.1 chunked framing by hand, independently of h11."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from enclave_common.http_server import Answer, HttpServer, Limits
from enclave_common.logs import configure_logging
from enclave_common.logstream import encode_dropped, encode_lines, encode_snapshot
from enclave_common.metrics import Registry, to_json
from proxy.admission import peer_key
from proxy.enclave_logs import EnclaveLogs, _Gate
from proxy.metrics import ProxyMetrics

pytestmark = pytest.mark.usefixtures("restore_logging")
HEAD = (
    b"POST /v1/logs HTTP/1.1\r\nHost: enclave-proxy\r\n"
    b"Content-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def lines(stream: str, *texts: str) -> bytes:
    return b"".join(piece for text in texts for piece in encode_lines(stream, text))


@dataclass
class Sink:
    logs: EnclaveLogs
    metrics: ProxyMetrics
    port: int
    output: io.StringIO

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        found = [json.loads(line) for line in self.output.getvalue().splitlines()]
        return [e for e in found if name is None or e["event"] == name]

    def logged(self, stream: str = "stdout") -> list[str]:
        return [e["line"] for e in self.events("enclave_log") if e["stream"] == stream]

    async def connect(self, source: str = "127.0.0.1") -> trio.SocketStream:
        """A stream from ``source`` (another loopback address: another enclave)."""
        stream = await trio.open_tcp_stream("127.0.0.1", self.port, local_address=source)
        await stream.send_all(HEAD)
        return stream


@asynccontextmanager
async def sink(
    rate: float = 1000, line_bytes: int = 8192, piece_timeout: float = 30
) -> AsyncIterator[Sink]:
    output = io.StringIO()
    configure_logging("debug", stream=output, process="enclave-proxy")
    metrics = ProxyMetrics()
    logs = EnclaveLogs(metrics, rate=rate, line_bytes=line_bytes, piece_timeout=piece_timeout)
    http = HttpServer(Limits(), errors=lambda status, reason: Answer(status, body=reason.encode()))

    async def serve(stream: trio.SocketStream) -> None:
        await http.serve(stream, partial(logs.receive, peer_key(stream.socket)))

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        yield Sink(logs, metrics, listeners[0].socket.getsockname()[1], output)
        nursery.cancel_scope.cancel()


async def eventually(check: Any) -> None:
    with trio.fail_after(60):
        while not check():
            await trio.sleep(0.01)


async def answer_of(stream: trio.SocketStream) -> bytes:
    """The head of the server's answer (when it comes, or what came before a close)."""
    data = b""
    with trio.fail_after(60):
        while b"\r\n\r\n" not in data and (piece := await stream.receive_some(65536)):
            data += piece
    return data


async def test_each_line_is_an_event_naming_the_enclave_the_stream_and_the_line() -> None:
    async with sink() as s:
        client = await s.connect()
        agent_error = json.dumps({"event": "startup_failed", "level": "error"})
        await client.send_all(
            chunk(lines("stdout", "hello", "") + lines("stderr", "oops"))
            + chunk(lines("agent", agent_error, "not json"))
        )
        await eventually(lambda: len(s.events("enclave_log")) == 5)
        await client.send_all(b"0\r\n\r\n")  # the end of the body: answered 204
        assert (await answer_of(client)).startswith(b"HTTP/1.1 204 ")
    events = s.events("enclave_log")
    assert [(e["enclave"], e["stream"], e["line"], e["level"]) for e in events] == [
        ("tcp:127.0.0.1", "stdout", "hello", "info"),
        ("tcp:127.0.0.1", "stdout", "", "info"),
        ("tcp:127.0.0.1", "stderr", "oops", "info"),
        ("tcp:127.0.0.1", "agent", agent_error, "error"),  # the agent's level is kept
        ("tcp:127.0.0.1", "agent", "not json", "info"),
    ]
    counted = {
        (x.labels["stream"]): x.value
        for f in text_string_to_metric_families(s.metrics.render())
        for x in f.samples
        if x.name == "enclave_proxy_enclave_log_lines_total"
    }
    assert counted == {"stdout": 2.0, "stderr": 1.0, "agent": 2.0}


async def test_the_enclaves_drops_and_metrics_reach_the_proxy() -> None:
    agent = Registry()
    agent.counter("enclave_agent_kms_calls_total", "Calls.", {"operation": ["Decrypt"]}).inc(
        operation="Decrypt"
    )
    async with sink() as s:
        client = await s.connect()
        await client.send_all(
            chunk(
                encode_dropped({"stdout": 7, "agent": 0})
                + encode_snapshot(to_json(agent.collect()))
            )
        )
        await eventually(lambda: "enclave_agent_kms_calls_total" in s.metrics.render())
        text = s.metrics.render()
        assert (
            'enclave_agent_kms_calls_total{enclave="tcp:127.0.0.1",operation="Decrypt"} 1.0' in text
        )
        (dropped,) = s.events("enclave_log_dropped")
        assert (dropped["enclave"], dropped["dropped"], dropped["level"]) == (
            "tcp:127.0.0.1",
            {"stdout": 7},
            "warning",
        )
        # A snapshot that is not the agent's own families is refused, the last kept.
        forged = [
            ["enclave_proxy_tunnels_open", "gauge", "", [["enclave_proxy_tunnels_open", {}, 9]]]
        ]
        await client.send_all(chunk(encode_snapshot(forged)))
        await eventually(lambda: s.events("enclave_metrics_refused"))
        assert "enclave_proxy_tunnels_open 0.0" in s.metrics.render()
        assert "enclave_agent_kms_calls_total{" in s.metrics.render()
        await client.aclose()
        # The stream gone, its snapshot goes with it.
        await eventually(lambda: "enclave_agent_" not in s.metrics.render())
    assert (
        'enclave_proxy_enclave_log_lines_dropped_total{enclave="tcp:127.0.0.1",where="enclave"} 7.0'
        in text
    )


async def test_an_endless_line_costs_one_record_and_the_stream_goes_on() -> None:
    async with sink() as s:
        client = await s.connect()
        for _ in range(200):  # 12.8 MB without a line feed
            await client.send_all(chunk(b"A" * 65536))
        await client.send_all(chunk(b"\n" + lines("stdout", "after")))
        await eventually(lambda: s.logged() == ["after"])
        (refused,) = s.events("enclave_log_refused")
        assert refused["reason"].startswith("record longer than")


async def test_a_huge_line_is_refused_and_a_long_one_cut_to_line_bytes() -> None:
    # A high rate: the stream is read at rate * line_bytes bytes a second, and 2 MB at
    # the default would take this test 20 s.
    async with sink(rate=100_000, line_bytes=100) as s:
        client = await s.connect()
        huge = b'{"stream":"stdout","line":"' + b"h" * 2_000_000 + b'"}\n'
        await client.send_all(chunk(huge) + chunk(lines("stdout", "x" * 150)))
        await eventually(lambda: len(s.logged()) == 1)
        (event,) = s.events("enclave_log")
        assert (event["line"], event["truncated"]) == ("x" * 100, True)
        assert len(s.events("enclave_log_refused")) == 1


async def test_garbage_is_refused_line_by_line_and_counted() -> None:
    async with sink() as s:
        client = await s.connect()
        garbage = (
            b"\x00\xff\n[]\n{}\n"
            + b'{"stream": "kernel", "line": "x"}\n'
            + bytes(b for b in range(256) if b != 10)
            + b"\n"
        )
        await client.send_all(chunk(garbage + lines("stdout", "fine")))
        await eventually(lambda: s.logged() == ["fine"])
        assert len(s.events("enclave_log_refused")) == 5
        dropped = "enclave_proxy_enclave_log_lines_dropped_total"
        assert f'{dropped}{{enclave="tcp:127.0.0.1",where="proxy"}} 5.0' in s.metrics.render()


async def test_chunked_framing_that_is_not_http_ends_the_stream() -> None:
    async with sink() as s:
        client = await s.connect()
        await client.send_all(b"zz-not-a-chunk-size\r\n")
        assert (await answer_of(client)).startswith(b"HTTP/1.1 400 ")


async def test_a_slow_trickle_is_served_and_silence_ends_it() -> None:
    async with sink(piece_timeout=0.5) as s:
        client = await s.connect()
        record = lines("stdout", "trickled")
        for byte in record:  # one byte per chunk, each within the piece timeout
            await client.send_all(chunk(bytes([byte])))
            await trio.sleep(0.01)
        await eventually(lambda: s.logged() == ["trickled"])
        # Then nothing: the stream is answered 408 and closed.
        assert (await answer_of(client)).startswith(b"HTTP/1.1 408 ")


async def test_many_connections_from_one_enclave_are_one_stream() -> None:
    async with sink() as s:
        clients = []
        for n in range(20):
            client = await s.connect()
            await client.send_all(chunk(lines("stdout", f"from {n}")))
            await eventually(lambda n=n: f"from {n}" in s.logged())
            clients.append(client)
        assert len(s.logs._streams) == 1
        for client in clients[:-1]:  # each replaced by the next one
            assert (await answer_of(client)).startswith(b"HTTP/1.1 409 ")
        await clients[-1].send_all(chunk(lines("stdout", "the newest still streams")))
        await eventually(lambda: s.logged()[-1] == "the newest still streams")


async def test_a_flood_is_read_at_the_rate_and_costs_no_other_enclave_its_stream() -> None:
    """One enclave floods; the proxy reads it no faster than the rate (the sender finds
    itself held back) and another enclave's lines still get through."""
    async with sink(rate=50) as s:
        flood = await s.connect("127.0.0.1")
        sent = 0
        with trio.move_on_after(3):  # bounded: stop once the sender is held back
            while sent < 1_000_000:
                await flood.send_all(chunk(lines("stdout", *(["f" * 50] * 500))))
                sent += 500
        assert len(s.logged()) < sent
        other = await s.connect("127.0.0.2")
        await other.send_all(chunk(lines("stderr", "the other enclave")))
        await eventually(lambda: "the other enclave" in s.logged("stderr"))
        (other_event,) = [e for e in s.events("enclave_log") if e["stream"] == "stderr"]
        assert other_event["enclave"] == "tcp:127.0.0.2"


async def test_a_shutdown_ends_every_stream_with_503() -> None:
    async with sink() as s:
        client = await s.connect()
        await client.send_all(chunk(lines("stdout", "before")))
        await eventually(lambda: s.logged() == ["before"])
        s.logs.close()
        assert (await answer_of(client)).startswith(b"HTTP/1.1 503 ")
        late = await s.connect()
        assert (await answer_of(late)).startswith(b"HTTP/1.1 503 ")


async def test_the_gate_lets_through_one_seconds_worth_then_the_rate(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Virtual time: a burst of `rate`, then exactly `rate` a second."""
    gate = _Gate(rate=10)
    start = trio.current_time()
    for _ in range(10):
        await gate.take(1)
    assert trio.current_time() == start
    for _ in range(50):
        await gate.take(1)
    assert trio.current_time() - start == pytest.approx(5.0)
    await gate.take(100)  # a big piece: paid by waiting
    assert trio.current_time() - start == pytest.approx(15.0)

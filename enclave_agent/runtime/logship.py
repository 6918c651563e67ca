"""The enclave's log channel to the parent: a bounded buffer and the shipper draining it.

What goes in: the agent's own log events (``enclave_common.logs`` tees every line
here; they carry no secret, the leak tests prove it), the app's stdout and stderr
only when the operator set ``[logs] app_output = true``, and every ``push_interval``
a metrics snapshot. What comes out: the body of one long ``POST /v1/logs`` to the
proxy (framing: ``enclave_common.logstream``). Everything here goes TO the parent.

The rule: shipping never holds up the agent or the app. ``LogBuffer.offer`` never
blocks: past ``capacity`` bytes a line is dropped and counted, and the next thing
shipped is a ``dropped`` record saying how many of each stream were lost. The app's
pipes are read as fast as the app writes, whatever happens to the proxy. The
``LogShipper`` is the only reader of the buffer: it connects, streams, and on any
trouble (no proxy, a proxy that answers, closes, sends garbage, or stops reading for
``stall_timeout``) drops the connection, counts what it had taken but not sent as
dropped, waits (backoff up to a minute) and connects again.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import random
import threading
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Mapping

import trio

from enclave_agent.runtime.config import AgentConfig
from enclave_agent.runtime.metrics import AgentMetrics
from enclave_common import logstream, metrics
from enclave_common.address import Address, open_stream
from enclave_common.http1 import ClientConnection, ExchangeError
from enclave_common.logs import get_logger
from enclave_common.metrics import Family

_PIECE = 16 * 1024  # bytes per send: progress is judged piece by piece
_CONNECT_TIMEOUT = 10.0
_BACKOFF_FIRST = 1.0
_BACKOFF_CAP = 60.0
_HEALTHY_AFTER = 60.0  # a connection that lasted this long resets the backoff
_ANSWER_MAX = 4096
_READ_SIZE = 64 * 1024

log = get_logger()


class LogBuffer:
    """What waits to be shipped: at most ``capacity`` bytes of encoded records.

    Thread-safe (library log records may come from worker threads); ``wake`` is
    called (from whichever thread) when something arrives for a waiting shipper.
    """

    def __init__(self, capacity: int, *, on_drop: Callable[[str, int], None] | None = None) -> None:
        self.capacity = capacity
        self._records: deque[tuple[str, bytes]] = deque()
        self._size = 0
        self._pending_drops: Counter[str] = Counter()
        self._snapshot: bytes | None = None
        self._lock = threading.Lock()
        self._on_drop = on_drop
        self.wake: Callable[[], None] | None = None

    def offer(self, stream: str, text: str) -> bool:
        """Queue one line (never blocks); False when it was dropped for lack of room."""
        pieces = list(logstream.encode_lines(stream, text))
        size = sum(len(piece) for piece in pieces)
        with self._lock:
            if self._size + size > self.capacity:
                self._drop_locked(stream, 1)
                return False
            self._records.extend((stream, piece) for piece in pieces)
            self._size += size
            wake = self.wake
        if wake is not None:
            wake()
        return True

    def put_snapshot(self, encoded: bytes) -> None:
        """The latest metrics snapshot, replacing one not shipped yet (it is no news)."""
        with self._lock:
            self._snapshot = encoded
            wake = self.wake
        if wake is not None:
            wake()

    def lost(self, taken: Mapping[str, int]) -> None:
        """Lines taken by ``take`` that were not delivered: counted as dropped."""
        with self._lock:
            for stream, count in taken.items():
                self._drop_locked(stream, count)

    def _drop_locked(self, stream: str, count: int) -> None:
        self._pending_drops[stream] += count
        if self._on_drop is not None:
            self._on_drop(stream, count)

    def __bool__(self) -> bool:
        with self._lock:
            return bool(self._records or self._pending_drops or self._snapshot)

    def take(self, limit: int) -> tuple[bytes, Counter[str]]:
        """Up to ``limit`` bytes to send (at least one record when any): first the
        news of drops, then the snapshot, then lines; and how many lines of each
        stream that includes."""
        out = bytearray()
        taken: Counter[str] = Counter()
        with self._lock:
            if self._pending_drops:
                out += logstream.encode_dropped(self._pending_drops)
                self._pending_drops.clear()
            if self._snapshot is not None:
                out += self._snapshot
                self._snapshot = None
            while self._records and (not out or len(out) + len(self._records[0][1]) <= limit):
                stream, piece = self._records.popleft()
                self._size -= len(piece)
                out += piece
                taken[stream] += 1
        return bytes(out), taken


class LogShipper:
    """Streams the buffer to the proxy's ``POST /v1/logs``, reconnecting for ever."""

    def __init__(
        self,
        proxy: Address,
        buffer: LogBuffer,
        *,
        stall_timeout: float = 30.0,
        keepalive: float = 30.0,
        backoff_cap: float = _BACKOFF_CAP,
    ) -> None:
        self.proxy = proxy
        self.buffer = buffer
        self.stall_timeout = stall_timeout
        self.keepalive = keepalive
        self.backoff_cap = backoff_cap
        self.connected = False
        self.trying = False  # connecting or connected (not waiting to try again)
        self._arrived = trio.Event()
        self._idle = trio.Event()  # the buffer is empty and nothing is in flight
        self._reported = False  # a failure was logged since the last connection

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        token = trio.lowlevel.current_trio_token()

        def wake() -> None:
            # From any thread; a no-op once the shipper is gone. Most events come from
            # the shipper's own run: set the event directly, without a trip through
            # trio's wakeup socket and a task of its own for each logged line.
            try:
                ours = trio.lowlevel.current_trio_token() is token
            except RuntimeError:  # another thread, outside any trio run
                ours = False
            if ours:
                self._arrived.set()
                return
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._arrived.set)

        self.buffer.wake = wake
        task_status.started()
        delay = first = min(_BACKOFF_FIRST, self.backoff_cap)
        try:
            while True:
                started = trio.current_time()
                self.trying = True
                try:
                    reason = await self._connection()
                finally:
                    self.trying = False
                    self._idle.set()
                if trio.current_time() - started >= _HEALTHY_AFTER:
                    delay = first
                if not self._reported:
                    self._reported = True
                    log.warning("log_shipping_interrupted", proxy=str(self.proxy), reason=reason)
                await trio.sleep(random.uniform(delay / 2, delay))  # noqa: S311 (jitter)
                delay = min(self.backoff_cap, delay * 2)
        finally:
            self.buffer.wake = None

    async def flush(self) -> None:
        """Wait until everything buffered has been sent, while connected or connecting;
        at once when waiting to try again (the agent is stopping: nothing waits for a
        proxy that is away). The caller bounds it."""
        while self.trying and self.buffer:
            self._idle = trio.Event()
            await self._idle.wait()

    async def _connection(self) -> str:
        """One connection's life; why it ended."""
        try:
            with trio.fail_after(_CONNECT_TIMEOUT):
                stream = await open_stream(self.proxy)
        except (OSError, trio.TooSlowError) as exc:
            return f"cannot reach the proxy: {_why(exc)}"
        async with stream:
            http = ClientConnection(stream)
            headers = [
                ("Host", "enclave-proxy"),
                ("Content-Type", logstream.CONTENT_TYPE),
                ("Transfer-Encoding", "chunked"),
            ]
            ended: list[str] = []
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    # The proxy answers only to end the stream: whatever it says (or a
                    # close, or garbage) ends this connection.
                    ended.append(await _answer_reason(http))
                    nursery.cancel_scope.cancel()

                try:
                    with trio.fail_after(self.stall_timeout):
                        await http.begin("POST", logstream.LOGS_PATH, headers)
                except (ExchangeError, trio.TooSlowError) as exc:
                    return f"the proxy did not take the request: {_why(exc)}"
                nursery.start_soon(watch)
                self.connected = True
                if self._reported:
                    log.info("log_shipping_resumed", proxy=str(self.proxy))
                self._reported = False
                try:
                    ended.append(await self._pump(http))
                finally:
                    self.connected = False
                nursery.cancel_scope.cancel()
            return ended[0] if ended else "ended"

    async def _pump(self, http: ClientConnection) -> str:
        last_sent = trio.current_time()
        while True:
            if not self.buffer:
                self._idle.set()
                self._arrived = trio.Event()
                if not self.buffer:  # (anything that came meanwhile woke the old event)
                    with trio.move_on_at(last_sent + self.keepalive):
                        await self._arrived.wait()
            data, taken = self.buffer.take(_PIECE)
            try:
                with trio.fail_after(self.stall_timeout):
                    await http.send(data or logstream.KEEPALIVE)
            except (ExchangeError, trio.TooSlowError) as exc:
                self.buffer.lost(taken)
                if isinstance(exc, trio.TooSlowError):
                    return f"the proxy took nothing for {self.stall_timeout:g} s"
                return f"the proxy connection broke: {_why(exc)}"
            except BaseException:
                self.buffer.lost(taken)
                raise
            last_sent = trio.current_time()


async def _answer_reason(http: ClientConnection) -> str:
    try:
        response = await http.answer(max_body=_ANSWER_MAX)
    except ExchangeError as exc:
        return f"the proxy closed the stream ({exc.kind})"
    return f"the proxy ended the stream: {response.status}"


def _why(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


async def ship_pipe(fd: int, stream: str, buffer: LogBuffer) -> None:
    """Read the app's ``stream`` from pipe ``fd`` until EOF, one buffer line per line.

    Always reading: a full buffer drops lines, never stops this loop, so the app's
    writes never block on us. A line longer than ``logstream.LINE_MAX`` goes in pieces.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    partial = ""
    async with trio.lowlevel.FdStream(fd) as pipe:
        while data := await pipe.receive_some(_READ_SIZE):
            partial += decoder.decode(data)
            *lines, partial = partial.split("\n")
            for line in lines:
                buffer.offer(stream, line)
            while len(partial) >= logstream.LINE_MAX:
                buffer.offer(stream, partial[: logstream.LINE_MAX])
                partial = partial[logstream.LINE_MAX :]
    partial += decoder.decode(b"", final=True)
    if partial:
        buffer.offer(stream, partial)


async def push_metrics(
    collect: Callable[[], list[Family]], buffer: LogBuffer, interval: float
) -> None:
    """Every ``interval`` seconds, the latest snapshot of ``collect()`` to the buffer."""
    while True:
        await trio.sleep(interval)
        buffer.put_snapshot(logstream.encode_snapshot(metrics.to_json(collect())))


class LogChannel:
    """The agent's metrics and, with ``[logs] ship``, its log buffer and shipper.

    Made before the agent starts (the log set-up tees into ``tee``); ``running`` ships
    for as long as the agent lives, and on the way out gives what is buffered (the
    app's last lines, a failed start's reason) up to ``FLUSH_SECONDS`` to leave.
    """

    FLUSH_SECONDS = 3.0

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.metrics = AgentMetrics()
        self.buffer = (
            LogBuffer(config.logs.buffer_bytes, on_drop=self.metrics.log_dropped)
            if config.logs.ship
            else None
        )
        self._nursery: trio.Nursery | None = None
        self._pipes: list[trio.Event] = []

    def tee(self, line: str) -> None:
        if self.buffer is not None:
            self.buffer.offer("agent", line)

    def app_output(self) -> tuple[int, int] | None:
        """With ``[logs] app_output``: write ends of two pipes, for the app's stdout and
        stderr, whose read ends are shipped line by line; else None (the console)."""
        if not self.config.logs.app_output or self.buffer is None or self._nursery is None:
            return None
        ends = []
        for stream in ("stdout", "stderr"):
            read_end, write_end = os.pipe()
            done = trio.Event()
            self._pipes.append(done)
            self._nursery.start_soon(_ship_until_eof, read_end, stream, self.buffer, done)
            ends.append(write_end)
        return ends[0], ends[1]

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        async with trio.open_nursery() as nursery:
            shipper = None
            if self.buffer is not None:
                shipper = LogShipper(self.config.proxy, self.buffer)
                await nursery.start(shipper.run)
                interval = self.config.metrics.push_interval
                if interval > 0:
                    nursery.start_soon(push_metrics, self.metrics.collect, self.buffer, interval)
            self._nursery = nursery
            try:
                yield
            finally:
                self._nursery = None
                with trio.CancelScope(shield=True), trio.move_on_after(self.FLUSH_SECONDS):
                    for done in self._pipes:  # the app's last lines, once it has gone
                        await done.wait()
                    if shipper is not None:
                        await shipper.flush()
                nursery.cancel_scope.cancel()


async def _ship_until_eof(fd: int, stream: str, buffer: LogBuffer, done: trio.Event) -> None:
    try:
        await ship_pipe(fd, stream, buffer)
    finally:
        done.set()

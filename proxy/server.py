"""The proxy assembled: accept loop, peer check, each peer's share, drain and reload.

``ProxyServer.run`` accepts connections until ``shutdown()``; then it closes the
listener (no new clients), waits up to ``drain_timeout`` for open tunnels to finish
on their own, and cancels whatever is left. ``reload(allowlist)`` swaps the allowlist
for requests that arrive afterwards; open tunnels keep running untouched.
"""

from __future__ import annotations

import errno
import socket
from functools import partial

import trio

from enclave_common.address import describe_peer
from enclave_common.http_server import HttpServer, Report
from enclave_common.logs import get_logger

from .admission import Admission, peer_key
from .allowlist import Allowlist
from .answers import error_answer
from .config import ProxyConfig
from .credentials import CredentialSource
from .enclave_logs import EnclaveLogs
from .http_front import ProxyContext, handle, limits, log_request
from .metrics import ProxyMetrics, counting_failures
from .upstream import Connector, Resolver, connect_tcp, system_resolver

# Out of descriptors: refusing to accept for a moment beats spinning on the error.
_ACCEPT_RETRY = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_ACCEPT_BACKOFF = 0.1

# vsock CIDs 0-3 are never an enclave: the hypervisor, the local loopback (a process on
# this very instance), the host, and the parent itself (nitro-cli gives enclaves 4 and
# up). Without an explicit allowed_cids they are refused, so a local user of the parent
# cannot take the instance's credentials or tunnels through a vsock loopback connection.
_FIRST_ENCLAVE_CID = 4

log = get_logger()


def vsock_peer_allowed(cid: int, allowed_cids: frozenset[int] | None) -> bool:
    """May this vsock peer use the proxy? Listed CIDs only, or any enclave CID."""
    if allowed_cids is not None:
        return cid in allowed_cids
    return cid >= _FIRST_ENCLAVE_CID


class ProxyServer:
    def __init__(
        self,
        config: ProxyConfig,
        allowlist: Allowlist,
        *,
        region: str,
        credentials: CredentialSource,
        resolver: Resolver = system_resolver,
        connector: Connector = connect_tcp,
    ) -> None:
        self.metrics = ProxyMetrics(credentials)
        self.logs = EnclaveLogs(
            self.metrics,
            rate=config.enclave_log_lines_per_second,
            line_bytes=config.enclave_log_line_bytes,
            piece_timeout=config.idle_timeout,
        )
        self.ctx = ProxyContext(
            config=config,
            allowlist=allowlist,
            region=region,
            credentials=credentials,
            resolver=counting_failures(resolver, self.metrics),
            connector=connector,
            metrics=self.metrics,
            logs=self.logs,
        )
        self.http = HttpServer(limits(config), errors=error_answer)
        self.active_connections = 0
        self._admission = Admission(config)
        self._accept_scope = trio.CancelScope()
        self._drained = trio.Event()

    @property
    def shutting_down(self) -> bool:
        return self.http.closing

    def reload(self, allowlist: Allowlist) -> None:
        self.ctx.allowlist = allowlist

    def shutdown(self) -> None:
        """Stop accepting and start draining (idempotent, callable from any task):
        idle connections and log streams close now, busy ones after their answer or
        tunnel."""
        self.http.close_idle()
        self.logs.close()
        self._accept_scope.cancel()

    def _peer_allowed(self, stream: trio.SocketStream) -> bool:
        vsock = getattr(socket, "AF_VSOCK", None)
        if vsock is None or stream.socket.family != vsock:
            return True
        try:
            cid = int(stream.socket.getpeername()[0])
        except OSError:
            return False
        return vsock_peer_allowed(cid, self.ctx.config.allowed_cids)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.active_connections += 1
        try:
            peer = describe_peer(stream)
            if not self._peer_allowed(stream):
                log.warning("peer_refused", peer=peer)
                await trio.aclose_forcefully(stream)
                return
            key = peer_key(stream.socket)

            def report(ended: Report) -> None:
                log_request(peer, ended)
                self.metrics.request_ended(ended)

            await self.http.serve(
                stream,
                partial(handle, self.ctx, key),
                admit=self._admission.admit(key),
                report=report,
            )
        finally:
            self.active_connections -= 1
            if self.shutting_down and self.active_connections == 0:
                self._drained.set()

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as e:
                if e.errno not in _ACCEPT_RETRY:
                    raise
                log.error("accept_failed", error=errno.errorcode.get(e.errno or 0, "?"))
                await trio.sleep(_ACCEPT_BACKOFF)
                continue
            nursery.start_soon(self._handle, stream)

    async def run(
        self,
        listener: trio.SocketListener,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as connections:
            with self._accept_scope:
                task_status.started()
                await self._accept_loop(listener, connections)
            await listener.aclose()
            open_now = self.active_connections
            log.info("draining", open_connections=open_now, grace_s=self.ctx.config.drain_timeout)
            if open_now:
                with trio.move_on_after(self.ctx.config.drain_timeout):
                    await self._drained.wait()
            left = self.active_connections
            if left:
                log.warning("drain_timeout", cancelled_connections=left)
            connections.cancel_scope.cancel()
        log.info("stopped")

"""The agent, assembled from its configuration: the one place to read the whole process.

    config ──▶ trusted_keys (none: "key_operations_off" logged, key operations refused)
           ──▶ NSM (device or simulated) ──┐
           ──▶ RecipientKey (RSA-2048, in memory, never leaves the process)
           ──▶ KmsGateway(settings, nsm, key)  (pool + credentials, refreshed lazily)
           ──▶ StoreReader (a pool per secret store, the gateway's credentials)
           ──▶ listeners bound (Unix socket mode from config; loopback TCP if
               [listen] tcp names it or ``run`` wants it for SDKs; ``open_tcp``)
           ──▶ SecretStore.load()    (every named secret fetched and opened, else stop)
           ──▶ AppServer.serve on each listener  ──▶ "ready"
           ──▶ SecretStore.follow()  (secrets with ``refresh`` re-read as they rotate)

``run_agent`` is a trio task: ``nursery.start(run_agent, config)`` returns the
``AgentReady`` description once apps can be served, and cancelling it stops
everything and removes the socket file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from enclave_agent.runtime.callers import Callers
from enclave_agent.runtime.config import NSM_SIMULATED, AgentConfig, store_endpoint
from enclave_agent.runtime.kms import KmsGateway, KmsSettings
from enclave_agent.runtime.metrics import AgentMetrics
from enclave_agent.runtime.nsm import Nsm, NsmDevice, request_attestation
from enclave_agent.runtime.recipient import RecipientKey
from enclave_agent.runtime.secrets import SecretStore
from enclave_agent.runtime.server import AppServer
from enclave_agent.runtime.stores import StoreReader
from enclave_agent.runtime.trusted_keys import off_reason
from enclave_common.address import (
    TcpAddress,
    UnixAddress,
    is_loopback_ip,
    listener_address,
    open_listener,
)
from enclave_common.aws import STORE_SERVICES
from enclave_common.inet_diag import NotAttributed
from enclave_common.logs import get_logger
from enclave_common.tcp_peercred import Query, ask_kernel, self_check

log = get_logger()


# Where ``run`` puts the TCP listener for SDKs when [listen] tcp names none.
RUN_TCP = TcpAddress("127.0.0.1", 0)


class CallerCheckUnavailable(ValueError):
    """[listen] tcp is set, the kernel cannot name TCP callers, tcp_open is not set."""


@dataclass(frozen=True)
class AgentReady:
    socket: str
    tcp: TcpAddress | None
    secrets: int
    tcp_checked: bool = False  # the TCP listener's callers are attributed to their uids


@dataclass(frozen=True)
class TcpListener:
    listener: trio.SocketListener
    address: TcpAddress
    checked: bool  # callers known by uid (inet_diag); else one shared caller (tcp_open)


def open_nsm(config: AgentConfig) -> Nsm:
    if config.nsm == NSM_SIMULATED:
        from enclave_agent.simulated.nsm import SimulatedNsm

        pcrs = dict(config.simulated_nsm.pcrs)
        if config.simulated_nsm.ca_dir is not None:
            simulated = SimulatedNsm.load(config.simulated_nsm.ca_dir, pcrs)
        else:
            simulated = SimulatedNsm.create(pcrs)
        # Fault tests: every NSM call fails with this NSM error name.
        simulated.fail_with = config.simulated_nsm.fail_with
        return simulated
    return NsmDevice.open(config.nsm)


def check_socket_directory(directory: Path) -> None:
    """Refuse a socket directory where someone else could swap the socket.

    Why: whoever can rename or unlink entries in the directory, or in any directory
    above it, can put their own socket at the path after we bind; apps would then
    take "plaintext" and data keys from an impostor. Each of them must belong to us
    or root and be writable by nobody else, unless sticky (as /tmp is: others
    cannot remove or rename our entry).
    """
    resolved = directory.resolve()
    for place in (resolved, *resolved.parents):
        info = os.stat(place)
        if info.st_uid not in (0, os.geteuid()):
            raise OSError(
                errno.EPERM,
                f"socket directory {place} belongs to uid {info.st_uid}: "
                "its owner could replace the agent's socket",
            )
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
            raise OSError(
                errno.EPERM,
                f"socket directory {place} is writable by others (mode "
                f"{stat.S_IMODE(info.st_mode):04o}): they could replace the agent's socket",
            )


def require_loopback(listener: trio.SocketListener) -> None:
    """The TCP listener's caller check is for local processes (and with tcp_open
    there is none): it must not be reachable from off the enclave. The config admits
    only loopback literals and ``localhost``; this checks what ``localhost`` actually
    resolved to."""
    host = str(listener.socket.getsockname()[0])
    if not is_loopback_ip(host):
        raise OSError(
            errno.EADDRNOTAVAIL, f"listen.tcp is bound to {host}, which is not a loopback address"
        )


def kms_settings(config: AgentConfig) -> KmsSettings:
    return KmsSettings(
        region=config.region,
        proxy=config.proxy,
        endpoint=config.kms_endpoint,
        ca_bundle=config.ca_bundle,
        pool_size=config.limits.kms_pool_size,
        call_timeout=config.limits.kms_call_timeout,
        max_attempts=config.limits.kms_max_attempts,
        attestation_reuse=config.limits.attestation_reuse_seconds,
        trusted_keys=config.trusted_keys,
    )


def store_reader(config: AgentConfig, gateway: KmsGateway) -> StoreReader:
    """The secret stores' reader, signing with the gateway's credentials."""
    return StoreReader(
        region=config.region,
        proxy=config.proxy,
        endpoints={service: store_endpoint(config, service) for service in STORE_SERVICES},
        ca_bundle=config.ca_bundle,
        credentials=gateway.credentials,
        keys=gateway.signing_keys,
        timeout=config.limits.store_read_timeout,
    )


async def open_tcp(
    config: AgentConfig, listeners: contextlib.AsyncExitStack, *, for_sdks: bool, query: Query
) -> TcpListener | None:
    """The loopback TCP listener, if there is to be one, and whether its callers are
    checked. It is wanted when [listen] tcp names it, or by ``run`` for SDKs
    (``for_sdks``: then on 127.0.0.1, a port of the kernel's choosing). Its callers
    are checked when the kernel can name them (``self_check``); when it cannot, the
    listener runs unchecked only with [listen] tcp_open = true (a warning), is left
    off when only ``run`` wanted it (the log says why), and otherwise stops the start."""
    requested = config.listen.tcp or (RUN_TCP if for_sdks else None)
    if requested is None:
        return None
    listener = await open_listener(requested)
    listeners.push_async_callback(listener.aclose)
    require_loopback(listener)
    bound = listener_address(listener, requested)
    assert isinstance(bound, TcpAddress)
    try:
        await self_check(str(listener.socket.getsockname()[0]), query=query)
    except NotAttributed as exc:
        if config.listen.tcp_open:
            log.warning(
                "tcp_callers_unchecked",
                tcp=str(bound),
                reason=exc.reason,
                consequence="listen.tcp_open = true: every process in the enclave may use "
                "the TCP listener, all of them as one caller",
            )
            return TcpListener(listener, bound, checked=False)
        if config.listen.tcp is None:
            await listener.aclose()
            log.warning(
                "tcp_listener_off",
                reason=f"the kernel cannot name TCP callers: {exc.reason}",
                consequence="no AWS_ENDPOINT_URL_KMS for the app: SDKs cannot reach the "
                "agent, the Unix socket client can; [listen] tcp_open = true would serve "
                "TCP without the caller check",
            )
            return None
        raise CallerCheckUnavailable(
            f"listen.tcp: this kernel cannot name the TCP listener's callers ({exc.reason}); "
            "set [listen] tcp_open = true to serve it without the caller check"
        ) from None
    return TcpListener(listener, bound, checked=True)


async def run_agent(
    config: AgentConfig,
    *,
    metrics: AgentMetrics | None = None,
    tcp_for_sdks: bool = False,
    query: Query = ask_kernel,
    task_status: trio.TaskStatus[AgentReady] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The agent until cancelled. ``tcp_for_sdks``: ``run`` wants the TCP listener for
    the app's SDKs (``open_tcp``); ``query`` asks the kernel who a TCP caller is."""
    socket_path = config.listen.socket
    Path(socket_path).parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    check_socket_directory(Path(socket_path).parent)
    if not config.trusted_keys:
        # Secure by default: the agent still serves GenerateRandom and attestation,
        # and says at once why every key operation will be refused.
        log.warning("key_operations_off", reason=off_reason())
    nsm = open_nsm(config)
    recipient = RecipientKey.generate()
    metrics = metrics or AgentMetrics()
    gateway = KmsGateway(kms_settings(config), nsm, recipient, metrics)

    async def attest(nonce: bytes | None, user_data: bytes | None, key: bytes | None) -> bytes:
        return await request_attestation(nsm, nonce=nonce, user_data=user_data, public_key=key)

    reader = store_reader(config, gateway)
    store = SecretStore(
        config.secrets,
        gateway,
        reader,
        read_timeout=config.limits.store_read_timeout,
        events=metrics,
    )
    bound_socket = False
    try:
        async with contextlib.AsyncExitStack() as listeners:
            unix_listener = await open_listener(
                UnixAddress(socket_path), unix_mode=config.listen.socket_mode
            )
            bound_socket = True  # from here on the socket file is ours to remove
            if config.listen.socket_group is not None:
                # The apps' group may connect (mode 0660) without being root's group.
                os.chown(socket_path, -1, config.listen.socket_group)
            listeners.push_async_callback(unix_listener.aclose)
            tcp = await open_tcp(config, listeners, for_sdks=tcp_for_sdks, query=query)

            # Apps may connect from now on; they wait in the backlog until secrets are in.
            await store.load()

            server = AppServer(
                gateway=gateway,
                attest=attest,
                secrets=store,
                access=config.access,
                limits=config.limits,
                metrics=metrics,
                query=query,
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(server.serve, unix_listener, callers=Callers.UNIX))
                if tcp is not None:
                    callers = Callers.TCP if tcp.checked else Callers.TCP_OPEN
                    await nursery.start(partial(server.serve, tcp.listener, callers=callers))
                nursery.start_soon(store.follow)
                log.info(
                    "ready",
                    socket=socket_path,
                    tcp=str(tcp.address) if tcp else None,
                    tcp_callers=("checked" if tcp.checked else "unchecked") if tcp else None,
                    secrets=len(store),
                    nsm=config.nsm,
                    proxy=str(config.proxy),
                    trusted_keys=[str(entry) for entry in config.trusted_keys.entries],
                )
                task_status.started(
                    AgentReady(
                        socket_path,
                        tcp.address if tcp else None,
                        len(store),
                        tcp_checked=tcp is not None and tcp.checked,
                    )
                )
    finally:
        store.remove_files()
        with trio.CancelScope(shield=True):
            await reader.aclose()
            await gateway.aclose()
        if bound_socket:
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(socket_path).st_mode):
                    os.unlink(socket_path)
        close = getattr(nsm, "close", None)
        if callable(close):
            close()

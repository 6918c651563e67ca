"""The agent, assembled from its configuration: the one place to read the whole process.

    config ──▶ trusted_keys (none: "key_operations_off" logged, key operations refused)
           ──▶ NSM (device or simulated) ──┐
           ──▶ RecipientKey (RSA-2048, in memory, never leaves the process)
           ──▶ KmsGateway(settings, nsm, key)  (pool + credentials, refreshed lazily)
           ──▶ listeners bound (Unix socket mode from config; optional loopback TCP)
           ──▶ SecretStore.load(gateway)    (every named secret decrypted, else stop)
           ──▶ AppServer.serve on each listener  ──▶ "ready"

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

from enclave_agent.runtime.config import NSM_SIMULATED, AgentConfig
from enclave_agent.runtime.kms import KmsGateway, KmsSettings
from enclave_agent.runtime.nsm import Nsm, NsmDevice, request_attestation
from enclave_agent.runtime.recipient import RecipientKey
from enclave_agent.runtime.secrets import SecretStore
from enclave_agent.runtime.server import AppServer
from enclave_agent.runtime.trusted_keys import off_reason
from enclave_common.address import (
    TcpAddress,
    UnixAddress,
    is_loopback_ip,
    listener_address,
    open_listener,
)
from enclave_common.logs import get_logger

log = get_logger()


@dataclass(frozen=True)
class AgentReady:
    socket: str
    tcp: TcpAddress | None
    secrets: int


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
    """The TCP listener has no caller check: it must not be reachable from off the
    enclave. The config admits only loopback literals and ``localhost``; this checks
    what ``localhost`` actually resolved to."""
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
        trusted_keys=config.trusted_keys,
    )


async def run_agent(
    config: AgentConfig,
    *,
    task_status: trio.TaskStatus[AgentReady] = trio.TASK_STATUS_IGNORED,
) -> None:
    socket_path = config.listen.socket
    Path(socket_path).parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    check_socket_directory(Path(socket_path).parent)
    if not config.trusted_keys:
        # Secure by default: the agent still serves GenerateRandom and attestation,
        # and says at once why every key operation will be refused.
        log.warning("key_operations_off", reason=off_reason())
    nsm = open_nsm(config)
    recipient = RecipientKey.generate()
    gateway = KmsGateway(kms_settings(config), nsm, recipient)

    async def attest(nonce: bytes | None, user_data: bytes | None, key: bytes | None) -> bytes:
        return await request_attestation(nsm, nonce=nonce, user_data=user_data, public_key=key)

    store = SecretStore(config.secrets)
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
            tcp_listener = None
            tcp_address: TcpAddress | None = None
            if config.listen.tcp is not None:
                tcp_listener = await open_listener(config.listen.tcp)
                listeners.push_async_callback(tcp_listener.aclose)
                require_loopback(tcp_listener)
                bound = listener_address(tcp_listener, config.listen.tcp)
                assert isinstance(bound, TcpAddress)
                tcp_address = bound

            # Apps may connect from now on; they wait in the backlog until secrets are in.
            await store.load(gateway)

            server = AppServer(
                gateway=gateway,
                attest=attest,
                secrets=store,
                access=config.access,
                limits=config.limits,
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(server.serve, unix_listener, check_peer=True))
                if tcp_listener is not None:
                    await nursery.start(partial(server.serve, tcp_listener, check_peer=False))
                log.info(
                    "ready",
                    socket=socket_path,
                    tcp=str(tcp_address) if tcp_address else None,
                    secrets=len(store),
                    nsm=config.nsm,
                    proxy=str(config.proxy),
                    trusted_keys=[str(entry) for entry in config.trusted_keys.entries],
                )
                task_status.started(AgentReady(socket_path, tcp_address, len(store)))
    finally:
        store.remove_files()
        with trio.CancelScope(shield=True):
            await gateway.aclose()
        if bound_socket:
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(socket_path).st_mode):
                    os.unlink(socket_path)
        close = getattr(nsm, "close", None)
        if callable(close):
            close()

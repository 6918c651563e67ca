"""The ``enclave-proxy`` command: read the settings, then run the proxy until a signal.

This is the one place the daemon is assembled: settings → region → allowlist →
credentials → listener → server, plus the signal and sd_notify duties around it.

    enclave-proxy [--config FILE] [--listen ADDR] [--allow HOST:PORT]... [--region R]
                  [--log-level L]
    enclave-proxy check-config FILE

Signals: SIGTERM/SIGINT stop accepting and drain open tunnels up to ``drain_timeout``
(a second one cancels them at once); SIGHUP re-reads the config file and swaps the
allowlist without touching open tunnels.
"""

from __future__ import annotations

import argparse
import errno
import resource
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from enclave_common.address import (
    Address,
    TcpAddress,
    VsockAddress,
    is_loopback_ip,
    listener_address,
    open_listener,
)
from enclave_common.cli import UsageError, run_command
from enclave_common.config import ConfigError, read_text
from enclave_common.logs import LEVELS, configure_logging, get_logger

from .allowlist import Allowlist
from .config import (
    DEFAULT_LISTEN,
    CliOptions,
    ProxyConfig,
    build_config,
    default_allow_entries,
    effective_allowlist,
    not_loopback,
    parse_config_text,
)
from .credentials import CredentialSource
from .metrics import serve_metrics
from .notify import notify, watchdog_interval
from .region import RegionError, discover_region
from .server import ProxyServer

log = get_logger()


def _read_config_file(path: str) -> dict[str, Any]:
    text = read_text(Path(path))
    try:
        return parse_config_text(text)
    except ConfigError as e:
        raise e.within(path) from None


def load_config(config_path: str | None, cli: CliOptions) -> ProxyConfig:
    file_settings = _read_config_file(config_path) if config_path else {}
    return build_config(file_settings, cli)


def _raise_fd_limit() -> None:
    # Each open tunnel holds two sockets and, while bytes flow, two pipes (four fds);
    # the soft limit (often 1024) would cap the proxy well below max_tunnels.
    # Under systemd, LimitNOFILE= already sets both limits (and the unit's seccomp filter
    # refuses setrlimit), so a failure here is only logged.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as e:
            log.warning("fd_limit_unchanged", soft=soft, hard=hard, reason=str(e))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="enclave-proxy",
        description="Relay an enclave's KMS traffic to allowlisted endpoints and serve the "
        "parent's AWS credentials. Also: `enclave-proxy check-config FILE`.",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML config file")
    parser.add_argument(
        "--listen",
        metavar="ADDR",
        help=f"vsock:CID:PORT, tcp:HOST:PORT or unix:PATH (default {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--allow",
        metavar="HOST:PORT",
        action="append",
        default=[],
        help="allowlist entry, repeatable; added to the config file's entries",
    )
    parser.add_argument("--region", metavar="R", help="AWS region (default: config, then IMDSv2)")
    parser.add_argument("--log-level", choices=LEVELS, help="default info")
    return parser


async def _handle_signals(
    signals: Any,
    server: ProxyServer,
    config_path: str | None,
    cli: CliOptions,
    region: str,
    cancel: trio.CancelScope,
) -> None:
    async for signum in signals:
        if signum == signal.SIGHUP:
            _reload(server, config_path, cli, region)
        elif server.shutting_down:
            log.warning("shutdown_forced", signal=signal.Signals(signum).name)
            cancel.cancel()
        else:
            log.info("shutdown_requested", signal=signal.Signals(signum).name)
            notify("STOPPING=1")
            server.shutdown()


def _reload(server: ProxyServer, config_path: str | None, cli: CliOptions, region: str) -> None:
    notify("RELOADING=1")
    try:
        config = load_config(config_path, cli)
        allowlist = effective_allowlist(config, config.region or region)
    except ConfigError as e:
        log.error("reload_failed", reason=str(e), kept=server.ctx.allowlist.describe())
    else:
        server.reload(allowlist)
        log.info("reloaded", allowlist=allowlist.describe(), config=config_path)
    notify("READY=1")


async def _watchdog(interval: float) -> None:
    while True:
        notify("WATCHDOG=1")
        await trio.sleep(interval)


async def _loopback_only(address: TcpAddress, key: str = "listen") -> TcpAddress:
    """The address to bind for a tcp: listen address: a name (``localhost`` too) is
    resolved here and refused if any address it resolves to is off loopback; the
    first is bound, so what was checked is what listens."""
    found = await trio.socket.getaddrinfo(
        address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    hosts = list(dict.fromkeys(str(sockaddr[0]) for *_, sockaddr in found))
    off_loopback = [host for host in hosts if not is_loopback_ip(host)]
    if off_loopback:
        raise ConfigError(not_loopback(address, ", ".join(off_loopback), key=key))
    return TcpAddress(hosts[0], address.port)


def address_in_use(address: Address, key: str = "listen") -> str:
    """What to do when the listen address is taken, in one line.

    Port 8000 on vsock is where AWS's own vsock-proxy listens in its service's default
    configuration and tutorials: the likely culprit on a parent instance."""
    if isinstance(address, VsockAddress):
        return (
            f"{address} is already in use, most likely by AWS's vsock-proxy "
            "(nitro-enclaves-vsock-proxy.service, which listens on port 8000 too): stop it "
            "(systemctl disable --now nitro-enclaves-vsock-proxy.service) or set "
            f"{key} to a free port (and the agent's proxy address to match)"
        )
    return f"{address} is already in use by another process: stop it or set {key} to a free port"


async def _open_listening(address: Address, key: str) -> trio.SocketListener | int:
    """The listener for the setting ``key``, or the exit code when there is none to be
    had (logged; a taken address also in one plain line saying what to do)."""
    try:
        bind = await _loopback_only(address, key) if isinstance(address, TcpAddress) else address
        return await open_listener(bind)
    except ConfigError as e:
        log.error("listen_refused", setting=key, address=str(address), reason=str(e))
        return 2
    except OSError as e:
        reason = address_in_use(address, key) if e.errno == errno.EADDRINUSE else str(e)
        log.error("listen_failed", setting=key, address=str(address), reason=reason)
        print(f"enclave-proxy: {reason}", file=sys.stderr)
        return 1


async def serve(config: ProxyConfig, config_path: str | None, cli: CliOptions) -> int:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        try:
            region = config.region or await discover_region()
            allowlist: Allowlist = effective_allowlist(config, region)
        except (RegionError, ConfigError) as e:
            log.error("startup_failed", reason=str(e))
            return 2
        _raise_fd_limit()
        credentials = CredentialSource(
            region=region,
            assume_role_arn=config.assume_role_arn,
            sts_endpoint=config.sts_endpoint,
        )
        server = ProxyServer(config, allowlist, region=region, credentials=credentials)
        listener = await _open_listening(config.listen, "listen")
        if isinstance(listener, int):
            return listener
        metrics_listener: trio.SocketListener | None = None
        metrics_at = None
        if config.metrics_listen is not None:
            opened = await _open_listening(config.metrics_listen, "metrics_listen")
            if isinstance(opened, int):
                await listener.aclose()
                return opened
            metrics_listener = opened
            metrics_at = str(listener_address(opened, config.metrics_listen))
        bound = listener_address(listener, config.listen)
        log.info(
            "listening",
            address=str(bound),
            region=region,
            allowlist=allowlist.describe(),
            max_tunnels=config.max_tunnels,
            metrics=metrics_at,
        )
        notify(f"READY=1\nSTATUS=listening on {bound}")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                _handle_signals, signals, server, config_path, cli, region, nursery.cancel_scope
            )
            interval = watchdog_interval()
            if interval is not None:
                nursery.start_soon(_watchdog, interval)
            if metrics_listener is not None:
                await nursery.start(serve_metrics, metrics_listener, server.metrics)
            await server.run(listener)
            nursery.cancel_scope.cancel()
    return 0


def check_config(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="enclave-proxy check-config",
        description="Validate a config file and print the effective allowlist.",
    )
    parser.add_argument("file")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.file, CliOptions())
    except ConfigError as e:
        raise UsageError(str(e)) from None
    print(f"listen: {config.listen}")
    print(f"metrics: {config.metrics_listen or 'off (metrics_listen)'}")
    print(f"region: {config.region or '(from IMDSv2 at start-up)'}")
    if config.allow or config.region:
        entries = effective_allowlist(config, config.region).describe()
        print("allowlist:")
    else:
        entries = list(default_allow_entries("<region>"))
        print("allowlist (the KMS and secret-store endpoints of the region found at start-up):")
    for entry in entries:
        print(f"  {entry}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["check-config"]:
        return run_command("enclave-proxy check-config", lambda: check_config(args_list[1:]))
    args = _parser().parse_args(args_list)
    cli = CliOptions(
        listen=args.listen, allow=tuple(args.allow), region=args.region, log_level=args.log_level
    )
    configure_logging(args.log_level or "info", process="enclave-proxy")
    try:
        config = load_config(args.config, cli)
    except ConfigError as e:
        log.error("config_invalid", reason=str(e))
        print(f"enclave-proxy: {e}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, process="enclave-proxy")
    try:
        return trio.run(serve, config, args.config, cli)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

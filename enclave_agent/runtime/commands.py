"""``enclave-agent serve``, ``run -- CMD``, and the app-side verbs.

- ``serve [--config FILE]``: the agent alone, until SIGTERM/SIGINT.
- ``run [--config FILE] -- CMD [ARGS...]``: the enclave's first process: loopback
  up, agent ready (named secrets fetched), then CMD with ``ENCLAVE_AGENT_SOCKET``
  set, and (unless ``[run] sdk_env = false``) everything an AWS SDK needs to use the
  agent unchanged (``app_environment``); signals forwarded, orphans reaped, CMD's
  exit status returned.
- ``decrypt``, ``generate-data-key``, ``generate-random``, ``secret``: talk to a
  running agent over its socket (``enclave_agent.client``), for shell scripts.

Errors and exit codes follow ``enclave_common.cli`` (2 usage or config, 1 runtime).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import trio

from enclave_agent.client import DEFAULT_SOCKET, SOCKET_ENV, AgentClient, AgentError
from enclave_agent.runtime import init
from enclave_agent.runtime.config import AgentConfig, ConfigError, load_config
from enclave_agent.runtime.logship import LogChannel
from enclave_agent.runtime.nsm import NsmError
from enclave_agent.runtime.secrets import SecretError
from enclave_agent.runtime.service import AgentReady, run_agent
from enclave_common.cli import CommandFailed, UsageError
from enclave_common.logs import configure_logging, get_logger

DEFAULT_CONFIG = "/etc/enclave-agent/agent.toml"
CONFIG_ENV = "ENCLAVE_AGENT_CONFIG"
ENDPOINT_ENV = "ENCLAVE_AGENT_ENDPOINT"
# Credentials for SDKs to sign with, which the agent ignores: it signs every KMS request
# itself, with the parent's credentials (an SDK insists on having some).
PLACEHOLDER_KEY_ID = "ENCLAVEAGENTSIGNS"
PLACEHOLDER_SECRET = "placeholder-the-enclave-agent-signs-with-its-own-credentials"  # noqa: S105
# Variables that would keep an SDK from the agent's endpoint or mix credentials.
_SDK_UNSET = ("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "AWS_SESSION_TOKEN", "AWS_PROFILE")
# What can stop the agent from starting, each with a message fit for the log: a secret
# KMS refused, a bad CA bundle or endpoint (ValueError), the NSM device or the socket
# path (OSError, NsmError).
STARTUP_ERRORS = (SecretError, ValueError, OSError, NsmError)
# What a KMS error with no message (KMS often sends none) most likely means.
EMPTY_MESSAGE_HINTS = {
    "InvalidCiphertextException": "usually the encryption context differs from the one "
    "the ciphertext was made with (give it with --encryption-context K=V), or the "
    "ciphertext is damaged",
    "IncorrectKeyException": "the ciphertext was made under another key than --key-id",
    "AccessDeniedException": "the key policy does not admit this enclave or role",
}
T = TypeVar("T")


def add_parser(subparsers: Any) -> None:
    config_help = f"agent configuration (TOML; default ${CONFIG_ENV} or {DEFAULT_CONFIG})"

    serve = subparsers.add_parser("serve", help="run the agent (no app)")
    serve.add_argument("--config", help=config_help)
    serve.set_defaults(func=_serve)

    run = subparsers.add_parser(
        "run", help="run as the enclave's first process: the agent, then CMD (after --)"
    )
    run.add_argument("--config", help=config_help)
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    run.set_defaults(func=_run)

    socket_help = f"the agent's socket (default ${SOCKET_ENV} or {DEFAULT_SOCKET})"

    decrypt = subparsers.add_parser("decrypt", help="KMS Decrypt through the agent; plaintext out")
    decrypt.add_argument("--socket", help=socket_help)
    source = decrypt.add_mutually_exclusive_group(required=True)
    source.add_argument("--ciphertext-file", type=Path, help="raw CiphertextBlob ('-' = stdin)")
    source.add_argument("--ciphertext-base64", help="CiphertextBlob in base64")
    decrypt.add_argument("--key-id")
    decrypt.add_argument("--encryption-context", action="append", default=[], metavar="K=V")
    decrypt.add_argument("--output", type=Path, help="write the plaintext here (mode 0600)")
    decrypt.set_defaults(func=_decrypt)

    datakey = subparsers.add_parser(
        "generate-data-key", help="KMS GenerateDataKey through the agent; JSON out"
    )
    datakey.add_argument("--socket", help=socket_help)
    datakey.add_argument("--key-id", required=True)
    size = datakey.add_mutually_exclusive_group()
    size.add_argument("--key-spec", default="AES_256", choices=["AES_256", "AES_128"])
    size.add_argument("--number-of-bytes", type=int)
    datakey.add_argument("--encryption-context", action="append", default=[], metavar="K=V")
    datakey.set_defaults(func=_generate_data_key)

    random = subparsers.add_parser("generate-random", help="KMS GenerateRandom through the agent")
    random.add_argument("--socket", help=socket_help)
    random.add_argument("--number-of-bytes", type=int, required=True)
    random.add_argument("--base64", action="store_true", help="print base64 instead of raw bytes")
    random.set_defaults(func=_generate_random)

    secret = subparsers.add_parser("secret", help="print a named secret from the agent")
    secret.add_argument("--socket", help=socket_help)
    secret.add_argument("name")
    secret.set_defaults(func=_secret)


# --- the agent ----------------------------------------------------------------


def _load(args: argparse.Namespace) -> AgentConfig:
    path = args.config or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG
    try:
        return load_config(path)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def _serve(args: argparse.Namespace) -> int:
    config = _load(args)
    channel = LogChannel(config)
    configure_logging(config.log_level, process="enclave-agent", tee=channel.tee)
    _no_core_dumps()
    return trio.run(_serve_async, config, channel)


def _no_core_dumps() -> None:
    # Before the recipient key exists: nothing secret may ever reach a core file.
    log = get_logger()
    if init.disable_core_dumps():
        log.info("core_dumps_disabled")
    else:
        log.warning("core_dumps_not_disabled", reason="prctl(PR_SET_DUMPABLE) failed")


async def _start(
    nursery: trio.Nursery,
    config: AgentConfig,
    signals: AsyncIterator[int],
    channel: LogChannel,
    *,
    tcp_for_sdks: bool = False,
) -> AgentReady | int:
    """Start the agent in ``nursery``; an exit code instead if it cannot start or a
    SIGTERM/SIGINT comes first (fetching secrets can take a KMS deadline or more)."""
    log = get_logger()
    ready: AgentReady | None = None
    stopped_by: list[int] = []
    async with trio.open_nursery() as startup:

        async def watch() -> None:
            async for signum in signals:
                if signum != signal.SIGCHLD:  # no child yet: nothing to reap
                    stopped_by.append(signum)
                    startup.cancel_scope.cancel()
                    return

        startup.start_soon(watch)
        try:
            ready = await nursery.start(
                partial(run_agent, config, metrics=channel.metrics, tcp_for_sdks=tcp_for_sdks)
            )
        except STARTUP_ERRORS as exc:
            log.error("startup_failed", error=type(exc).__name__, reason=str(exc))
            startup.cancel_scope.cancel()
            return 1
        startup.cancel_scope.cancel()
    if stopped_by or ready is None:
        # (A signal may also land just as the start finished: it still means stop.)
        name = signal.Signals(stopped_by[0]).name if stopped_by else "cancelled"
        log.info("stopped_before_ready", signal=name)
        return 128 + stopped_by[0] if stopped_by else 1
    return ready


async def _serve_async(config: AgentConfig, channel: LogChannel) -> int:
    log = get_logger()
    async with channel.running():
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                started = await _start(nursery, config, signals, channel)
                if isinstance(started, int):
                    nursery.cancel_scope.cancel()
                    return started
                async for signum in signals:
                    log.info("stopping", signal=signal.Signals(signum).name)
                    break
                nursery.cancel_scope.cancel()
    return 0


def _run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("give the command after --")
    config = _load(args)
    channel = LogChannel(config)
    configure_logging(config.log_level, process="enclave-agent", tee=channel.tee)
    _no_core_dumps()
    return trio.run(_run_async, config, command, channel)


async def _run_async(config: AgentConfig, command: list[str], channel: LogChannel) -> int:
    async with channel.running():
        return await _run_shipping(config, command, channel)


async def _run_shipping(config: AgentConfig, command: list[str], channel: LogChannel) -> int:
    log = get_logger()
    try:
        if init.interface_up("lo"):
            log.info("loopback_up")
    except init.InitError as exc:
        # Outside an enclave lo is normally up already and we may lack CAP_NET_ADMIN.
        log.warning("loopback_not_set", reason=str(exc))
    if not init.become_subreaper():
        log.warning("not_a_subreaper", reason="orphans will be reaped by another process")
    # One receiver for the whole run, opened first: a signal during start-up stops
    # the start, and one arriving as CMD starts waits here for the supervisor.
    with trio.open_signal_receiver(*init.SUPERVISED_SIGNALS) as signals:
        async with trio.open_nursery() as nursery:
            started = await _start(
                nursery, config, signals, channel, tcp_for_sdks=config.run.sdk_env
            )
            if isinstance(started, int):
                nursery.cancel_scope.cancel()
                return started
            env = app_environment(os.environ, started, config)
            status = await init.supervise(command, env, signals, output=channel.app_output())
            nursery.cancel_scope.cancel()
    return status


def app_environment(
    base: Mapping[str, str], ready: AgentReady, config: AgentConfig
) -> dict[str, str]:
    """CMD's environment: ``base`` plus where the agent is. With the TCP listener and
    ``[run] sdk_env`` (default true), also what an AWS SDK (boto3, the AWS CLI, the
    JavaScript SDK v3, the Encryption SDK...) needs to call KMS through the agent with
    no change: the service endpoint (``AWS_ENDPOINT_URL_KMS``), the region, and
    placeholder credentials (the agent signs each request itself)."""
    env = dict(base)
    env[SOCKET_ENV] = ready.socket
    if ready.tcp is None:
        return env
    host = f"[{ready.tcp.host}]" if ":" in ready.tcp.host else ready.tcp.host
    endpoint = f"http://{host}:{ready.tcp.port}"
    env[ENDPOINT_ENV] = endpoint
    if config.run.sdk_env:
        for name in _SDK_UNSET:
            env.pop(name, None)
        env.update(
            AWS_ENDPOINT_URL_KMS=endpoint,
            AWS_REGION=config.region,
            AWS_DEFAULT_REGION=config.region,
            AWS_ACCESS_KEY_ID=PLACEHOLDER_KEY_ID,
            AWS_SECRET_ACCESS_KEY=PLACEHOLDER_SECRET,
        )
    return env


# --- app-side verbs -------------------------------------------------------------


def _context(pairs: list[str]) -> dict[str, str]:
    context: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--encryption-context wants KEY=VALUE, got {pair!r}")
        context[key] = value
    return context


def _describe(error: AgentError) -> str:
    if error.message:
        return f"{error.error_type}: {error.message}"
    hint = EMPTY_MESSAGE_HINTS.get(error.error_type)
    return f"{error.error_type} (KMS gave no message{'; ' + hint if hint else ''})"


def _ask(args: argparse.Namespace, call: Callable[[AgentClient], T]) -> T:
    """One exchange with the agent; its refusals and an unreachable socket as errors."""
    client = AgentClient(args.socket)
    try:
        with client:
            return call(client)
    except AgentError as exc:
        raise CommandFailed(_describe(exc)) from None
    except OSError as exc:
        raise CommandFailed(
            f"cannot reach the agent at {client.socket_path} ({exc.strerror or exc}); "
            f"name its socket with --socket PATH or ${SOCKET_ENV}"
        ) from None


def _write_out(data: bytes, output: Path | None) -> None:
    if output is None:
        sys.stdout.buffer.write(data)
        return
    # The mode given to open() applies only to a new file: an existing one keeps its
    # own (perhaps world-readable) mode unless narrowed before the plaintext goes in,
    # and a symlink planted at the path must not redirect it.
    try:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(data)
    except OSError as exc:
        raise CommandFailed(f"cannot write {output}: {exc.strerror}") from None


def _decrypt(args: argparse.Namespace) -> int:
    try:
        if args.ciphertext_base64 is not None:
            blob = base64.b64decode(args.ciphertext_base64, validate=True)
        elif str(args.ciphertext_file) == "-":
            blob = sys.stdin.buffer.read()
        else:
            blob = args.ciphertext_file.read_bytes()
    except (binascii.Error, ValueError):
        raise UsageError("--ciphertext-base64 is not valid base64") from None
    except OSError as exc:
        raise UsageError(f"cannot read the ciphertext: {exc}") from None
    context = _context(args.encryption_context)
    plaintext = _ask(
        args,
        lambda client: client.decrypt(blob, key_id=args.key_id, encryption_context=context or None),
    )
    _write_out(plaintext, args.output)
    return 0


def _generate_data_key(args: argparse.Namespace) -> int:
    context = _context(args.encryption_context)
    key = _ask(
        args,
        lambda client: client.generate_data_key(
            args.key_id,
            key_spec=None if args.number_of_bytes else args.key_spec,
            number_of_bytes=args.number_of_bytes,
            encryption_context=context or None,
        ),
    )
    out = {
        "KeyId": key.key_id,
        "Plaintext": base64.b64encode(key.plaintext).decode(),
        "CiphertextBlob": base64.b64encode(key.ciphertext_blob).decode(),
    }
    print(json.dumps(out))
    return 0


def _generate_random(args: argparse.Namespace) -> int:
    if not args.base64 and sys.stdout.isatty():
        raise UsageError(
            "will not write raw random bytes to a terminal: add --base64, or redirect "
            "the output (> FILE or | CMD)"
        )
    data = _ask(args, lambda client: client.generate_random(args.number_of_bytes))
    if args.base64:
        print(base64.b64encode(data).decode())
    else:
        _write_out(data, None)
    return 0


def _secret(args: argparse.Namespace) -> int:
    _write_out(_ask(args, lambda client: client.secret(args.name)), None)
    return 0

"""Helpers for tests that run real processes.

- ``run_module``: ``python -m MODULE`` run to its end, its output captured.
- ``start_proxy`` / ``ProxyProcess``: enclave-proxy as a subprocess with its own log.
- ``FaultStack``: ``devtools.devstack.DevStack`` whose proxy can be started on a
  chosen port (to restart it where the agent expects it) and with extra arguments
  (more ``--allow`` entries, a ``--config`` file).
- ``temporary_stack``: a stack in a fresh temporary directory, stopped and removed after.
- ``enclave_key`` / ``secret_toml``: a key only the stack's enclave image may use, and
  the ``[secrets.NAME]`` table of a ciphertext sealed under it.
- ``agent_config``: an agent config written by the devstack, with ``[limits]`` and
  the simulated NSM's ``fail_with`` added.
- ``AgentStack``: a started FaultStack whose agent serves secret ``db``, with the key
  and a ciphertext the tests decrypt through it.
- ``raw_exchange``: bytes in, bytes out over a Unix or TCP socket, for hostile input.
- ``events_since`` / ``find_leaks``: read JSON log events, look for secrets in blobs.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, TypeVar

import trio

from devtools.devstack import (
    DevStack,
    _Process,
    create_enclave_key,
    direct_kms_client,
    log_events,
    spawn,
)

REPO = Path(__file__).resolve().parents[2]


def run_module(
    module: str,
    *args: str,
    env: Mapping[str, str] | None = None,
    stdin: bytes | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[bytes]:
    """``python -m module *args`` from the repository's root, run to its end (whatever
    its exit status) with stdin, stdout and stderr as bytes."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        input=stdin,
        capture_output=True,
        timeout=timeout,
    )  # check=False: the caller judges the exit status


# --- enclave-proxy as a subprocess ------------------------------------------------


def proxy_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "NOTIFY_", "WATCHDOG_"))
    }
    env.update(
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=str(tmp_path / "aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "aws-credentials"),
        PYTHONPATH=str(REPO),
    )
    env.update(extra)
    return env


class ProxyProcess:
    def __init__(self, process: subprocess.Popen[bytes], log_path: Path) -> None:
        self.process = process
        self.log_path = log_path

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    async def wait_event(self, name: str, count: int = 1, timeout: float = 20) -> dict[str, Any]:
        with trio.fail_after(timeout):
            while True:
                found = [e for e in self.events() if e.get("event") == name]
                if len(found) >= count:
                    return found[count - 1]
                if self.process.poll() is not None:
                    raise AssertionError(f"proxy exited: {self.log_path.read_text()}")
                await trio.sleep(0.05)

    async def port(self) -> int:
        event = await self.wait_event("listening")
        return int(event["address"].rsplit(":", 1)[1])

    async def wait_exit(self, timeout: float = 20) -> int:
        with trio.fail_after(timeout):
            while self.process.poll() is None:
                await trio.sleep(0.05)
        return self.process.returncode


@contextmanager
def start_proxy(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[ProxyProcess]:
    log_path = tmp_path / f"proxy-{time.monotonic_ns()}.log"
    process = spawn(
        [sys.executable, "-m", "proxy.cli", *args], log_path, env or proxy_env(tmp_path)
    )
    try:
        yield ProxyProcess(process, log_path)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=20)


# --- the whole stack ----------------------------------------------------------------


@dataclass
class FaultStack(DevStack):
    """A DevStack whose proxy listens where ``proxy_listen`` says (default: port 0)
    and gets ``proxy_args`` appended (argparse: a later ``--listen`` wins)."""

    proxy_listen: str | None = None
    proxy_args: list[str] = field(default_factory=list)

    def _spawn(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> _Process:
        if name == "proxy":
            argv = [*argv, *self.proxy_args]
            if self.proxy_listen:
                argv += ["--listen", self.proxy_listen]
        return super()._spawn(name, argv, env)

    def _retire_log(self, name: str) -> None:
        # The devstack waits for "listening"/"ready" in <name>.log: a restarted process
        # must not find its predecessor's event there. Old logs stay as <name>.log.N.
        path = self.log_path(name)
        if path.exists():
            number = 1
            while path.with_name(f"{path.name}.{number}").exists():
                number += 1
            path.rename(path.with_name(f"{path.name}.{number}"))

    def stop_process(self, name: str) -> None:
        super().stop_process(name)
        self._retire_log(name)

    def all_logs(self) -> dict[str, bytes]:
        """Every log file of the run, current and retired."""
        return {p.name: p.read_bytes() for p in sorted(self.work_dir.glob("*.log*"))}

    def pid(self, name: str) -> int:
        return next(p.popen.pid for p in self.processes if p.name == name)

    def kill(self, name: str) -> None:
        """SIGKILL one process we started (by its PID) and reap it."""
        for process in [p for p in self.processes if p.name == name]:
            process.popen.kill()
            process.popen.wait(timeout=20)
            self.processes.remove(process)
        self._retire_log(name)


S = TypeVar("S", bound=DevStack)


@contextmanager
def temporary_stack(prefix: str, make: Callable[[Path], S]) -> Iterator[S]:
    """``make(work_dir)`` in a fresh temporary directory (not pytest's: a module-scoped
    fixture outlives a test's); stopped, and the directory removed, on the way out."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    dev = make(work)
    try:
        yield dev
    finally:
        dev.stop()
        shutil.rmtree(work, ignore_errors=True)


def enclave_key(dev: DevStack, pcr0: str | None = None) -> tuple[Any, str]:
    """The parent's KMS client (boto3, the stack's credentials) and a new key whose
    policy lets only the enclave image with ``pcr0`` (default: the stack's) decrypt."""
    state = dev.state()
    kms = direct_kms_client(state)
    return kms, create_enclave_key(kms, state["account_id"], pcr0 or dev.pcrs()["0"])


def secret_toml(name: str, ciphertext: bytes, *, file: Path, key_id: str = "") -> str:
    """The agent config's ``[secrets.NAME]`` table for a ciphertext given inline."""
    table = f'\n[secrets.{name}]\nciphertext = "{base64.b64encode(ciphertext).decode()}"\n'
    if key_id:
        table += f'key_id = "{key_id}"\n'
    return table + f'file = "{file}"\n'


def agent_config(
    dev: DevStack,
    name: str,
    *,
    limits: Mapping[str, float | int] | None = None,
    fail_with: str | None = None,
    kms_endpoint: str | None = None,
    secrets_toml: str = "",
) -> Path:
    """The devstack's agent config for ``name``, plus ``[limits]`` and the simulated
    NSM's ``fail_with``."""
    extra = secrets_toml
    if limits:
        extra += "\n[limits]\n" + "".join(f"{k} = {v}\n" for k, v in limits.items())
    path = dev.write_agent_config(kms_endpoint=kms_endpoint, secrets_toml=extra, name=name)
    if fail_with:
        text = path.read_text().replace(
            "[simulated_nsm]\n", f"[simulated_nsm]\nfail_with = {json.dumps(fail_with)}\n", 1
        )
        path.write_text(text)
    return path


@dataclass
class AgentStack:
    """A started FaultStack: a key only its enclave image may use, ``plaintext``
    encrypted under it (``ciphertext``), and an agent serving secret ``db``."""

    dev: FaultStack
    key_id: str
    ciphertext: bytes
    plaintext: bytes

    @classmethod
    def start(
        cls, dev: FaultStack, *, plaintext: bytes, secret: bytes, limits: Mapping[str, float]
    ) -> Self:
        """Start the whole stack, with the agent's ``[limits]``."""
        dev.start(agent=False)
        kms, key_id = enclave_key(dev)
        ciphertext = kms.encrypt(KeyId=key_id, Plaintext=plaintext)["CiphertextBlob"]
        blob = kms.encrypt(KeyId=key_id, Plaintext=secret)["CiphertextBlob"]
        db = secret_toml("db", blob, file=dev.work_dir / "tmpfs" / "db")
        dev.start_agent(agent_config(dev, "agent", limits=limits, secrets_toml=db))
        return cls(dev, key_id, ciphertext, plaintext)


# --- raw sockets --------------------------------------------------------------------


def connect(address: str | tuple[str, int], timeout: float = 10.0) -> socket.socket:
    """A blocking socket to a Unix path or a (host, port)."""
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(address)
    return sock


def read_until_closed(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    data = bytearray()
    try:
        while len(data) < limit:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (TimeoutError, ConnectionResetError, BrokenPipeError):
        pass
    return bytes(data)


def raw_exchange(
    address: str | tuple[str, int], pieces: Iterable[bytes], *, pause: float = 0.0
) -> bytes:
    """Send ``pieces`` (pausing between them), half-close, read the answer to EOF.
    A server that closes early is fine: whatever it answered is returned."""
    with connect(address) as sock:
        try:
            for piece in pieces:
                sock.sendall(piece)
                if pause:
                    time.sleep(pause)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return read_until_closed(sock)


def status_of(answer: bytes) -> int | None:
    """The status code of the first HTTP response in ``answer``, if any."""
    if not answer.startswith(b"HTTP/1.1 "):
        return None
    try:
        return int(answer[9:12])
    except ValueError:
        return None


# --- logs ---------------------------------------------------------------------------


def events_since(path: Path, offset: int) -> list[dict[str, Any]]:
    """The JSON events logged after the first ``offset`` events."""
    return log_events(path)[offset:]


def find_leaks(needles: Mapping[str, bytes], blobs: Mapping[str, bytes]) -> list[str]:
    """'<needle> in <blob>' for every needle found in any blob (needles of < 8 bytes
    would match by chance and are refused)."""
    found = []
    for label, needle in needles.items():
        assert len(needle) >= 8, f"needle {label} is too short to search for"
        for where, blob in blobs.items():
            if needle in blob:
                found.append(f"{label} in {where}")
    return found

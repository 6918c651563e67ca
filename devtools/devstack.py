"""The whole chain on one machine: local KMS ← enclave-proxy (tcp:) ← enclave-agent (simulated NSM).

``scripts/devstack --state-file FILE`` (this module's ``main``) starts, in order:

1. a simulated NSM CA (``python -m enclave_agent.simulated.nsm init-ca DIR``), which the
   agent signs attestation documents under and the local KMS trusts;
2. the local KMS stand-in (HTTPS on loopback, moto behind it), with its Secrets
   Manager, SSM and S3 endpoints (``--stores``);
3. enclave-proxy on ``tcp:127.0.0.1:0`` in place of vsock, allowing only the local
   KMS and its stores, with credentials for them from a ``credential_process``
   (short-lived, as an instance role's are) or from environment variables;
4. enclave-agent ``serve`` with ``nsm = "simulated"``, talking to KMS through the
   proxy, its app socket in the work directory, trusting every key of the local
   KMS's account (``trusted_keys = ["arn:aws:kms:REGION:ACCOUNT:key/*"]``).

Each is waited for (state file, "listening" and "ready" log events) before the
next starts; then FILE is written (atomically) with what a client needs. It runs
until SIGTERM/SIGINT, then stops what it started, by PID, newest first, and reaps
it. ``DevStack`` is the same thing as a library, for tests and the demo.

Development tooling only: the simulated NSM proves nothing and the local KMS is
not AWS.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from devtools.local_kms.admin_client import account_credentials, mint_credentials
from devtools.local_kms.policy import Caller
from enclave_agent.runtime.trusted_keys import TrustedKeys, account_entry, toml_line
from enclave_common.aws import STORE_SERVICES

REPO_ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
T = TypeVar("T")


class DevStackError(Exception):
    """A part of the stack did not start; the message carries the end of its log."""


@dataclass
class _Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def log_events(path: Path) -> list[dict[str, Any]]:
    """The JSON log lines of a file (other lines, e.g. tracebacks, are skipped)."""
    events = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                value = json.loads(line)
                if isinstance(value, dict):
                    events.append(value)
    return events


def first_event(path: Path, name: str) -> dict[str, Any] | None:
    """The first JSON log event called ``name`` in ``path``, if any yet."""
    return next((e for e in log_events(path) if e.get("event") == name), None)


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


# --- processes: the one copy of start / wait / stop that the stack, the demo and the
# --- tests share -----------------------------------------------------------------


def spawn(argv: Sequence[str], log_path: Path, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """Start ``argv`` in the repository with stdout and stderr appended to ``log_path``."""
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(
            list(argv),
            cwd=REPO_ROOT,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C on the terminal reaches us, not them
        )


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_for(
    popen: subprocess.Popen[bytes],
    check: Callable[[], T | None],
    *,
    name: str,
    what: str,
    log_path: Path,
    timeout: float = READY_TIMEOUT,
) -> T:
    """Poll ``check()`` until it gives a value; DevStackError (with the end of the log)
    if the process exits first or ``timeout`` passes. The process is left running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        if popen.poll() is not None:
            raise DevStackError(
                f"{name} exited with status {popen.returncode} before {what}; "
                f"end of {log_path}:\n{tail(log_path)}"
            )
        time.sleep(0.05)
    raise DevStackError(
        f"{name}: no {what} within {timeout:.0f} s; end of {log_path}:\n{tail(log_path)}"
    )


def stop_process(popen: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> int:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; always reaps. The exit status."""
    if popen.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            popen.send_signal(signal.SIGTERM)
        try:
            return popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                popen.kill()
    return popen.wait()


def read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None while it is absent (written atomically, so
    never half-written by its writer)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


@dataclass
class LocalKmsProcess:
    """A running ``python -m devtools.local_kms``; ``state`` is its state file's content
    plus ``"state_file"`` (the path, for the credential_process and admin client)."""

    popen: subprocess.Popen[bytes]
    log_path: Path
    state: dict[str, Any]

    def stop(self) -> int:
        return stop_process(self.popen)


def start_with_state_file(
    name: str,
    argv: Sequence[str],
    state_file: Path,
    *,
    log_path: Path,
    env: Mapping[str, str],
    timeout: float = READY_TIMEOUT,
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """Start ``argv``, which writes ``state_file`` (a JSON object) when ready, and wait
    for it. DevStackError (with the end of the log) if it does not come up; the process
    is then stopped and reaped."""
    state_file.unlink(missing_ok=True)  # a stale file from an earlier run is not readiness
    popen = spawn(argv, log_path, env)
    try:
        state = wait_for(
            popen,
            lambda: read_json_object(state_file),
            name=name,
            what="its state file",
            log_path=log_path,
            timeout=timeout,
        )
    except BaseException:
        stop_process(popen)
        raise
    return popen, state


def start_local_kms(
    state_file: Path,
    *args: str,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    python: str = sys.executable,
) -> LocalKmsProcess:
    """Start the local KMS stand-in (``args``: its options after ``--state-file``) and
    wait for its state file, as ``start_with_state_file``."""
    popen, state = start_with_state_file(
        "local KMS",
        [python, "-m", "devtools.local_kms", "--state-file", str(state_file), *args],
        state_file,
        log_path=log_path,
        env=env if env is not None else python_env(),
    )
    state["state_file"] = str(state_file)
    return LocalKmsProcess(popen, log_path, state)


@contextlib.contextmanager
def running_local_kms(
    state_file: Path, *args: str, log_path: Path, env: Mapping[str, str] | None = None
) -> Iterator[LocalKmsProcess]:
    """``start_local_kms`` for a ``with`` block; stopped and reaped on the way out."""
    kms = start_local_kms(state_file, *args, log_path=log_path, env=env)
    try:
        yield kms
    finally:
        kms.stop()


def python_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without AWS settings, for a child run from the repository."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("AWS_") and key != "ENCLAVE_AGENT_SOCKET"
    }
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    # Never let botocore probe the instance metadata address from a development box.
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    env.update(extra or {})
    return env


def _credentials(kms_state: Mapping[str, Any], account: str | None) -> tuple[str, str]:
    """The local stand-in's long-term credentials of its primary account or ``account``."""
    if account is None:
        return kms_state["aws_access_key_id"], kms_state["aws_secret_access_key"]
    return account_credentials(dict(kms_state), account)


def local_kms_client(
    kms_state: Mapping[str, Any],
    *,
    account: str | None = None,
    service: str = "kms",
    **overrides: Any,
) -> Any:
    """boto3 straight to the local KMS (its state file's content), or to one of its
    stores (``service``: "secretsmanager", "ssm", "s3"; the stand-in runs with
    ``--stores``), with the long-term credentials of its primary account or of
    ``account``, without retries (each answer is seen as given); ``overrides`` replace
    any ``boto3.client`` argument."""
    import boto3
    from botocore.config import Config

    key_id, secret = _credentials(kms_state, account)
    settings: dict[str, Any] = {
        "region_name": kms_state["region"],
        "endpoint_url": kms_state["endpoint" if service == "kms" else f"{service}_endpoint"],
        "verify": kms_state["ca_bundle"],
        "aws_access_key_id": key_id,
        "aws_secret_access_key": secret,
        "config": Config(retries={"total_max_attempts": 1, "mode": "standard"}),
    }
    settings.update(overrides)
    return boto3.client(service, **settings)


# The AWS SDKs' endpoint variable of each store the local stand-in serves (--stores).
_ENDPOINT_VARIABLES = {"secretsmanager": "SECRETS_MANAGER", "ssm": "SSM", "s3": "S3"}


def local_operator_env(
    kms_state: Mapping[str, Any], *, account: str | None = None
) -> dict[str, str]:
    """An operator's environment for ``enclave-agent seal`` (or any AWS tool) against
    the local stand-in (its state file's content): the long-term credentials of its
    primary account or of ``account``, its region and CA, the KMS endpoint and those
    of the stores it serves; no AWS configuration file of this machine."""
    key_id, secret = _credentials(kms_state, account)
    return python_env(
        {
            "AWS_ACCESS_KEY_ID": key_id,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": kms_state["region"],
            "AWS_CA_BUNDLE": kms_state["ca_bundle"],
            "AWS_ENDPOINT_URL_KMS": kms_state["endpoint"],
            **{
                f"AWS_ENDPOINT_URL_{variable}": kms_state[f"{service}_endpoint"]
                for service, variable in _ENDPOINT_VARIABLES.items()
                if kms_state.get(f"{service}_endpoint")
            },
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }
    )


def minted_kms_client(
    kms_state: Mapping[str, Any], *, account: str | None = None, principal: str | None = None
) -> Any:
    """``local_kms_client`` signing with short-lived credentials minted for ``account``
    (default: the primary) and ``principal`` (an IAM role or user ARN of it; default:
    any principal of the account)."""
    minted = json.loads(
        mint_credentials(Path(kms_state["state_file"]), 900, account=account, principal=principal)
    )
    return local_kms_client(
        kms_state,
        aws_access_key_id=minted["AccessKeyId"],
        aws_secret_access_key=minted["SecretAccessKey"],
        aws_session_token=minted["SessionToken"],
    )


@dataclass
class DevStack:
    work_dir: Path
    region: str = "us-east-1"
    credentials: str = "process"  # or "static"
    agent_tcp: bool = False
    pcr_overrides: Mapping[int, bytes] = field(default_factory=dict)
    # The local KMS's accounts (its --account flags; none: its one default account) and
    # the one whose credentials the proxy serves (None: the primary). A parent that
    # serves the agent another account's credentials is the cross-account attack.
    accounts: Sequence[str] = ()
    proxy_account: str | None = None
    # The local KMS's Secrets Manager, SSM and S3 (each its own endpoint, allowed by
    # the proxy). Off: the stand-in starts seconds sooner, the state has None for them.
    stores: bool = True
    python: str = sys.executable
    processes: list[_Process] = field(default_factory=list)
    kms: dict[str, Any] = field(default_factory=dict)
    proxy_address: str = ""
    agent_socket: str = ""
    agent_tcp_endpoint: str | None = None
    agent_config: Path | None = None

    # --- paths ------------------------------------------------------------------

    @property
    def ca_dir(self) -> Path:
        return self.work_dir / "simulated-nsm-ca"

    def log_path(self, name: str) -> Path:
        return self.work_dir / f"{name}.log"

    # --- starting ---------------------------------------------------------------

    def _env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        return python_env(extra)

    def _spawn(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> _Process:
        log_path = self.log_path(name)
        process = _Process(name, spawn(argv, log_path, env), log_path)
        self.processes.append(process)
        return process

    def _wait(
        self, process: _Process, what: str, check: Any, timeout: float = READY_TIMEOUT
    ) -> Any:
        return wait_for(
            process.popen,
            check,
            name=process.name,
            what=what,
            log_path=process.log_path,
            timeout=timeout,
        )

    def _event(self, process: _Process, name: str) -> dict[str, Any] | None:
        return first_event(process.log_path, name)

    def make_ca(self) -> None:
        subprocess.run(
            [self.python, "-m", "enclave_agent.simulated.nsm", "init-ca", str(self.ca_dir)],
            cwd=REPO_ROOT,
            env=self._env(),
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def start_kms(self) -> dict[str, Any]:
        kms = start_local_kms(
            self.work_dir / "kms-state.json",
            "--region",
            self.region,
            "--simulated-nsm-ca",
            str(self.ca_dir),
            *(argument for account in self.accounts for argument in ("--account", account)),
            *(["--stores"] if self.stores else []),
            log_path=self.log_path("kms"),
            env=self._env(),
            python=self.python,
        )
        self.processes.append(_Process("kms", kms.popen, kms.log_path))
        self.kms = kms.state
        return self.kms

    def local_endpoints(self) -> list[str]:
        """``host:port`` of the local KMS and of each of its stores."""
        urls = [self.kms["endpoint"]] + [
            self.kms[f"{service}_endpoint"]
            for service in STORE_SERVICES
            if f"{service}_endpoint" in self.kms
        ]
        return [str(url).removeprefix("https://") for url in urls]

    def start_proxy(self, allow: Sequence[str] | None = None) -> str:
        """Start the proxy allowing ``allow`` (default: the local KMS and its stores)."""
        allow = allow or self.local_endpoints()
        account = self.proxy_account or str(self.kms["account_id"])
        if self.credentials == "static":
            key_id, secret = account_credentials(self.kms, account)
            extra = {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret}
        else:
            config = self.work_dir / "proxy-aws-config"
            # One hour, as an instance role's: botocore refreshes credentials that expire
            # within 15 minutes, so a shorter lifetime would re-run the process each time.
            command = (
                f"{self.python} -m devtools.local_kms.credential_process "
                f"--state-file {self.kms['state_file']} --ttl 3600 --account {account}"
            )
            config.write_text(
                f"[default]\nregion = {self.region}\ncredential_process = {command}\n"
            )
            extra = {
                "AWS_CONFIG_FILE": str(config),
                "AWS_SHARED_CREDENTIALS_FILE": str(self.work_dir / "no-credentials-file"),
            }
        process = self._spawn(
            "proxy",
            [
                self.python,
                "-m",
                "proxy.cli",
                "--listen",
                "tcp:127.0.0.1:0",
                *(argument for entry in allow for argument in ("--allow", entry)),
                "--region",
                self.region,
            ],
            self._env(extra),
        )
        event = self._wait(process, "'listening' event", lambda: self._event(process, "listening"))
        self.proxy_address = str(event["address"])
        return self.proxy_address

    def local_account_entry(self) -> str:
        """The ``trusted_keys`` entry for every key of the local KMS's account."""
        return str(account_entry("aws", self.region, str(self.kms["account_id"])))

    def write_agent_config(
        self,
        *,
        kms_endpoint: str | None = None,
        secrets_toml: str = "",
        name: str = "agent",
        trusted_keys: Sequence[str] | None = None,
    ) -> Path:
        """The agent's config; ``trusted_keys`` default: the local account
        (``arn:aws:kms:REGION:ACCOUNT:key/*``), ``[]`` for none."""
        if trusted_keys is None:
            trusted_keys = [self.local_account_entry()]
        socket_path = self.work_dir / f"{name}.sock"
        lines = [
            f"region = {_toml_string(self.region)}",
            f"proxy = {_toml_string(self.proxy_address)}",
            f"kms_endpoint = {_toml_string(kms_endpoint or self.kms['endpoint'])}",
            *(
                f"{service}_endpoint = {_toml_string(self.kms[f'{service}_endpoint'])}"
                for service in STORE_SERVICES
                if self.kms.get(f"{service}_endpoint")
            ),
            f"ca_bundle = {_toml_string(self.kms['ca_bundle'])}",
            'nsm = "simulated"',
        ]
        if trusted_keys:
            lines.append(toml_line(TrustedKeys.parse(trusted_keys).entries))
        lines += [
            "",
            "[simulated_nsm]",
            f"ca_dir = {_toml_string(str(self.ca_dir))}",
        ]
        if self.pcr_overrides:
            pairs = ", ".join(f'{i} = "{v.hex()}"' for i, v in sorted(self.pcr_overrides.items()))
            lines.append(f"pcrs = {{ {pairs} }}")
        lines += ["", "[listen]", f"socket = {_toml_string(str(socket_path))}"]
        if self.agent_tcp:
            lines.append('tcp = "tcp:127.0.0.1:0"')
        path = self.work_dir / f"{name}.toml"
        path.write_text("\n".join(lines) + "\n" + secrets_toml)
        return path

    def start_agent(self, config: Path | None = None, *, name: str = "agent") -> str:
        config = config or self.write_agent_config(name=name)
        self.agent_config = config
        process = self._spawn(
            name,
            [self.python, "-m", "enclave_agent.cli", "serve", "--config", str(config)],
            self._env(),
        )
        event = self._wait(process, "'ready' event", lambda: self._event(process, "ready"))
        self.agent_socket = str(event["socket"])
        tcp = event.get("tcp")
        if tcp:
            host_port = str(tcp).removeprefix("tcp:")
            self.agent_tcp_endpoint = f"http://{host_port}"
        return self.agent_socket

    def start(self, *, agent: bool = True) -> dict[str, Any]:
        """CA, local KMS, proxy and (unless ``agent`` is false) the agent; returns the
        state (also what FILE gets). What started is stopped if a part fails."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.make_ca()
            self.start_kms()
            self.start_proxy()
            if agent:
                self.start_agent()
        except BaseException:
            self.stop()
            raise
        return self.state()

    def pcrs(self) -> dict[str, str]:
        from enclave_agent.simulated.nsm import DEFAULT_SIMULATED_PCRS

        values = dict(DEFAULT_SIMULATED_PCRS)
        values.update(self.pcr_overrides)
        return {str(index): value.hex() for index, value in sorted(values.items())}

    def state(self) -> dict[str, Any]:
        return {
            "agent_socket": self.agent_socket,
            "agent_tcp_endpoint": self.agent_tcp_endpoint,
            "agent_config": str(self.agent_config) if self.agent_config else None,
            "kms_endpoint": self.kms["endpoint"],
            **{
                f"{service}_endpoint": self.kms.get(f"{service}_endpoint")
                for service in STORE_SERVICES
            },
            "kms_ca_bundle": self.kms["ca_bundle"],
            "kms_state_file": self.kms["state_file"],
            "region": self.region,
            "account_id": self.kms.get("account_id"),
            "proxy_account": self.proxy_account or self.kms.get("account_id"),
            "aws_access_key_id": self.kms["aws_access_key_id"],
            "aws_secret_access_key": self.kms["aws_secret_access_key"],
            "pcrs": self.pcrs(),
            "proxy_address": self.proxy_address,
            "simulated_nsm_ca": str(self.ca_dir),
            "work_dir": str(self.work_dir),
            **{f"{p.name}_log": str(p.log_path) for p in self.processes},
            "pids": {p.name: p.popen.pid for p in self.processes},
        }

    # --- stopping ---------------------------------------------------------------

    def stop_process(self, name: str) -> None:
        for process in [p for p in self.processes if p.name == name]:
            self._stop(process)
            self.processes.remove(process)

    @staticmethod
    def _stop(process: _Process) -> None:
        stop_process(process.popen)

    def stop(self) -> None:
        """Stop everything started, newest first (agent, proxy, KMS), and reap it."""
        while self.processes:
            self._stop(self.processes.pop())

    def dead(self) -> list[str]:
        return [p.name for p in self.processes if p.popen.poll() is not None]


def stack_kms_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """What a devstack state file says of its local KMS, in the shape of the local
    KMS's own state (what ``local_kms_client`` and ``local_operator_env`` take)."""
    return {
        "region": state["region"],
        "endpoint": state["kms_endpoint"],
        **{f"{name}_endpoint": state.get(f"{name}_endpoint") for name in STORE_SERVICES},
        "ca_bundle": state["kms_ca_bundle"],
        "aws_access_key_id": state["aws_access_key_id"],
        "aws_secret_access_key": state["aws_secret_access_key"],
    }


def direct_kms_client(state: Mapping[str, Any], service: str = "kms") -> Any:
    """boto3 straight to the local KMS (or one of its stores, ``service``) with the
    stack's credentials: what the parent instance (or anyone holding the role's
    credentials) can do without an enclave."""
    return local_kms_client(
        stack_kms_state(state),
        service=service,
        config=None,  # botocore's default retries, as an operator's client has
    )


def local_operator_arn(account_id: str) -> str:
    """The IAM identity the local KMS gives its credentials (it names it in its
    AccessDeniedException messages): the operator who encrypts the stack's secrets."""
    return Caller(account_id).arn


def enclave_key_policy(account_id: str, pcr0_hex: str) -> dict[str, Any]:
    """AWS's example policy (enclave_agent.operator.key_policy): the role may Decrypt and
    GenerateDataKey only from an enclave whose image measures ``pcr0_hex``; the
    account keeps administration, never Decrypt; the operator may Encrypt."""
    from enclave_agent.operator.key_policy import Measurements, build_key_policy

    return build_key_policy(
        Measurements(pcrs={0: pcr0_hex}),
        f"arn:aws:iam::{account_id}:role/enclave-parent-instance",
        operations=["Decrypt", "GenerateDataKey", "GenerateDataKeyPair"],
        encrypt_principal=local_operator_arn(account_id),
    )


def create_enclave_key(kms: Any, account_id: str, pcr0_hex: str, description: str = "") -> str:
    answer = kms.create_key(
        Policy=json.dumps(enclave_key_policy(account_id, pcr0_hex)),
        Description=description or "devstack: usable only from the enclave image PCR0",
    )
    return str(answer["KeyMetadata"]["KeyId"])


def _parse_pcr(text: str) -> tuple[int, bytes]:
    index, sep, value = text.partition("=")
    try:
        raw = bytes.fromhex(value)
        if not sep or not index.isdigit() or not 0 <= int(index) <= 15 or len(raw) != 48:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected INDEX=96-HEX-DIGITS, got {text!r}") from None
    return int(index), raw


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/devstack",
        description="Run local KMS + enclave-proxy + enclave-agent (simulated NSM) on this "
        "machine until SIGTERM/SIGINT.",
    )
    parser.add_argument("--state-file", type=Path, required=True, help="JSON written when ready")
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="logs, sockets, the simulated CA (default: a new temporary folder, removed "
        "when the stack stops; a folder given here is kept)",
    )
    parser.add_argument("--region", default="us-east-1")
    parser.add_argument(
        "--credentials",
        choices=["process", "static"],
        default="process",
        help="how the proxy gets AWS credentials for the local KMS: a credential_process "
        "minting short-lived ones (default) or environment variables",
    )
    parser.add_argument("--agent-tcp", action="store_true", help="also a loopback TCP listener")
    parser.add_argument(
        "--account",
        action="append",
        default=[],
        metavar="ID",
        help="an account of the local KMS (repeatable, the first is the primary; "
        "default: its one account 111122223333)",
    )
    parser.add_argument(
        "--proxy-account",
        metavar="ID",
        help="serve the agent this account's credentials (default: the primary); "
        "another account than the image trusts is the cross-account attack",
    )
    parser.add_argument("--pcr", type=_parse_pcr, action="append", default=[], metavar="N=HEX")
    args = parser.parse_args(argv)

    state_file: Path = args.state_file.resolve()
    if not state_file.parent.is_dir() or not os.access(state_file.parent, os.W_OK):
        print(
            f"devstack: cannot write the state file {state_file}: its folder "
            f"{state_file.parent} does not exist or is not writable",
            file=sys.stderr,
        )
        return 2
    temporary = args.work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix="devstack-")) if temporary else args.work_dir
    stack = DevStack(
        work_dir=work_dir.resolve(),
        region=args.region,
        credentials=args.credentials,
        agent_tcp=args.agent_tcp,
        pcr_overrides=dict(args.pcr),
        accounts=args.account,
        proxy_account=args.proxy_account,
    )
    stopping: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    status = 0
    try:
        print(
            f"devstack: starting; logs, sockets and the simulated CA in {work_dir}", file=sys.stderr
        )
        state = stack.start()
        _write_atomically(state_file, json.dumps(state, indent=2) + "\n")
        print(
            f"devstack: ready; state in {state_file}; agent socket {state['agent_socket']}; "
            f"logs {', '.join(p.log_path.name for p in stack.processes)} in {work_dir}; "
            "stop with Ctrl-C or SIGTERM",
            file=sys.stderr,
        )
        while not stopping:
            dead = stack.dead()
            if dead:
                print(f"devstack: {', '.join(dead)} exited; stopping", file=sys.stderr)
                status = 1
                break
            time.sleep(0.2)
    except DevStackError as exc:
        print(f"devstack: {exc}", file=sys.stderr)
        status = 1
    except OSError as exc:  # the state file could not be written after all
        print(
            f"devstack: cannot write the state file {state_file}: {exc.strerror}", file=sys.stderr
        )
        status = 1
    finally:
        stack.stop()
        state_file.unlink(missing_ok=True)
        # The temporary folder holds the simulated CA's private key: it goes with the stack.
        if temporary:
            shutil.rmtree(work_dir, ignore_errors=True)
        print(
            f"devstack: stopped; {'removed' if temporary else 'kept'} {work_dir}", file=sys.stderr
        )
    return status


if __name__ == "__main__":
    sys.exit(main())

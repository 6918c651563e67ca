"""The main job, on one machine: a secret only the measured enclave can read.

Run by ``scripts/demo`` (after ``scripts/setup``). Each step is printed:

1. start the stack (``scripts/devstack``): local KMS, enclave-proxy on tcp: in place
   of vsock, enclave-agent with the simulated NSM;
2. create a KMS key whose policy follows AWS's example: Decrypt only with an
   attestation document whose ImageSha384 (PCR0) is the enclave image's;
3. encrypt a secret with boto3, as an operator outside the enclave would;
4. an app reads it through the agent (``enclave_agent.client`` and the CLI verb);
5. the same credentials, used directly without attestation, are denied;
6. the operator seals a second secret into Secrets Manager (``enclave-agent seal``);
7. an agent whose config reads it ``from`` Secrets Manager (refreshed every second)
   serves it to the app, with the version the store reports;
8. the operator seals a new value (rotation): the app's long-poll
   (``?after=VERSION&wait=...``) wakes with the new value and version;
9. the parent reads the store directly: ``GetSecretValue`` gives only the sealed
   ciphertext, which KMS will not open for it, even with the right context;
10. the stack is stopped, and its logs show the proxy relayed only TLS bytes: it
   logged sizes, and no secret (raw or base64) is in any log of any process.

The stack is always stopped, even when a step fails. Exit status 0 when every
step showed what it should.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from devtools.devstack import (
    REPO_ROOT,
    DevStackError,
    create_enclave_key,
    direct_kms_client,
    first_event,
    local_operator_env,
    log_events,
    python_env,
    spawn,
    stack_kms_state,
    start_with_state_file,
    stop_process,
    wait_for,
)

START_TIMEOUT = 120.0


class DemoFailed(Exception):
    pass


def step(number: int, text: str) -> None:
    print(f"\n[{number}] {text}", flush=True)


def detail(text: str) -> None:
    print(f"    {text}", flush=True)


def start_devstack(work: Path) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    state_file = work / "devstack.json"
    argv = [sys.executable, "-m", "devtools.devstack", "--state-file", str(state_file)]
    try:
        return start_with_state_file(
            "the stack",
            [*argv, "--work-dir", str(work / "stack")],
            state_file,
            log_path=work / "devstack.err",
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            timeout=START_TIMEOUT,
        )
    except DevStackError as exc:
        raise DemoFailed(str(exc)) from exc


def stop_devstack(process: subprocess.Popen[bytes]) -> None:
    stop_process(process, timeout=30)


def seal(state: dict[str, Any], name: str, key_id: str, to: str, value: bytes) -> dict[str, Any]:
    """``enclave-agent seal NAME --key-id KEY --to TO`` with the value on stdin."""
    result = subprocess.run(
        [sys.executable, "-m", "enclave_agent.cli", "seal", name, "--key-id", key_id, "--to", to],
        input=value,
        cwd=REPO_ROOT,
        env=local_operator_env(stack_kms_state(state)),
        capture_output=True,
        timeout=60,
    )
    if result.returncode != 0:
        raise DemoFailed(f"enclave-agent seal failed: {result.stderr.decode()}")
    written: dict[str, Any] = json.loads(result.stdout)
    return written


def start_store_agent(
    work: Path, state: dict[str, Any], source: str
) -> tuple[subprocess.Popen[bytes], str, Path]:
    """An agent like the stack's, reading the secret db_password ``from`` ``source``,
    refreshed every second; (process, socket, log)."""
    socket_path = str(work / "stores-agent.sock")
    config = work / "stores-agent.toml"
    text = Path(state["agent_config"]).read_text().replace(state["agent_socket"], socket_path)
    config.write_text(f'{text}\n[secrets.db_password]\nfrom = "{source}"\nrefresh = 1\n')
    log_path = work / "stores-agent.log"
    argv = [sys.executable, "-m", "enclave_agent.cli", "serve", "--config", str(config)]
    process = spawn(argv, log_path, python_env())
    try:
        wait_for(
            process,
            lambda: first_event(log_path, "ready"),
            name="the agent reading Secrets Manager",
            what="'ready' event",
            log_path=log_path,
        )
    except DevStackError as exc:
        stop_process(process)
        raise DemoFailed(str(exc)) from exc
    return process, socket_path, log_path


def denied(call: Callable[[], object], if_allowed: str) -> dict[str, str]:
    """The error of a KMS call that must be refused with AccessDeniedException; any
    other answer fails the demo (``if_allowed`` says what a success would mean)."""
    from botocore.exceptions import ClientError

    try:
        call()
    except ClientError as exc:
        error: dict[str, str] = exc.response["Error"]
        if error["Code"] != "AccessDeniedException":
            raise DemoFailed(f"expected AccessDeniedException, got {error['Code']}") from exc
        return error
    raise DemoFailed(if_allowed)


def run_demo(work: Path) -> None:
    marker = f"demo-secret-{secrets.token_hex(12)}".encode()
    stored = f"db-password-{secrets.token_hex(12)}".encode()
    rotated = f"db-password-{secrets.token_hex(12)}".encode()
    store_agent: subprocess.Popen[bytes] | None = None
    store_log = work / "stores-agent.log"

    step(1, "Start the stack: local KMS, enclave-proxy (tcp: in place of vsock), enclave-agent")
    process, state = start_devstack(work)
    try:
        detail(f"local KMS      {state['kms_endpoint']} (TLS, SigV4, moto behind it)")
        detail(f"enclave-proxy  {state['proxy_address']} (credentials from a credential_process)")
        detail(f"enclave-agent  {state['agent_socket']} (SIMULATED NSM: development only)")
        pcr0 = state["pcrs"]["0"]
        detail(f"enclave image measurement PCR0 = {pcr0[:32]}...")

        step(2, "Create a KMS key whose policy admits only that enclave image (AWS's example)")
        kms = direct_kms_client(state)
        key_id = create_enclave_key(kms, state["account_id"], pcr0, "demo key")
        policy = json.loads(kms.get_key_policy(KeyId=key_id, PolicyName="default")["Policy"])
        for statement in policy["Statement"]:
            condition = statement.get("Condition", {}).get("StringEqualsIgnoreCase", {})
            actions = statement["Action"]
            actions = actions if isinstance(actions, list) else [actions]
            shown = ", ".join(a for a in actions if "crypt" in a or "Generate" in a)
            if condition:
                detail(f"{statement['Sid']}: {shown} only if {', '.join(condition)} matches")
            elif shown:
                detail(f"{statement['Sid']}: {shown} for {statement['Principal']['AWS']} only")
            else:
                detail(f"{statement['Sid']}: administration only, no Encrypt or Decrypt")
        detail(f"key {key_id}")

        step(3, "Encrypt a secret with boto3, outside the enclave")
        ciphertext = kms.encrypt(KeyId=key_id, Plaintext=marker)["CiphertextBlob"]
        detail(f"secret {marker.decode()!r} → CiphertextBlob of {len(ciphertext)} bytes")

        step(4, "An app in the enclave reads it through the agent")
        from enclave_agent.client import AgentClient

        with AgentClient(state["agent_socket"]) as client:
            plaintext = client.decrypt(ciphertext)
        if plaintext != marker:
            raise DemoFailed("the agent answered a different plaintext")
        detail(f"enclave_agent.client.decrypt(...) → {plaintext.decode()!r}")
        blob_file = work / "secret.ciphertext"
        blob_file.write_bytes(ciphertext)
        cli = subprocess.run(
            [
                sys.executable,
                "-m",
                "enclave_agent.cli",
                "decrypt",
                "--socket",
                state["agent_socket"],
                "--ciphertext-file",
                str(blob_file),
            ],
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            capture_output=True,
            timeout=60,
        )
        if cli.returncode != 0 or cli.stdout != marker:
            raise DemoFailed(f"enclave-agent decrypt failed: {cli.stderr.decode()}")
        detail(f"enclave-agent decrypt --ciphertext-file ... → {cli.stdout.decode()!r}")
        detail("(the agent attested with the NSM, KMS encrypted the answer to the agent's key)")

        step(5, "The same credentials without an attestation document are denied")
        error = denied(
            lambda: kms.decrypt(CiphertextBlob=ciphertext),
            "KMS decrypted without attestation: the key policy is wrong",
        )
        detail(f"boto3 kms.decrypt(...) → {error['Code']}")
        detail(f"  {error['Message'][:110]}...")

        step(6, "Seal a secret into Secrets Manager (enclave-agent seal), as the operator")
        written = seal(state, "db_password", key_id, "secretsmanager:demo/db_password", stored)
        detail(
            "enclave-agent seal db_password --to secretsmanager:demo/db_password → "
            f"{written['form']} form, {written['sealed_bytes']} bytes"
        )
        detail(f"from = {written['from']!r}")

        step(7, "An agent reads it from Secrets Manager (through the proxy) for the app")
        store_agent, socket_path, store_log = start_store_agent(work, state, written["from"])
        with AgentClient(socket_path) as client:
            first = client.secret_version("db_password")
        if first.value != stored or first.version != written["version_id"]:
            raise DemoFailed("the agent served another value or version than the store holds")
        detail(f"GET /v1/secrets/db_password → {first.value.decode()!r}")
        detail(f"  X-Secret-Version: {first.version}")

        step(8, "Rotate: seal a new value; the app's long-poll wakes with it")
        woken: list[Any] = []

        def long_poll() -> None:
            with AgentClient(socket_path) as client:
                woken.append(client.secret_version("db_password", after=first.version, wait=30))

        poll = threading.Thread(target=long_poll)
        started = time.monotonic()
        poll.start()
        detail(f"GET /v1/secrets/db_password?after={first.version}&wait=30 (held)")
        second = seal(state, "db_password", key_id, "secretsmanager:demo/db_password", rotated)
        poll.join(40)
        if not woken or woken[0].value != rotated or woken[0].version != second["version_id"]:
            raise DemoFailed("the long-poll did not wake with the rotated value")
        detail(f"sealed again → version {second['version_id']}")
        detail(
            f"the long-poll woke after {time.monotonic() - started:.1f} s → "
            f"{woken[0].value.decode()!r}, X-Secret-Version: {woken[0].version}"
        )

        step(9, "The parent reads the store itself: only ciphertext it cannot open")
        sealed = direct_kms_client(state, "secretsmanager").get_secret_value(
            SecretId=written["arn"]
        )["SecretBinary"]
        if rotated in sealed or base64.b64encode(rotated) in sealed:
            raise DemoFailed("the store holds the value in the clear")
        detail(
            "boto3 secretsmanager.get_secret_value(...) → SecretBinary of "
            f"{len(sealed)} bytes, {sealed[:12].hex()}..."
        )
        error = denied(
            lambda: kms.decrypt(
                CiphertextBlob=sealed, EncryptionContext={"enclave-kms:secret": "db_password"}
            ),
            "KMS opened the sealed secret without attestation",
        )
        detail(
            "boto3 kms.decrypt(it, EncryptionContext={'enclave-kms:secret': "
            f"'db_password'}}) → {error['Code']}"
        )
    finally:
        if store_agent is not None:
            stop_process(store_agent)
        stop_devstack(process)

    step(10, "Stack stopped: the proxy carried only ciphertext")
    logs = {name: Path(state[f"{name}_log"]) for name in ("kms", "proxy", "agent")}
    logs["stores agent"] = store_log
    tunnels = [
        e for e in log_events(logs["proxy"]) if e.get("method") == "CONNECT" and "bytes_up" in e
    ]
    if not tunnels:
        raise DemoFailed("the proxy logged no tunnel")
    sent = sum(int(e["bytes_up"]) for e in tunnels)
    received = sum(int(e["bytes_down"]) for e in tunnels)
    targets = ", ".join(sorted({str(e["target"]) for e in tunnels}))
    detail(
        f"proxy relayed {len(tunnels)} TLS tunnel(s) to {targets} (KMS, Secrets Manager): "
        f"{sent} bytes up, {received} bytes down; it never held a TLS key"
    )
    needles = [
        form for value in (marker, stored, rotated) for form in (value, base64.b64encode(value))
    ]
    for name, path in logs.items():
        content = path.read_bytes()
        found = [n for n in needles if n in content]
        if found:
            raise DemoFailed(f"the secret appears in the {name} log ({path})")
        detail(f"{name} log: {len(content.splitlines())} lines, no trace of the secrets")
    print("\nDemo complete: only the attested enclave could read the secrets.", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__.split("\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs) afterwards")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="enclave-kms-demo-"))
    try:
        run_demo(work)
    except DemoFailed as exc:
        print(f"\ndemo FAILED: {exc}", file=sys.stderr)
        print(f"logs kept in {work}", file=sys.stderr)
        return 1
    if args.keep:
        print(f"logs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

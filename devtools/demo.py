"""The main job, on one machine: a secret only the measured enclave can read.

Run by ``scripts/demo`` (after ``scripts/setup``). Each step is printed:

1. start the stack (``scripts/devstack``): local KMS, enclave-proxy on tcp: in place
   of vsock, enclave-agent with the simulated NSM;
2. create a KMS key whose policy follows AWS's example: Decrypt only with an
   attestation document whose ImageSha384 (PCR0) is the enclave image's;
3. encrypt a secret with boto3, as an operator outside the enclave would;
4. an app reads it through the agent (``enclave_agent.client`` and the CLI verb);
5. the same credentials, used directly without attestation, are denied;
6. the stack is stopped, and its logs show the proxy relayed only TLS bytes: it
   logged sizes, and the secret (raw or base64) is in no log of any process.

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from devtools.devstack import (
    REPO_ROOT,
    DevStackError,
    create_enclave_key,
    direct_kms_client,
    log_events,
    start_with_state_file,
    stop_process,
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


def run_demo(work: Path) -> None:
    marker = f"demo-secret-{secrets.token_hex(12)}".encode()

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
        from botocore.exceptions import ClientError

        try:
            kms.decrypt(CiphertextBlob=ciphertext)
        except ClientError as exc:
            error = exc.response["Error"]
            if error["Code"] != "AccessDeniedException":
                raise DemoFailed(f"expected AccessDeniedException, got {error['Code']}") from exc
            detail(f"boto3 kms.decrypt(...) → {error['Code']}")
            detail(f"  {error['Message'][:110]}...")
        else:
            raise DemoFailed("KMS decrypted without attestation: the key policy is wrong")
    finally:
        stop_devstack(process)

    step(6, "Stack stopped: the proxy carried only ciphertext")
    logs = {name: Path(state[f"{name}_log"]) for name in ("kms", "proxy", "agent")}
    tunnels = [
        e for e in log_events(logs["proxy"]) if e.get("method") == "CONNECT" and "bytes_up" in e
    ]
    if not tunnels:
        raise DemoFailed("the proxy logged no tunnel")
    sent = sum(int(e["bytes_up"]) for e in tunnels)
    received = sum(int(e["bytes_down"]) for e in tunnels)
    detail(
        f"proxy relayed {len(tunnels)} TLS tunnel(s) to {tunnels[0]['target']}: "
        f"{sent} bytes up, {received} bytes down; it never held a TLS key"
    )
    needles = (marker, base64.b64encode(marker))
    for name, path in logs.items():
        content = path.read_bytes()
        found = [n for n in needles if n in content]
        if found:
            raise DemoFailed(f"the secret appears in the {name} log ({path})")
        detail(f"{name} log: {len(content.splitlines())} lines, no trace of the secret")
    print("\nDemo complete: only the attested enclave could read the secret.", flush=True)


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

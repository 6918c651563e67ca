"""The example enclave app: reads one named secret from enclave-agent and proves it.

It uses the agent's client library (``enclave_agent.client``, standard library
only, installed in the image with the agent) over the Unix socket named by
ENCLAVE_AGENT_SOCKET; docs/agent.md shows the HTTP an app in another language sends.

    python3 example_app.py NAME [--print-attestation] [--hold]

It prints the secret's length and the first 8 hex digits of its SHA-256, never the
secret: enough to compare with the plaintext you sealed (``sha256sum``), while
32 bits say little about the value; and the version the agent serves it under (for
a sealed file of the image, the file's digest, as ``enclave-agent seal`` printed
it). ``--print-attestation`` first prints an attestation document (base64) for
``enclave-agent verify-attestation``.
``--hold`` keeps running after success, so that a production enclave (which has
no console) shows success as State RUNNING in ``nitro-cli describe-enclaves``;
on failure the app exits 1, and with it the agent and the enclave.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import secrets
import signal
import sys
import urllib.parse

from enclave_agent.client import AgentClient, AgentError, SecretVersion

PROG = "example-app"


class Failed(Exception):
    pass


def read_secret(path: str, name: str, *, print_attestation: bool) -> SecretVersion:
    """The secret ``name`` and its version, after printing an attestation document if
    asked."""
    with AgentClient(path, timeout=60.0) as agent:
        request = "POST /v1/attestation"
        try:
            if print_attestation:
                document = agent.attestation(nonce=secrets.token_bytes(32))
                print(f"{PROG}: attestation document: {base64.b64encode(document).decode()}")
            request = f"GET /v1/secrets/{urllib.parse.quote(name, safe='')}"
            return agent.secret_version(name)
        except AgentError as error:
            # KMS's error shape: "AccessDeniedException: ..."
            raise Failed(f"{request} answered {error.status} ({error})") from None
        except OSError as error:
            raise Failed(f"cannot reach the agent at {path}: {error}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("name", help="the secret's name in the agent's configuration")
    parser.add_argument("--print-attestation", action="store_true")
    parser.add_argument("--hold", action="store_true", help="keep running after success")
    args = parser.parse_args(argv)

    path = os.environ.get("ENCLAVE_AGENT_SOCKET")
    if not path:
        print(f"{PROG}: FAILED: ENCLAVE_AGENT_SOCKET is not set (run me under "
              "'enclave-agent run -- ...')", file=sys.stderr)  # fmt: skip
        return 1
    try:
        secret = read_secret(path, args.name, print_attestation=args.print_attestation)
    except Failed as error:
        print(f"{PROG}: FAILED: {error}", file=sys.stderr)
        return 1
    digest = hashlib.sha256(secret.value).hexdigest()[:8]
    print(
        f"{PROG}: OK: secret {args.name!r} read, {len(secret.value)} bytes, sha256 {digest}..., "
        f"version {secret.version}"
    )
    sys.stdout.flush()
    if args.hold:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: sys.exit(0))
        while True:
            signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main())

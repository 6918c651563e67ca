"""The example enclave app: reads one named secret from enclave-agent and proves it.

Standard library only, to show the whole protocol an app in any language needs:
HTTP/1.1 over the Unix socket named by ENCLAVE_AGENT_SOCKET.

    python3 example_app.py NAME [--print-attestation] [--hold]

It prints the secret's length and the first 8 hex digits of its SHA-256, never the
secret: enough to compare with the plaintext you encrypted (``sha256sum``), while
32 bits say little about the value. ``--print-attestation`` first prints an
attestation document (base64) for ``enclave-agent verify-attestation``.
``--hold`` keeps running after success, so that a production enclave (which has
no console) shows success as State RUNNING in ``nitro-cli describe-enclaves``;
on failure the app exits 1, and with it the agent and the enclave.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import json
import os
import secrets
import signal
import socket
import sys
import urllib.parse

PROG = "example-app"


class AgentConnection(http.client.HTTPConnection):
    """HTTP/1.1 to the agent over its Unix socket."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class AgentError(Exception):
    pass


def call(path: str, method: str, target: str, body: bytes | None = None) -> bytes:
    connection = AgentConnection(path, timeout=60.0)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        connection.request(method, target, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read()
    except OSError as error:
        raise AgentError(f"cannot reach the agent at {path}: {error}") from None
    finally:
        connection.close()
    if response.status != 200:
        # Errors come in KMS's shape: {"__type": ..., "message": ...}.
        try:
            detail = json.loads(data)
            reason = f"{detail.get('__type', '?')}: {detail.get('message', '')}"
        except (ValueError, AttributeError):
            reason = data[:200].decode("utf-8", "replace")
        raise AgentError(f"{method} {target} answered {response.status} ({reason})")
    return data


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
        if args.print_attestation:
            nonce = base64.b64encode(secrets.token_bytes(32)).decode()
            document = call(path, "POST", "/v1/attestation", json.dumps({"nonce": nonce}).encode())
            print(f"{PROG}: attestation document: {base64.b64encode(document).decode()}")
        value = call(path, "GET", f"/v1/secrets/{urllib.parse.quote(args.name, safe='')}")
    except AgentError as error:
        print(f"{PROG}: FAILED: {error}", file=sys.stderr)
        return 1
    digest = hashlib.sha256(value).hexdigest()[:8]
    print(f"{PROG}: OK: secret {args.name!r} read, {len(value)} bytes, sha256 {digest}...")
    sys.stdout.flush()
    if args.hold:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: sys.exit(0))
        while True:
            signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main())

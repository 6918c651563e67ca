"""Unmodified AWS SDK apps under ``enclave-agent run``, against the real KMS path.

Each app is written as it would be for AWS KMS itself: no endpoint, region or
credentials in its code or in any config file (HOME is an empty folder). The
environment ``run`` gives it is all it has. The chain is the local stack's: the agent
(simulated NSM) → enclave-proxy → the local KMS, which decrypts only for the image's
PCR0 (the key policy) and answers under a Recipient the agent opens.

Covered: boto3, the AWS CLI v1, the AWS Encryption SDK for Python (one KMS key:
GenerateDataKey and Decrypt) and the AWS SDK for JavaScript v3 (where node and the
package from ``scripts/setup`` are there). Encrypting under several keys with the
Encryption SDK needs KMS ``Encrypt``, which the agent serves once it passes
operations through (issue 13, the operations half).
"""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devtools.devstack import DevStack
from tests.conftest import REPO_ROOT
from tests.support.stack import enclave_key, temporary_stack

AGENT = [sys.executable, "-m", "enclave_agent.cli"]
JS_DIR = REPO_ROOT / "tests" / "sdk_js"
MARKER = "sdk-dropin-" + secrets.token_hex(12)


@dataclass
class Stack:
    dev: DevStack
    config: Path
    blob: Path  # MARKER encrypted under key_arn by the operator (KMS directly)
    key_arn: str
    home: Path  # an empty HOME: no ~/.aws for any SDK to read


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with temporary_stack("sdk-dropin-", DevStack) as dev:
        dev.start(agent=False)
        kms, key_id = enclave_key(dev)
        key_arn = kms.describe_key(KeyId=key_id)["KeyMetadata"]["Arn"]
        blob = dev.work_dir / "secret.bin"
        blob.write_bytes(kms.encrypt(KeyId=key_id, Plaintext=MARKER.encode())["CiphertextBlob"])
        home = dev.work_dir / "home"
        home.mkdir()
        yield Stack(dev, dev.write_agent_config(), blob, key_arn, home)


def run_app(
    stack: Stack, *command: str, image_env: dict[str, str] | None = None
) -> tuple[str, str]:
    """``enclave-agent run -- COMMAND`` with nothing in the environment but a PATH, an
    empty HOME and ``image_env`` (what the image's own environment adds); (the app's
    stdout, the agent's and the app's stderr)."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(stack.home), "LANG": "C.UTF-8"}
    env.update(image_env or {})
    result = subprocess.run(
        [*AGENT, "run", "--config", str(stack.config), "--", *command],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        timeout=120,
    )
    out, err = result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace")
    assert result.returncode == 0, err
    # The agent logged the app's requests, never what it handed back.
    assert MARKER not in err and base64.b64encode(MARKER.encode()).decode() not in err
    return out, err


BOTO3_APP = """
import sys, boto3
kms = boto3.client("kms")
blob = open(sys.argv[1], "rb").read()
print(kms.decrypt(CiphertextBlob=blob)["Plaintext"].decode())
key = kms.generate_data_key(KeyId=sys.argv[2], KeySpec="AES_256")
assert len(key["Plaintext"]) == 32 and key["KeyId"] == sys.argv[2], key["KeyId"]
again = kms.decrypt(CiphertextBlob=key["CiphertextBlob"])["Plaintext"]
assert again == key["Plaintext"]
try:
    kms.decrypt(CiphertextBlob=b"not a ciphertext" * 4)
except kms.exceptions.ClientError as exc:  # KMS's error, in the SDK's usual shape
    print("refused:", exc.response["Error"]["Code"])
"""


def test_boto3(stack: Stack) -> None:
    out, _ = run_app(stack, sys.executable, "-c", BOTO3_APP, str(stack.blob), stack.key_arn)
    assert out.splitlines() == [MARKER, "refused: AccessDeniedException"]


def test_aws_cli_v1(stack: Stack) -> None:
    aws = str(Path(sys.executable).parent / "aws")
    out, _ = run_app(
        stack,
        aws,
        "kms",
        "decrypt",
        "--ciphertext-blob",
        f"fileb://{stack.blob}",
        "--query",
        "Plaintext",
        "--output",
        "text",
    )
    assert base64.b64decode(out.strip()).decode() == MARKER


ENCRYPTION_SDK_APP = """
import sys
import aws_encryption_sdk
from aws_encryption_sdk import CommitmentPolicy

client = aws_encryption_sdk.EncryptionSDKClient(
    commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
)
strict = aws_encryption_sdk.StrictAwsKmsMasterKeyProvider(key_ids=[sys.argv[1]])
message, _ = client.encrypt(
    source=sys.argv[2].encode(), key_provider=strict, encryption_context={"app": "dropin"}
)
plaintext, header = client.decrypt(source=message, key_provider=strict)
assert header.encryption_context["app"] == "dropin"
print(plaintext.decode())
discovery = aws_encryption_sdk.DiscoveryAwsKmsMasterKeyProvider()
print(client.decrypt(source=message, key_provider=discovery)[0].decode())
"""


def test_aws_encryption_sdk_with_one_kms_key(stack: Stack) -> None:
    # GenerateDataKey to encrypt, Decrypt to decrypt (strict and discovery providers).
    out, _ = run_app(stack, sys.executable, "-c", ENCRYPTION_SDK_APP, stack.key_arn, MARKER)
    assert out.splitlines() == [MARKER, MARKER]


def test_javascript_sdk_v3(stack: Stack) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("no node on PATH: the JavaScript SDK test needs Node.js 20 or newer")
    if not (JS_DIR / "node_modules" / "@aws-sdk" / "client-kms").is_dir():
        pytest.skip("@aws-sdk/client-kms is not installed: scripts/setup installs it with npm")
    out, _ = run_app(stack, node, str(JS_DIR / "dropin.js"), str(stack.blob), stack.key_arn)
    answer = json.loads(out.strip().splitlines()[-1])
    assert answer == {"plaintext": MARKER, "dataKeyBytes": 32, "dataKeyId": stack.key_arn}
    # (The app signed with the placeholder credentials; KMS checked the agent's signature.)


# Decrypts, then says whether the image's own bypass still holds.
DECRYPT_APP = """
import sys, urllib.request, boto3
blob = open(sys.argv[1], "rb").read()
print(boto3.client("kms").decrypt(CiphertextBlob=blob)["Plaintext"].decode())
print(urllib.request.proxy_bypass_environment("example.com"))
"""


class Forwarder:
    """A forwarding HTTP proxy an image routes its HTTP through (``HTTP_PROXY``), played
    by the parent: it keeps every request and answers each one as KMS would, with a
    plaintext of its own choosing."""

    PLANTED = b"planted-by-the-parent"

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.requests: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def _serve(self) -> None:
        body = json.dumps({"Plaintext": base64.b64encode(self.PLANTED).decode()}).encode()
        answer = (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.1\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        )
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed: the test is over
                return
            with client:
                client.settimeout(10)
                self.requests.append(client.recv(65536))
                client.sendall(answer)

    def close(self) -> None:
        self.listener.close()
        self.thread.join(timeout=10)


def test_an_image_that_routes_http_through_a_forwarder_still_talks_to_the_agent(
    stack: Stack,
) -> None:
    """An image may send its HTTP through a forwarder that leads to the parent (the
    usual way out of an enclave), naming other hosts to bypass. boto3 honours
    HTTP_PROXY for the agent's http:// endpoint unless NO_PROXY names it: the parent
    would then get every request and answer it with a plaintext of its choosing."""
    forwarder = Forwarder()
    try:
        proxies = {"HTTP_PROXY": forwarder.url, "http_proxy": forwarder.url}
        bypass = {"NO_PROXY": "example.com"}  # (upper case only; urllib reads no_proxy first)
        out, _ = run_app(
            stack, sys.executable, "-c", DECRYPT_APP, str(stack.blob), image_env=proxies | bypass
        )
    finally:
        forwarder.close()
    assert out.splitlines() == [MARKER, "True"]
    assert forwarder.requests == []

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
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devtools.devstack import DevStack, create_enclave_key, direct_kms_client

REPO = Path(__file__).resolve().parent.parent
AGENT = [sys.executable, "-m", "enclave_agent.cli"]
JS_DIR = REPO / "tests" / "sdk_js"
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
    work = Path(tempfile.mkdtemp(prefix="sdk-dropin-"))
    dev = DevStack(work_dir=work)
    try:
        dev.start(agent=False)
        state = dev.state()
        kms = direct_kms_client(state)
        key_id = create_enclave_key(kms, state["account_id"], dev.pcrs()["0"])
        key_arn = kms.describe_key(KeyId=key_id)["KeyMetadata"]["Arn"]
        blob = work / "secret.bin"
        blob.write_bytes(kms.encrypt(KeyId=key_id, Plaintext=MARKER.encode())["CiphertextBlob"])
        home = work / "home"
        home.mkdir()
        yield Stack(dev, dev.write_agent_config(), blob, key_arn, home)
    finally:
        dev.stop()
        shutil.rmtree(work, ignore_errors=True)


def run_app(stack: Stack, *command: str) -> tuple[str, str]:
    """``enclave-agent run -- COMMAND`` with nothing in the environment but a PATH and
    an empty HOME; (the app's stdout, the agent's and the app's stderr)."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(stack.home), "LANG": "C.UTF-8"}
    result = subprocess.run(
        [*AGENT, "run", "--config", str(stack.config), "--", *command],
        cwd=REPO,
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

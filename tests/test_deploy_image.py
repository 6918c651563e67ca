"""The example image's pieces, run on the local stack the way the enclave runs them.

deploy/agent.toml is parsed as shipped, then adapted only where this machine must
differ from an enclave (proxy over tcp: in place of vsock:3:8000, the simulated NSM
in place of /dev/nsm, the local KMS and its CA, a socket in a temporary directory).
The secret is sealed the guide's way (docs/deploy.md, step 2), by the real
`enclave-agent seal example --to file:.../deploy/secrets/example.sealed` as the
operator, under a key whose policy `enclave-agent key-policy` printed; then
`enclave-agent run -- python3 deploy/example_app.py example --print-attestation`
opens that file through the real proxy and local KMS, and the app prints the file's
digest as the secret's version. The document the app prints goes through
`verify-attestation` and back into `key-policy`, giving the same conditions. Another
image (PCR0) gets no secret and the run fails.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from devtools.devstack import DevStack, local_kms_client, local_operator_arn, local_operator_env
from enclave_agent.runtime.config import load_config
from enclave_agent.runtime.sealed import digest_version
from enclave_agent.runtime.store_location import FileLocation
from enclave_common.address import VsockAddress
from tests.conftest import REPO_ROOT
from tests.support.stack import run_module

AGENT_TOML = REPO_ROOT / "deploy" / "agent.toml"
ALIAS = "alias/enclave-kms-example"
SEALED = Path("deploy") / "secrets" / "example.sealed"  # where step 2 seals it


def test_shipped_agent_toml_is_what_the_enclave_needs(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "example.sealed").write_bytes(b"\x01sealed")
    # The shipped file, next to a sealed file of its own, read from elsewhere: the path
    # is relative to the config's directory, not to the working directory.
    (tmp_path / "agent.toml").write_text(AGENT_TOML.read_text())
    config = load_config(tmp_path / "agent.toml")
    assert config.proxy == VsockAddress(cid=3, port=8000)
    assert config.nsm == "/dev/nsm"
    assert config.kms_endpoint is None and config.ca_bundle is None  # real KMS, certifi
    secret = config.secrets["example"]
    assert secret.location == FileLocation(str(tmp_path / "secrets" / "example.sealed"))
    assert secret.ciphertext == b"\x01sealed"  # read at start, with the config
    # Opened under its name's context alone, by whichever trusted key sealed it.
    assert secret.key_id is None and not secret.encryption_context
    assert secret.refresh is None  # a file of the image never changes
    assert [str(entry) for entry in config.trusted_keys.entries] == [SHIPPED_TRUSTED_KEY]


def _replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"deploy/agent.toml should hold {old!r} once"
    return text.replace(old, new)


SHIPPED_TRUSTED_KEY = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"


def _local_config(stack: DevStack, work: Path, pcr0: bytes | None, key_arn: str) -> Path:
    """``work``/deploy/agent.toml: the shipped one with only the machine-specific lines
    changed, and the key the operator created in trusted_keys (as the guide says). It
    reads the secret ``work``/deploy/secrets/example.sealed, as the image's config
    reads the file copied beside it."""
    text = _replace_once(AGENT_TOML.read_text(), SHIPPED_TRUSTED_KEY, key_arn)
    text = _replace_once(
        text, 'proxy = "vsock:3:8000"', f"proxy = {json.dumps(stack.proxy_address)}"
    )
    text = _replace_once(
        text,
        'nsm = "/dev/nsm"',
        f'nsm = "simulated"\nkms_endpoint = {json.dumps(stack.kms["endpoint"])}\n'
        f"ca_bundle = {json.dumps(stack.kms['ca_bundle'])}",
    )
    text = _replace_once(
        text,
        'socket = "/run/enclave-agent/agent.sock"',
        f"socket = {json.dumps(str(work / 'agent.sock'))}",
    )
    text += f"\n[simulated_nsm]\nca_dir = {json.dumps(str(stack.ca_dir))}\n"
    if pcr0 is not None:
        text += f'pcrs = {{ 0 = "{pcr0.hex()}" }}\n'
    path = work / AGENT_TOML.relative_to(REPO_ROOT)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _seal(stack: DevStack, work: Path, key_id: str, value: bytes) -> dict[str, Any]:
    """``enclave-agent seal example --key-id KEY --to file:deploy/secrets/example.sealed``
    in the checkout ``work``, with the operator's credentials (docs/deploy.md, step 2);
    what it printed."""
    (work / SEALED).parent.mkdir(parents=True, exist_ok=True)
    sealed = run_module(
        "enclave_agent.cli", "seal", "example", "--key-id", key_id,
        "--to", f"file:{work / SEALED}", stdin=value, env=local_operator_env(stack.kms),
    )  # fmt: skip
    assert sealed.returncode == 0, sealed.stderr.decode()
    for form in (value, value.hex().encode(), base64.b64encode(value)):
        assert form not in sealed.stdout + sealed.stderr, "seal prints no value"
    written: dict[str, Any] = json.loads(sealed.stdout)
    return written


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    stack = DevStack(work_dir=tmp_path_factory.mktemp("deploy-stack"), credentials="static")
    try:
        stack.start(agent=False)
        yield stack
    finally:
        stack.stop()


def _cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return run_module("enclave_agent.cli", *args, stdin=stdin)


def _run_example(config: Path) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "enclave_agent.cli",
            "run",
            "--config",
            str(config),
            "--",
            sys.executable,
            str(REPO_ROOT / "deploy" / "example_app.py"),
            "example",
            "--print-attestation",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )


def test_example_app_reads_its_secret_and_proves_its_pcrs(stack: DevStack, tmp_path: Path) -> None:
    pcrs = stack.pcrs()
    measurements = tmp_path / "measurements.json"
    measurements.write_text(
        json.dumps({"Measurements": {f"PCR{i}": pcrs[str(i)] for i in (0, 1, 2)}})
    )
    role = f"arn:aws:iam::{stack.kms['account_id']}:role/enclave-parent"
    operator = ["--encrypt-principal", local_operator_arn(stack.kms["account_id"])]
    policy_args = ["--role-arn", role, "--region", stack.region, *operator]
    printed = _cli("key-policy", "--measurements", str(measurements), *policy_args)
    assert printed.returncode == 0, printed.stderr

    kms: Any = local_kms_client(stack.kms)
    key = kms.create_key(Policy=printed.stdout.decode())["KeyMetadata"]
    kms.create_alias(AliasName=ALIAS, TargetKeyId=key["KeyId"])
    # Over 4096 bytes: an envelope, its data key from GenerateDataKey, which the
    # policy's EncryptByTheOperator grants the operator beside Encrypt.
    secret = os.urandom(5000)
    good = tmp_path / "good"
    written = _seal(stack, good, ALIAS, secret)
    sealed_bytes = (good / SEALED).read_bytes()
    assert (written["form"], written["key_id"]) == ("envelope", key["Arn"])
    assert written["version"] == digest_version(sealed_bytes)
    assert written["version"] == "sha256:" + hashlib.sha256(sealed_bytes).hexdigest()[:16]

    result = _run_example(_local_config(stack, good, None, key["Arn"]))
    stdout = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()[-3000:]

    digest = hashlib.sha256(secret).hexdigest()[:8]
    proof = f"secret 'example' read, 5000 bytes, sha256 {digest}..., version {written['version']}"
    assert f"example-app: OK: {proof}" in stdout
    everything = result.stdout + result.stderr + stack.log_path("proxy").read_bytes()
    for form in (secret, secret.hex().encode(), base64.b64encode(secret)):
        assert form not in everything, "the secret must reach no output and no log"

    # The document the app printed, checked and turned back into a policy.
    document = next(
        line.split(": ", 2)[2]
        for line in stdout.splitlines()
        if line.startswith("example-app: attestation document: ")
    )
    verified = _cli(
        "verify-attestation", "-", "--root", str(stack.ca_dir / "root.pem"),
        stdin=document.encode(),
    )  # fmt: skip
    assert verified.returncode == 0, verified.stderr
    again = _cli(
        "key-policy", "--measurements", "-", *policy_args, "--key-id", key["KeyId"],
        stdin=verified.stdout,
    )  # fmt: skip
    assert json.loads(again.stdout) == json.loads(printed.stdout)
    # and, given the key's id, the trusted_keys line the config above carries
    assert f'trusted_keys = ["{key["Arn"]}"]' in again.stderr.decode()

    # Another image, with the same sealed file: the agent gets no secret, reports it,
    # and the run fails.
    other = tmp_path / "other"
    (other / SEALED).parent.mkdir(parents=True)
    (other / SEALED).write_bytes(sealed_bytes)
    refused = _run_example(
        _local_config(stack, other, hashlib.sha384(b"other image").digest(), key["Arn"])
    )
    assert refused.returncode != 0
    assert b"example-app: OK" not in refused.stdout
    assert b"AccessDeniedException" in refused.stderr
    # What the guide tells an operator to look for on a debug-mode console.
    assert b'"secret_failed"' in refused.stderr and b'"startup_failed"' in refused.stderr


def test_example_app_fails_loudly_without_agent(tmp_path: Path) -> None:
    app = [sys.executable, str(REPO_ROOT / "deploy" / "example_app.py"), "example"]
    env = {k: v for k, v in os.environ.items() if k != "ENCLAVE_AGENT_SOCKET"}
    unset = subprocess.run(app, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert unset.returncode == 1 and "ENCLAVE_AGENT_SOCKET is not set" in unset.stderr
    env["ENCLAVE_AGENT_SOCKET"] = str(tmp_path / "absent.sock")
    absent = subprocess.run(app, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert absent.returncode == 1 and "FAILED: cannot reach the agent" in absent.stderr


def test_held_app_stays_up_until_sigterm_and_unknown_secret_fails(
    stack: DevStack, tmp_path: Path
) -> None:
    kms: Any = local_kms_client(stack.kms)
    # A key the simulated enclave may use: its own PCRs, through the command.
    pcrs = stack.pcrs()
    measurements = tmp_path / "m.json"
    measurements.write_text(json.dumps({f"PCR{i}": pcrs[str(i)] for i in (0, 1, 2)}))
    role = f"arn:aws:iam::{stack.kms['account_id']}:role/enclave-parent"
    policy = _cli(
        "key-policy", "--measurements", str(measurements), "--role-arn", role,
        "--region", stack.region,
        "--encrypt-principal", local_operator_arn(stack.kms["account_id"]),
    ).stdout  # fmt: skip
    key = kms.create_key(Policy=policy.decode())["KeyMetadata"]
    # Small: a plain KMS ciphertext (Encrypt).
    assert _seal(stack, tmp_path / "held", key["KeyId"], os.urandom(16))["form"] == "kms"
    config = _local_config(stack, tmp_path / "held", None, key["Arn"])

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    app = [sys.executable, str(REPO_ROOT / "deploy" / "example_app.py")]
    agent = [sys.executable, "-m", "enclave_agent.cli", "run", "--config", str(config), "--"]

    unknown = subprocess.run(
        [*agent, *app, "nosuch"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert unknown.returncode == 1
    assert b"example-app: FAILED: GET /v1/secrets/nosuch answered 404" in unknown.stderr

    output = tmp_path / "held.out"
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [*agent, *app, "example", "--hold"], cwd=REPO_ROOT, env=env, stdout=sink, stderr=sink
        )
    try:
        deadline = time.monotonic() + 60
        while b"example-app: OK" not in output.read_bytes():
            assert process.poll() is None, output.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the app never reported its secret"
            time.sleep(0.05)
        assert process.poll() is None, "--hold keeps the app, so the enclave, running"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_dockerfile_copies_only_the_agent_side_and_wires_the_entry_point() -> None:
    """Static checks of deploy/Dockerfile (no Docker daemon here to build it)."""
    dockerfile = (REPO_ROOT / "deploy" / "Dockerfile").read_text()
    joined = dockerfile.replace("\\\n", " ")
    ignore = (REPO_ROOT / "deploy" / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    assert "*" in ignore, "the build context is an allowlist"
    targets = {}
    for line in joined.splitlines():
        words = line.split()
        if not words or words[0] != "COPY" or words[1].startswith("--from"):
            continue
        *sources, target = words[1:]
        for source in sources:
            assert any(source == a or source.startswith(a + "/") for a in allowed), source
            assert (REPO_ROOT / source).exists() or source == str(SEALED)
            assert not source.startswith(("proxy", "systemd", "devtools", "scripts", "tests"))
            targets[source] = target
    entry = json.loads(joined.split("ENTRYPOINT", 1)[1].strip())
    assert entry[:5] == ["enclave-agent", "run", "--config", "/etc/enclave-agent/agent.toml", "--"]
    assert targets["deploy/agent.toml"] == "/etc/enclave-agent/agent.toml"
    assert targets["deploy/example_app.py"] == entry[6]
    # agent.toml names the sealed file relative to its own directory in the image:
    # there, the file is where the Dockerfile copies it.
    shipped = tomllib.loads(AGENT_TOML.read_text())["secrets"]["example"]["from"]
    assert shipped.startswith("file:") and not shipped.startswith("file:/")
    in_image = PurePosixPath(targets["deploy/agent.toml"]).parent / shipped.removeprefix("file:")
    assert targets[str(SEALED)] == str(in_image) == "/etc/enclave-agent/secrets/example.sealed"
    assert "--constraint /tmp/constraints.txt" in joined


def test_every_runtime_dependency_is_pinned_for_the_image() -> None:
    import re

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (REPO_ROOT / "deploy" / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt pins exact versions: {line!r}"
            pins[name.lower()] = version
    for requirement in project["dependencies"]:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement)
        assert name is not None
        normalized = re.sub(r"[-_.]+", "-", name.group(0)).lower()
        assert normalized in pins, f"{normalized} is not pinned in deploy/constraints.txt"

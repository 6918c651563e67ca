"""``enclave-agent seal``: a real subprocess against the local stand-in's KMS and stores,
read back with boto3 as the operator (or the parent) would."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from devtools.devstack import create_enclave_key, local_kms_client, local_operator_env, python_env
from devtools.local_kms.admin_client import mint_credentials
from enclave_agent.runtime.sealed import (
    MAX_VALUE,
    Envelope,
    SealedOpenError,
    digest_version,
    encryption_context,
    open_envelope,
    parse_sealed,
)
from tests.conftest import STORE_ACCOUNTS
from tests.support.stack import run_module

A, B = STORE_ACCOUNTS
PARENT_ROLE = f"arn:aws:iam::{A}:role/enclave-parent-instance"  # devstack's key policy role


@pytest.fixture(scope="module")
def operator_env(local_stores: dict[str, Any]) -> dict[str, str]:
    """An operator's environment: account A's credentials and every endpoint setting."""
    return local_operator_env(local_stores, account=A)


@pytest.fixture(scope="module")
def key_id(local_stores: dict[str, Any]) -> str:
    """A key with KMS's default policy: the operator (account A) may seal and open."""
    return str(client(local_stores, "kms").create_key()["KeyMetadata"]["Arn"])


@pytest.fixture(scope="module")
def bucket(local_stores: dict[str, Any]) -> str:
    client(local_stores, "s3").create_bucket(Bucket="sealed-secrets")
    return "sealed-secrets"


@dataclass(frozen=True)
class Stores:
    """The local stand-in as the operator sees it: its state, the operator's environment
    (account A), a key it may seal with and a bucket."""

    state: dict[str, Any]
    env: dict[str, str]
    key_id: str
    bucket: str


@pytest.fixture(scope="module")
def stores(
    local_stores: dict[str, Any], operator_env: dict[str, str], key_id: str, bucket: str
) -> Stores:
    return Stores(local_stores, operator_env, key_id, bucket)


def client(state: dict[str, Any], service: str, account: str = A, **settings: Any) -> Any:
    return local_kms_client(state, service=service, account=account, **settings)


def seal(
    env: dict[str, str], *args: str, value: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    return run_module("enclave_agent.cli", "seal", *args, env=env, stdin=value)


def sealed_ok(env: dict[str, str], *args: str, value: bytes) -> dict[str, Any]:
    result = seal(env, *args, value=value)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr == b""
    assert_not_shown(value, result.stdout)
    written: dict[str, Any] = json.loads(result.stdout)
    return written


def fresh(size: int = 24) -> bytes:
    """A value no output could hold by chance."""
    return os.urandom(size)


def assert_not_shown(value: bytes, *outputs: bytes) -> None:
    for output in outputs:
        for form in (value, base64.b64encode(value), value.hex().encode()):
            assert form not in output


def unseal(state: dict[str, Any], name: str, blob: bytes) -> bytes:
    """Open a sealed secret outside any enclave, as the key's default policy lets the
    operator: Decrypt with the name's context (and the envelope's GCM)."""
    kms = client(state, "kms")
    sealed = parse_sealed(blob)
    context = encryption_context(name)
    if isinstance(sealed, Envelope):
        data_key = kms.decrypt(CiphertextBlob=sealed.data_key_blob, EncryptionContext=context)
        return open_envelope(name, sealed, data_key["Plaintext"])
    return bytes(
        kms.decrypt(CiphertextBlob=sealed.ciphertext_blob, EncryptionContext=context)["Plaintext"]
    )


def read_back(state: dict[str, Any], written: dict[str, Any]) -> bytes:
    """The bytes at the destination ``seal`` reported, read as the operator would."""
    destination = written["destination"]
    if destination.startswith("secretsmanager:"):
        answer = client(state, "secretsmanager").get_secret_value(SecretId=written["arn"])
        assert answer["VersionId"] == written["version_id"]
        return bytes(answer["SecretBinary"])
    if destination.startswith("ssm:"):
        parameter = client(state, "ssm").get_parameter(Name=written["arn"])["Parameter"]
        assert parameter["Version"] == written["version"]
        return base64.b64decode(parameter["Value"], validate=True)
    if destination.startswith("s3://"):
        bucket, _, key = destination.removeprefix("s3://").partition("/")
        answer = client(state, "s3").get_object(Bucket=bucket, Key=key, ExpectedBucketOwner=A)
        assert answer["ETag"] == written["etag"]
        return bytes(answer["Body"].read())
    return Path(written["path"]).read_bytes()


def destinations(tmp_path: Path, bucket: str, tag: str) -> list[str]:
    return [
        f"secretsmanager:sealed/{tag}",
        f"ssm:/sealed/{tag}",
        f"s3://{bucket}/sealed/{tag}",
        f"file:{tmp_path / tag}",
    ]


@pytest.mark.parametrize(("size", "form"), [(4096, "kms"), (4097, "envelope")])
def test_seal_to_each_destination_and_read_back(
    stores: Stores, tmp_path: Path, size: int, form: str
) -> None:
    value = fresh(size)
    sm, ssm, s3, file = (
        sealed_ok(stores.env, "db", "--key-id", stores.key_id, "--to", to, value=value)
        for to in destinations(tmp_path, stores.bucket, f"v{size}")
    )
    for written in (sm, ssm, s3, file):
        assert (written["name"], written["form"], written["key_id"]) == ("db", form, stores.key_id)
        blob = read_back(stores.state, written)
        assert len(blob) == written["sealed_bytes"]
        assert unseal(stores.state, "db", blob) == value
        assert_not_shown(value, blob)
        # Bound to its name: under another name's context it does not open.
        with pytest.raises((ClientError, SealedOpenError)):
            unseal(stores.state, "api_key", blob)
    # What it printed: what the agent's `from` names, and the version written.
    assert sm["created"] is True and sm["from"] == "secretsmanager:" + sm["arn"]
    assert sm["arn"].startswith(f"arn:aws:secretsmanager:us-east-1:{A}:secret:sealed/v{size}-")
    assert ssm["arn"] == f"arn:aws:ssm:us-east-1:{A}:parameter/sealed/v{size}"
    assert (ssm["from"], ssm["version"]) == ("ssm:" + ssm["arn"], 1)
    assert ssm["tier"] == "Advanced"  # either sealed form of 4096 bytes is over 4096 in base64
    assert s3["from"] == f"s3://{stores.bucket}/sealed/v{size}" and s3["etag"]
    assert file["path"] == str(tmp_path / f"v{size}") and file["from"] == "file:" + file["path"]
    assert file["version"] == digest_version(read_back(stores.state, file))  # what the agent serves


def test_sealing_again_makes_a_new_version(stores: Stores) -> None:
    client(stores.state, "s3").put_bucket_versioning(
        Bucket=stores.bucket, VersioningConfiguration={"Status": "Enabled"}
    )
    args = ("db", "--key-id", stores.key_id)
    for to in ("secretsmanager:rotated", "ssm:/rotated", f"s3://{stores.bucket}/rotated"):
        first = sealed_ok(stores.env, *args, "--to", to, value=fresh())
        value = fresh()
        second = sealed_ok(stores.env, *args, "--to", to, value=value)
        assert unseal(stores.state, "db", read_back(stores.state, second)) == value
        if to.startswith("secretsmanager:"):
            assert (first["arn"], second["created"]) == (second["arn"], False)
            assert first["version_id"] != second["version_id"]
        elif to.startswith("ssm:"):
            assert (first["version"], second["version"]) == (1, 2)
        else:
            assert None is not first["version_id"] != second["version_id"] is not None
    # An existing secret named by its ARN gets the new version; a missing ARN is an error.
    arn = sealed_ok(stores.env, *args, "--to", "secretsmanager:byarn", value=fresh())["arn"]
    again = sealed_ok(stores.env, *args, "--to", f"secretsmanager:{arn}", value=fresh())
    assert (again["arn"], again["created"]) == (arn, False)
    missing = f"arn:aws:secretsmanager:us-east-1:{A}:secret:never-AbCdEf"
    result = seal(stores.env, *args, "--to", f"secretsmanager:{missing}", value=fresh())
    assert result.returncode == 1
    assert result.stderr.startswith(
        b"enclave-agent seal: PutSecretValue: ResourceNotFoundException"
    )


def test_the_largest_values_and_where_they_fit(stores: Stores, tmp_path: Path) -> None:
    largest = os.urandom(MAX_VALUE)
    for to in (f"s3://{stores.bucket}/largest", f"file:{tmp_path / 'largest'}"):
        written = sealed_ok(
            stores.env, "bundle", "--key-id", stores.key_id, "--to", to, value=largest
        )
        assert written["form"] == "envelope"
        assert unseal(stores.state, "bundle", read_back(stores.state, written)) == largest
    # Secrets Manager holds 65536 bytes and SSM 8192 base64 characters: a 64 KiB value
    # sealed is more than either, refused before anything is written.
    too_large = [
        ("secretsmanager:largest", "a Secrets Manager secret"),
        ("ssm:/largest", "an SSM parameter"),
    ]
    for to, store in too_large:
        result = seal(stores.env, "bundle", "--key-id", stores.key_id, "--to", to, value=largest)
        assert result.returncode == 2, result.stderr
        message = result.stderr.decode()
        assert message.startswith("enclave-agent seal: the sealed value is ") and store in message
        assert "use s3:// (or file:)" in message and message.count("\n") == 1
    assert "largest" not in str(client(stores.state, "secretsmanager").list_secrets())
    assert (
        client(stores.state, "ssm").describe_parameters(
            ParameterFilters=[{"Key": "Name", "Values": ["/largest"]}]
        )["Parameters"]
        == []
    )
    # What each does hold: an envelope of 60000 bytes in Secrets Manager, 5000 in SSM.
    for to, size in (("secretsmanager:large", 60000), ("ssm:/large", 5000)):
        value = os.urandom(size)
        written = sealed_ok(
            stores.env, "bundle", "--key-id", stores.key_id, "--to", to, value=value
        )
        assert unseal(stores.state, "bundle", read_back(stores.state, written)) == value
    assert written["tier"] == "Advanced"


def test_a_value_over_64_kib_is_refused_before_any_aws_call(tmp_path: Path) -> None:
    env = python_env()  # no credentials, no region, no endpoint: nothing is asked of AWS
    result = seal(
        env, "db", "--key-id", "k", "--to", f"file:{tmp_path / 'x'}", value=b"v" * (MAX_VALUE + 1)
    )
    assert (result.returncode, result.stderr) == (
        2,
        b"enclave-agent seal: the value is over 65536 bytes (64 KiB), the most a secret may be\n",
    )
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("args", "value", "message"),
    [
        (["bad name", "--to", "file:x"], b"v", "secret name 'bad name' must be"),
        (["db", "--to", "vault:x"], b"v", "--to: 'vault:x' is not a location"),
        (["db", "--to", "s3://Bad_Bucket/k"], b"v", "is not an S3 bucket name"),
        (["db", "--to", "ssm:/a", "--bucket-owner", A], b"v", "--bucket-owner applies to"),
        (["db", "--to", "s3://bucket/k", "--bucket-owner", "12"], b"v", "12-digit account id"),
        (["db", "--to", "file:x"], b"", "the value is empty"),
        (["db", "--to", "file:x", "--from-file", "/nonexistent/v"], b"", "cannot read"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    operator_env: dict[str, str], args: list[str], value: bytes, message: str
) -> None:
    result = seal(operator_env, args[0], "--key-id", "k", *args[1:], value=value)
    assert result.returncode == 2
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("enclave-agent seal: ") and message in lines[0]


def test_no_region_or_no_credentials_is_a_configuration_error(
    operator_env: dict[str, str], tmp_path: Path
) -> None:
    args = ("db", "--key-id", "k", "--to", f"file:{tmp_path / 'x'}")
    no_region = {k: v for k, v in operator_env.items() if k != "AWS_DEFAULT_REGION"}
    result = seal(no_region, *args, value=b"v")
    assert result.returncode == 2 and b"no AWS region: pass --region" in result.stderr
    no_credentials = {k: v for k, v in operator_env.items() if "ACCESS_KEY" not in k}
    result = seal(no_credentials, *args, "--region", "us-east-1", value=b"v")
    assert result.returncode == 2 and b"no AWS credentials found" in result.stderr


def test_what_aws_refuses_exits_1_and_writes_nothing(stores: Stores, tmp_path: Path) -> None:
    file = f"file:{tmp_path / 'x'}"
    result = seal(stores.env, "db", "--key-id", "alias/none", "--to", file, value=fresh())
    assert result.returncode == 1
    assert result.stderr.startswith(b"enclave-agent seal: Encrypt: NotFoundException")
    assert not (tmp_path / "x").exists()
    s3 = ("db", "--key-id", stores.key_id, "--to", f"s3://{stores.bucket}/owned", "--bucket-owner")
    result = seal(stores.env, *s3, B, value=fresh())
    assert result.returncode == 1
    assert result.stderr == b"enclave-agent seal: PutObject: AccessDenied: Access Denied\n"
    listed = client(stores.state, "s3").list_objects_v2(Bucket=stores.bucket, Prefix="owned")
    assert "Contents" not in listed
    value = fresh()
    written = sealed_ok(stores.env, *s3, A, value=value)
    assert unseal(stores.state, "db", read_back(stores.state, written)) == value
    nowhere = f"file:{tmp_path}/no/dir/x"
    result = seal(stores.env, "db", "--key-id", stores.key_id, "--to", nowhere, value=fresh())
    assert result.returncode == 1 and b"cannot write" in result.stderr


def test_a_parent_reading_the_store_gets_only_ciphertext(
    local_stores: dict[str, Any], operator_env: dict[str, str]
) -> None:
    """The key admits only the enclave image (devstack's policy); the operator seals;
    the parent, with the instance role's credentials, reads the secret from Secrets
    Manager and cannot open it."""
    enclave_key = create_enclave_key(client(local_stores, "kms"), A, "ab" * 48)
    parent = json.loads(
        mint_credentials(Path(local_stores["state_file"]), 900, principal=PARENT_ROLE)
    )
    as_parent = {
        "aws_access_key_id": parent["AccessKeyId"],
        "aws_secret_access_key": parent["SecretAccessKey"],
        "aws_session_token": parent["SessionToken"],
    }
    for name, value in (("db", fresh()), ("bundle", fresh(10_000))):
        to = f"secretsmanager:parent/{name}"
        written = sealed_ok(operator_env, name, "--key-id", enclave_key, "--to", to, value=value)
        secrets = client(local_stores, "secretsmanager", **as_parent)
        blob = bytes(secrets.get_secret_value(SecretId=written["arn"])["SecretBinary"])
        assert_not_shown(value, blob)
        sealed = parse_sealed(blob)
        kms = client(local_stores, "kms", **as_parent)
        ciphertext = (
            sealed.data_key_blob if isinstance(sealed, Envelope) else sealed.ciphertext_blob
        )
        with pytest.raises(ClientError) as denied:
            kms.decrypt(CiphertextBlob=ciphertext, EncryptionContext=encryption_context(name))
        assert denied.value.response["Error"]["Code"] == "AccessDeniedException"
    assert_not_shown(value, Path(local_stores["log"]).read_bytes())

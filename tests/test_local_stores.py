"""The local stand-in's Secrets Manager, SSM and S3 (``--stores``), over real HTTPS.

Each store is its own endpoint with its own SigV4 service; each account its own
stores; S3's expected bucket owner is enforced. These are the behaviours the agent's
store reads are tested against, so each is checked here on its own.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import ssl
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from botocore.auth import S3SigV4Auth, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from devtools.devstack import local_kms_client
from devtools.local_kms.admin_client import set_faults
from tests.conftest import STORE_ACCOUNTS

A, B = STORE_ACCOUNTS
SERVICES = ("kms", "secretsmanager", "ssm", "s3")
JSON_TARGETS = {
    "kms": ("TrentService.GenerateRandom", {"NumberOfBytes": 8}),
    "secretsmanager": ("secretsmanager.ListSecrets", {}),
    "ssm": ("AmazonSSM.DescribeParameters", {}),
}


def client(state: dict[str, Any], service: str, account: str = A) -> Any:
    return local_kms_client(state, service=service, account=account)


def endpoint_of(state: dict[str, Any], service: str) -> str:
    return str(state["endpoint" if service == "kms" else f"{service}_endpoint"])


def error_code(call: Callable[[], Any]) -> str:
    with pytest.raises(ClientError) as caught:
        call()
    return str(caught.value.response["Error"]["Code"])


def send_signed(
    state: dict[str, Any], endpoint_service: str, signing_service: str
) -> tuple[int, bytes]:
    """A request for ``endpoint_service``'s protocol, signed (correctly, with account
    A's credentials) for ``signing_service``, sent to ``endpoint_service``'s endpoint."""
    url = endpoint_of(state, endpoint_service)
    if endpoint_service == "s3":
        request = AWSRequest(method="GET", url=url + "/")
        request.headers["X-Amz-Content-SHA256"] = hashlib.sha256(b"").hexdigest()
    else:
        target, body = JSON_TARGETS[endpoint_service]
        request = AWSRequest(
            method="POST",
            url=url + "/",
            data=json.dumps(body).encode(),
            headers={"X-Amz-Target": target, "Content-Type": "application/x-amz-json-1.1"},
        )
    account = state["accounts"][0]
    credentials = Credentials(account["aws_access_key_id"], account["aws_secret_access_key"])
    signer = S3SigV4Auth if signing_service == "s3" else SigV4Auth
    signer(credentials, signing_service, state["region"]).add_auth(request)
    prepared = request.prepare()
    return send(
        state, endpoint_service, prepared.method, "/", dict(prepared.headers), prepared.body
    )


def send(
    state: dict[str, Any],
    service: str,
    method: str,
    target: str,
    headers: dict[str, str],
    body: bytes | None,
) -> tuple[int, bytes]:
    host_port = endpoint_of(state, service).removeprefix("https://")
    host, _, port = host_port.rpartition(":")
    context = ssl.create_default_context(cafile=state["ca_bundle"])
    connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=30)
    try:
        connection.request(method, target, body=body, headers=headers)
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def test_the_state_file_names_each_store_endpoint(local_stores: dict[str, Any]) -> None:
    endpoints = {endpoint_of(local_stores, service) for service in SERVICES}
    assert len(endpoints) == 4, "each service has an endpoint of its own"
    for service in SERVICES:
        assert endpoint_of(local_stores, service).startswith("https://127.0.0.1:")


@pytest.mark.parametrize("endpoint_service", SERVICES)
def test_each_endpoint_answers_only_signatures_made_for_its_service(
    local_stores: dict[str, Any], endpoint_service: str
) -> None:
    status, body = send_signed(local_stores, endpoint_service, endpoint_service)
    assert status == 200, body
    for other in SERVICES:
        if other == endpoint_service:
            continue
        status, body = send_signed(local_stores, endpoint_service, other)
        if endpoint_service == "s3":
            assert status == 400 and b"<Code>AuthorizationHeaderMalformed</Code>" in body
        else:
            assert status == 400
            assert json.loads(body)["__type"] == "InvalidSignatureException"
        assert f"correct service: '{endpoint_service}'".encode() in body


def test_a_kms_signature_sent_to_ssm_is_refused(local_stores: dict[str, Any]) -> None:
    status, body = send_signed(local_stores, "ssm", "kms")
    assert (status, json.loads(body)["__type"]) == (400, "InvalidSignatureException")


def test_secrets_manager_accounts_are_apart(local_stores: dict[str, Any]) -> None:
    ours, theirs = client(local_stores, "secretsmanager"), client(local_stores, "secretsmanager", B)
    arn = ours.create_secret(Name="apart/db", SecretBinary=b"ours")["ARN"]
    assert arn.startswith(f"arn:aws:secretsmanager:us-east-1:{A}:secret:apart/db-")
    assert len(arn.rpartition("-")[2]) == 6
    assert error_code(lambda: theirs.get_secret_value(SecretId="apart/db")) == (
        "ResourceNotFoundException"
    )
    assert error_code(lambda: theirs.get_secret_value(SecretId=arn)) == "AccessDeniedException"
    assert error_code(lambda: theirs.put_secret_value(SecretId=arn, SecretBinary=b"x")) == (
        "AccessDeniedException"
    )
    # The same name in the other account is another secret, with its own ARN.
    planted = theirs.create_secret(Name="apart/db", SecretBinary=b"planted")["ARN"]
    assert planted.startswith(f"arn:aws:secretsmanager:us-east-1:{B}:secret:apart/db-")
    answer = theirs.get_secret_value(SecretId="apart/db")
    assert (answer["ARN"], answer["SecretBinary"]) == (planted, b"planted")
    answer = ours.get_secret_value(SecretId=arn)
    assert (answer["ARN"], answer["SecretBinary"]) == (arn, b"ours")
    # An ARN whose suffix is wrong names no secret; one of another region neither.
    assert error_code(lambda: ours.get_secret_value(SecretId=arn[:-6] + "AAAAAA")) == (
        "ResourceNotFoundException"
    )
    elsewhere = arn.replace("us-east-1", "eu-west-1")
    assert error_code(lambda: ours.get_secret_value(SecretId=elsewhere)) == (
        "AccessDeniedException"
    )


def test_secrets_manager_binary_is_at_most_64_kib(local_stores: dict[str, Any]) -> None:
    secrets = client(local_stores, "secretsmanager")
    secrets.create_secret(Name="apart/big", SecretBinary=b"b" * 65536)
    assert error_code(
        lambda: secrets.put_secret_value(SecretId="apart/big", SecretBinary=b"b" * 65537)
    ) == ("ValidationException")


def test_ssm_accounts_are_apart(local_stores: dict[str, Any]) -> None:
    ours, theirs = client(local_stores, "ssm"), client(local_stores, "ssm", B)
    ours.put_parameter(Name="/apart/db", Value="ours", Type="String")
    arn = f"arn:aws:ssm:us-east-1:{A}:parameter/apart/db"
    parameter = ours.get_parameter(Name=arn)["Parameter"]
    assert (parameter["ARN"], parameter["Value"]) == (arn, "ours")
    assert error_code(lambda: theirs.get_parameter(Name="/apart/db")) == "ParameterNotFound"
    assert error_code(lambda: theirs.get_parameter(Name=arn)) == "AccessDeniedException"
    theirs.put_parameter(Name="/apart/db", Value="planted", Type="String")
    parameter = theirs.get_parameter(Name="/apart/db")["Parameter"]
    assert parameter["ARN"] == f"arn:aws:ssm:us-east-1:{B}:parameter/apart/db"
    assert ours.get_parameter(Name=arn)["Parameter"]["Value"] == "ours"
    # A one-level name has the ARN .../parameter/NAME; versions are named NAME:N.
    ours.put_parameter(Name="apartdb", Value="one", Type="String")
    ours.put_parameter(Name="apartdb", Value="two", Type="String", Overwrite=True)
    one_level = f"arn:aws:ssm:us-east-1:{A}:parameter/apartdb"
    assert ours.get_parameter(Name=one_level)["Parameter"]["Value"] == "two"
    assert ours.get_parameter(Name=f"{one_level}:1")["Parameter"]["Value"] == "one"
    assert error_code(lambda: ours.put_parameter(Name=arn, Value="x", Type="String")) == (
        "ValidationException"
    )


def test_ssm_values_fit_their_tier(local_stores: dict[str, Any]) -> None:
    ssm = client(local_stores, "ssm")
    ssm.put_parameter(Name="/tier/standard", Value="s" * 4096, Type="String")
    put = ssm.put_parameter
    assert error_code(lambda: put(Name="/tier/big", Value="s" * 4097, Type="String")) == (
        "ValidationException"
    )
    assert put(Name="/tier/big", Value="s" * 8192, Type="String", Tier="Advanced")["Tier"] == (
        "Advanced"
    )
    assert error_code(
        lambda: put(Name="/tier/big", Value="s" * 8193, Type="String", Overwrite=True)
    ) == ("ValidationException")
    assert error_code(
        lambda: put(Name="/tier/big", Value="s", Type="String", Overwrite=True, Tier="Standard")
    ) == ("ValidationException")
    answer = put(Name="/tier/auto", Value="s" * 5000, Type="String", Tier="Intelligent-Tiering")
    assert answer["Tier"] == "Advanced"


def test_s3_buckets_are_apart(local_stores: dict[str, Any]) -> None:
    ours, theirs = client(local_stores, "s3"), client(local_stores, "s3", B)
    ours.create_bucket(Bucket="apart-ours")
    ours.put_object(Bucket="apart-ours", Key="k", Body=b"ours")
    assert error_code(lambda: theirs.get_object(Bucket="apart-ours", Key="k")) == "AccessDenied"
    assert error_code(lambda: theirs.put_object(Bucket="apart-ours", Key="k", Body=b"x")) == (
        "AccessDenied"
    )
    assert error_code(lambda: theirs.create_bucket(Bucket="apart-ours")) == "BucketAlreadyExists"
    assert "apart-ours" not in [b["Name"] for b in theirs.list_buckets()["Buckets"]]
    assert ours.get_object(Bucket="apart-ours", Key="k")["Body"].read() == b"ours"


def test_the_expected_bucket_owner_is_enforced(local_stores: dict[str, Any]) -> None:
    ours, theirs = client(local_stores, "s3"), client(local_stores, "s3", B)
    ours.create_bucket(Bucket="squatted")
    ours.put_object(Bucket="squatted", Key="k", Body=b"ours", ExpectedBucketOwner=A)
    read = ours.get_object(Bucket="squatted", Key="k", ExpectedBucketOwner=A)
    assert read["Body"].read() == b"ours"
    assert error_code(
        lambda: ours.get_object(Bucket="squatted", Key="k", ExpectedBucketOwner=B)
    ) == ("AccessDenied")
    # The bucket is deleted and its name taken by another account (the parent's): a
    # read that names the owner is refused whoever's credentials sign it; one that does
    # not is answered with whatever the new owner put there.
    ours.delete_object(Bucket="squatted", Key="k")
    ours.delete_bucket(Bucket="squatted")
    theirs.create_bucket(Bucket="squatted")
    theirs.put_object(Bucket="squatted", Key="k", Body=b"planted")
    for reader in (ours, theirs):
        assert error_code(
            lambda reader=reader: reader.get_object(
                Bucket="squatted", Key="k", ExpectedBucketOwner=A
            )
        ) == ("AccessDenied")
    assert theirs.get_object(Bucket="squatted", Key="k")["Body"].read() == b"planted"


def test_s3_refuses_an_unsigned_x_amz_header(local_stores: dict[str, Any]) -> None:
    account = local_stores["accounts"][0]
    request = AWSRequest(method="GET", url=local_stores["s3_endpoint"] + "/")
    S3SigV4Auth(
        Credentials(account["aws_access_key_id"], account["aws_secret_access_key"]),
        "s3",
        local_stores["region"],
    ).add_auth(request)
    headers = dict(request.prepare().headers)
    status, body = send(local_stores, "s3", "GET", "/", headers, None)
    assert status == 200, body
    headers["x-amz-expected-bucket-owner"] = A  # added after signing
    status, body = send(local_stores, "s3", "GET", "/", headers, None)
    assert status == 403 and b"<Code>AccessDenied</Code>" in body
    assert b"not signed: x-amz-expected-bucket-owner" in body


def test_faults_reach_only_the_store_they_name(local_stores: dict[str, Any]) -> None:
    state_file = Path(local_stores["state_file"])
    ssm, s3 = client(local_stores, "ssm"), client(local_stores, "s3")
    ssm.put_parameter(Name="/fault/x", Value="v", Type="String", Overwrite=True)
    set_faults(state_file, "internal", count=1, service="ssm")
    client(local_stores, "kms").generate_random(NumberOfBytes=4)  # not consumed by KMS
    assert error_code(lambda: ssm.get_parameter(Name="/fault/x")) == "InternalServerError"
    assert ssm.get_parameter(Name="/fault/x")["Parameter"]["Value"] == "v"
    set_faults(state_file, "throttle", count=1, service="s3")
    assert error_code(s3.list_buckets) == "SlowDown"
    set_faults(state_file, "internal", count=1, service="secretsmanager")
    assert error_code(client(local_stores, "secretsmanager").list_secrets) == (
        "InternalServiceError"
    )


def test_each_request_is_logged_with_its_service_and_never_a_body(
    local_stores: dict[str, Any],
) -> None:
    marker = "LOGGED-NOWHERE-" + datetime.now(UTC).strftime("%H%M%S%f")
    client(local_stores, "secretsmanager").create_secret(Name="log/x", SecretString=marker)
    client(local_stores, "ssm").put_parameter(Name="/log/x", Value=marker, Type="String")
    s3 = client(local_stores, "s3")
    s3.create_bucket(Bucket="log-bucket")
    s3.put_object(Bucket="log-bucket", Key="k", Body=marker.encode())
    log = Path(local_stores["log"]).read_text()
    assert marker not in log
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    services = {e.get("service") for e in events if e.get("event") == "request"}
    assert {"secretsmanager", "ssm", "s3"} <= services

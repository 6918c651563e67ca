"""Where a sealed secret lives (enclave_agent/runtime/store_location.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclave_agent.runtime.store_location import (
    FileLocation,
    LocationError,
    ResourceArn,
    S3Location,
    SecretsManagerLocation,
    SsmLocation,
    parse_location,
    require_pinned,
)

SECRET_ARN = "arn:aws:secretsmanager:us-east-1:111122223333:secret:app/db-AbC123"
PARAMETER_ARN = "arn:aws:ssm:eu-west-1:111122223333:parameter/app/db"


def test_secrets_manager_by_name_or_arn() -> None:
    assert parse_location("secretsmanager:app/db") == SecretsManagerLocation("app/db", None)
    location = parse_location(f"secretsmanager:{SECRET_ARN}")
    assert location == SecretsManagerLocation(
        SECRET_ARN,
        ResourceArn("aws", "secretsmanager", "us-east-1", "111122223333", "secret:app/db-AbC123"),
    )
    assert str(location.arn) == SECRET_ARN  # type: ignore[union-attr]


def test_ssm_by_name_or_arn() -> None:
    assert parse_location("ssm:/app/db") == SsmLocation("/app/db", None)
    assert parse_location("ssm:db") == SsmLocation("db", None)
    location = parse_location(f"ssm:{PARAMETER_ARN}")
    assert isinstance(location, SsmLocation) and location.name == "/app/db"
    one_level = parse_location("ssm:arn:aws:ssm:eu-west-1:111122223333:parameter/db")
    assert isinstance(one_level, SsmLocation) and one_level.name == "db"


def test_s3_and_file() -> None:
    assert parse_location("s3://my-bucket.example/a/b c+d") == S3Location(
        "my-bucket.example", "a/b c+d"
    )
    assert str(S3Location("b12", "k")) == "s3://b12/k"
    assert parse_location("file:/tmp/x.sealed") == FileLocation("/tmp/x.sealed")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("db", "not a location"),
        ("sm:db", "not a location"),
        ("secretsmanager:", "not a secret name"),
        ("secretsmanager:a b", "not a secret name"),
        ("secretsmanager:arn:aws:kms:us-east-1:111122223333:key/x", "not a secretsmanager ARN"),
        ("secretsmanager:arn:aws:secretsmanager:us-east-1:1111:secret:x", "12 digits"),
        ("secretsmanager:arn:aws:secretsmanager:Mars:111122223333:secret:x", "not a region"),
        ("secretsmanager:arn:aws:secretsmanager:us-east-1:111122223333:key:x", "not a secret ARN"),
        ("secretsmanager:arn:aws", "not an ARN"),
        ("ssm:", "not a parameter name"),
        ("ssm:a b", "not a parameter name"),
        ("ssm:/a//b", "not a parameter name"),
        ("ssm:db:3", "not a parameter name"),
        ("ssm:/" + "/".join("l" * 16), "not a parameter name"),
        ("ssm:/aws/db", "cannot begin with aws or ssm"),
        ("ssm:arn:aws:ssm:us-east-1:111122223333:document/x", "not a parameter ARN"),
        ("s3://bucket", "expected s3://BUCKET/KEY"),
        ("s3://bucket/", "expected s3://BUCKET/KEY"),
        ("s3://Bucket/k", "not an S3 bucket name"),
        ("s3://ab/k", "not an S3 bucket name"),
        ("s3://a..b/k", "not an S3 bucket name"),
        ("s3://192.168.1.1/k", "not an S3 bucket name"),
        ("s3://bucket/" + "k" * 1025, "over 1024 bytes"),
        ("file:", "expected file:PATH"),
    ],
)
def test_bad_locations_are_refused_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(LocationError, match=reason):
        parse_location(text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_any_text_parses_or_is_refused_cleanly(text: str) -> None:
    for prefix in ("", "secretsmanager:", "ssm:", "s3://", "file:", "ssm:arn:aws:ssm:"):
        try:
            parse_location(prefix + text)
        except LocationError:
            pass


def test_the_agent_reads_only_pinned_locations() -> None:
    # A file is pinned by the image it is part of (measured into PCR0).
    pinned = (f"secretsmanager:{SECRET_ARN}", f"ssm:{PARAMETER_ARN}", "s3://bucket/key", "file:x")
    for text in pinned:
        location = parse_location(text)
        assert require_pinned(location) is location
    refusals = {
        "secretsmanager:app/db": "full ARN",
        "secretsmanager:arn:aws:secretsmanager:us-east-1:111122223333:secret:app/db": "suffix",
        "ssm:/app/db": "by its ARN",
    }
    for text, reason in refusals.items():
        with pytest.raises(LocationError, match=reason):
            require_pinned(parse_location(text))

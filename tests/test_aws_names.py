"""enclave_common.aws against the source of truth: the installed botocore's partitions.

botocore/data/endpoints.json lists every partition with its DNS suffix, the region
names it claims (``regionRegex``) and the regions it has; its endpoint resolver says
which host a KMS client in a region talks to. One region rule, used by the proxy's
and the agent's config, the trusted key ARNs and the IMDS answer, must accept them all.
"""

import json
import re
from functools import cache
from pathlib import Path

import botocore
import botocore.session
import pytest
from botocore.config import Config
from hypothesis import given
from hypothesis import strategies as st

from enclave_agent.operator.key_policy import parse_role_arn
from enclave_agent.runtime.config import parse_config
from enclave_agent.runtime.trusted_keys import parse_key_arn
from enclave_common.aws import (
    PARTITIONS,
    REGION_PATTERN,
    is_region,
    kms_host,
    partition_of,
    store_hosts,
)
from proxy.config import CliOptions, build_config, default_allow_entries, parse_config_text

ENDPOINTS = json.loads((Path(botocore.__file__).parent / "data" / "endpoints.json").read_text())
BOTOCORE = ENDPOINTS["partitions"]
LISTED = sorted((region, p["partition"]) for p in BOTOCORE for region in p["regions"])
# The names the issue lists, one or more of every partition.
NAMED = [
    "us-east-1",
    "us-gov-west-1",
    "cn-north-1",
    "eu-central-2",
    "ap-southeast-4",
    "us-iso-east-1",
    "us-isob-east-1",
    "eu-isoe-west-1",
    "us-isof-south-1",
    "eusc-de-east-1",
]
KEY_ID = "1234abcd-12ab-34cd-56ef-1234567890ab"


def botocore_partition(region: str) -> str:
    """The partition botocore puts ``region`` in: the one whose regex claims it, else aws."""
    claimed = [p["partition"] for p in BOTOCORE if re.search(p["regionRegex"], region)]
    assert len(claimed) <= 1, claimed
    return claimed[0] if claimed else "aws"


@cache
def botocore_kms_host(region: str, fips: bool) -> str:
    return botocore_host("kms", region, Config(use_fips_endpoint=fips))


def botocore_host(service: str, region: str, config: Config | None = None) -> str:
    client = _session().create_client(
        service,
        region_name=region,
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="secret",  # never used: no request is made
        config=config,
    )
    host = client.meta.endpoint_url.removeprefix("https://")
    client.close()
    return str(host)


@cache
def _session() -> botocore.session.Session:
    return botocore.session.get_session()


def test_the_partitions_are_botocores() -> None:
    assert {p.name: p.dns_suffix for p in PARTITIONS} == {
        p["partition"]: p["dnsSuffix"] for p in BOTOCORE
    }
    assert {region for region, _ in LISTED} >= set(NAMED)


@pytest.mark.parametrize(("region", "partition"), LISTED)
def test_every_region_botocore_lists_is_one_in_its_partition(region: str, partition: str) -> None:
    assert is_region(region)
    assert partition_of(region).name == partition == botocore_partition(region)
    for fips in (False, True):
        assert kms_host(region, fips=fips) == botocore_kms_host(region, fips)
    # The stores' regional endpoints; S3's path-style one (us-east-1's too, not the
    # legacy global s3.amazonaws.com).
    s3 = Config(s3={"addressing_style": "path", "us_east_1_regional_endpoint": "regional"})
    assert store_hosts(region) == (
        botocore_host("secretsmanager", region),
        botocore_host("ssm", region),
        botocore_host("s3", region, s3),
    )


def _claimed_names(regex: str) -> st.SearchStrategy[str]:
    # botocore's \w and \d read as what region names are made of.
    return st.from_regex(regex.replace(r"\w", "[a-z]").replace(r"\d", "[0-9]"), fullmatch=True)


@given(st.sampled_from(BOTOCORE).flatmap(lambda p: _claimed_names(p["regionRegex"])))
def test_names_a_partition_claims_are_regions_of_that_partition(region: str) -> None:
    assert is_region(region)
    assert partition_of(region).name == botocore_partition(region)


@given(st.from_regex(REGION_PATTERN, fullmatch=True))
def test_a_name_no_partition_claims_is_in_aws_as_botocore_says(region: str) -> None:
    assert partition_of(region).name == botocore_partition(region)


@pytest.mark.parametrize("region", ["xx-north-1", "ab-cde-fgh-7", "us-east-12"])
def test_unclaimed_names_resolve_as_botocore_resolves_them(region: str) -> None:
    assert kms_host(region) == botocore_kms_host(region, False)


@pytest.mark.parametrize(
    "text",
    ["US-EAST-1", "us-east", "useast1", "us-east-1-", "us_east_1", "a-b-c-d-1", "", "us-east-1\n"],
)
def test_what_is_not_a_region_name(text: str) -> None:
    assert not is_region(text)
    assert botocore_partition(text) == "aws"  # no partition claims it either


@pytest.mark.parametrize("region", NAMED)
def test_both_configs_the_key_arns_and_the_allowlist_take_every_partitions_regions(
    region: str,
) -> None:
    partition = partition_of(region).name
    key = f"arn:{partition}:kms:{region}:111122223333:key/{KEY_ID}"
    assert parse_key_arn(key).region == region
    assert parse_role_arn(f"arn:{partition}:iam::111122223333:role/app") == (
        partition,
        "111122223333",
    )
    agent = parse_config(f'region = "{region}"\ntrusted_keys = ["{key}"]\n')
    assert agent.region == region
    proxy = build_config(
        parse_config_text(
            f'region = "{region}"\n'
            f'assume_role_arn = "arn:{partition}:iam::111122223333:role/parent"\n'
        ),
        CliOptions(),
    )
    assert proxy.region == region
    assert default_allow_entries(region) == (
        f"{botocore_kms_host(region, False)}:443",
        f"{botocore_kms_host(region, True)}:443",
        *(f"{host}:443" for host in store_hosts(region)),
    )

"""AWS names both processes check or build: partitions, region names, account ids, the
endpoints of KMS and of the secret stores. Pure.

A region name follows the pattern AWS documents for it, ``([a-z]+-){2,3}[0-9]+`` (the
AWS KMS API reference, MultiRegionKey ``Region``). It covers every partition's names:
us-east-1, us-gov-west-1, cn-north-1, us-iso-east-1, us-isob-east-1, eu-isoe-west-1,
us-isof-south-1, eusc-de-east-1. The partition, and with it the DNS suffix of the
region's endpoints, follows from the name as botocore's ``data/endpoints.json`` says
(each partition's ``regionRegex``, with ``\\w`` read as the letters a region name
holds); a name no partition claims belongs to ``aws``, as botocore resolves it.
tests/test_aws_names.py checks all of it against the installed botocore.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

REGION_PATTERN = r"(?:[a-z]+-){2,3}[0-9]+"
_REGION = re.compile(REGION_PATTERN)


@dataclass(frozen=True)
class Partition:
    name: str
    dns_suffix: str
    regions: str  # the region names it claims (a regular expression, full match)


DEFAULT_PARTITION = Partition("aws", "amazonaws.com", r"(us|eu|ap|sa|ca|me|af|il|mx)-[a-z]+-[0-9]+")
PARTITIONS = (
    DEFAULT_PARTITION,
    Partition("aws-cn", "amazonaws.com.cn", r"cn-[a-z]+-[0-9]+"),
    Partition("aws-us-gov", "amazonaws.com", r"us-gov-[a-z]+-[0-9]+"),
    Partition("aws-iso", "c2s.ic.gov", r"us-iso-[a-z]+-[0-9]+"),
    Partition("aws-iso-b", "sc2s.sgov.gov", r"us-isob-[a-z]+-[0-9]+"),
    Partition("aws-iso-e", "cloud.adc-e.uk", r"eu-isoe-[a-z]+-[0-9]+"),
    Partition("aws-iso-f", "csp.hci.ic.gov", r"us-isof-[a-z]+-[0-9]+"),
    Partition("aws-eusc", "amazonaws.eu", r"eusc-de-[a-z]+-[0-9]+"),
)
PARTITION_PATTERN = "|".join(p.name for p in PARTITIONS)  # an ARN's partition field


ACCOUNT_PATTERN = r"[0-9]{12}"
_ACCOUNT = re.compile(ACCOUNT_PATTERN)
# The services a sealed secret can be read from (docs/secrets.md), by their endpoint
# prefix; S3's regional endpoint is the path-style one (s3.REGION.amazonaws.com).
STORE_SERVICES = ("secretsmanager", "ssm", "s3")


def is_region(text: str) -> bool:
    return _REGION.fullmatch(text) is not None


def is_account_id(text: str) -> bool:
    return _ACCOUNT.fullmatch(text) is not None


def partition_of(region: str) -> Partition:
    for partition in PARTITIONS:
        if re.fullmatch(partition.regions, region):
            return partition
    return DEFAULT_PARTITION


def service_host(service: str, region: str) -> str:
    """The regional endpoint's host name of ``service`` (its endpoint prefix) in ``region``."""
    return f"{service}.{region}.{partition_of(region).dns_suffix}"


def kms_host(region: str, *, fips: bool = False) -> str:
    """The KMS endpoint's host name in ``region`` (``kms-fips.…`` for the FIPS one)."""
    return service_host("kms-fips" if fips else "kms", region)


def store_hosts(region: str) -> tuple[str, ...]:
    """The regional endpoints of Secrets Manager, SSM and S3 (path-style) in ``region``."""
    return tuple(service_host(service, region) for service in STORE_SERVICES)

"""Finding the AWS region when none is configured: ask IMDSv2, briefly.

IMDSv2 needs a session token (PUT) before any read (GET with the token). The endpoint
follows botocore's ``AWS_EC2_METADATA_SERVICE_ENDPOINT`` (and ``..._ENDPOINT_MODE=IPv6``)
so a test, an IPv6-only instance or an unusual network can point it elsewhere;
``AWS_EC2_METADATA_DISABLED=true`` turns it off. urllib is blocking, so the lookup
runs in trio.to_thread with a short timeout.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Mapping

import trio

from enclave_common.aws import is_region

DEFAULT_IMDS_ENDPOINT = "http://169.254.169.254"
# botocore's AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE=IPv6 (IPv6-only instances).
IPV6_IMDS_ENDPOINT = "http://[fd00:ec2::254]"


class RegionError(Exception):
    """No region could be discovered; the message says what to configure."""


def _imds_endpoint(environ: Mapping[str, str]) -> str:
    # The same choice botocore makes for the credentials: an explicit endpoint first,
    # then the endpoint mode.
    ipv6 = environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", "").lower() == "ipv6"
    default = IPV6_IMDS_ENDPOINT if ipv6 else DEFAULT_IMDS_ENDPOINT
    endpoint = environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT", default)
    if not endpoint.startswith("http://"):
        raise RegionError(f"AWS_EC2_METADATA_SERVICE_ENDPOINT must be http://..., got {endpoint!r}")
    return endpoint.rstrip("/")


def _fetch_region(endpoint: str, timeout: float) -> str:
    # No proxies: the metadata service is link-local and must never go through one.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    # The scheme is checked to be http:// by _imds_endpoint.
    token_request = urllib.request.Request(  # noqa: S310
        f"{endpoint}/latest/api/token",
        method="PUT",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"},
    )
    with opener.open(token_request, timeout=timeout) as answer:
        token = answer.read(4096).decode("ascii")
    region_request = urllib.request.Request(  # noqa: S310
        f"{endpoint}/latest/meta-data/placement/region",
        headers={"X-aws-ec2-metadata-token": token},
    )
    with opener.open(region_request, timeout=timeout) as answer:
        return str(answer.read(256).decode("ascii").strip())


async def discover_region(
    *, imds_timeout: float = 1.0, environ: Mapping[str, str] | None = None
) -> str:
    env = os.environ if environ is None else environ
    hint = "set `region` in the config file or pass --region"
    if env.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true":
        raise RegionError(f"no region configured and IMDS is disabled: {hint}")
    endpoint = _imds_endpoint(env)
    try:
        region = await trio.to_thread.run_sync(_fetch_region, endpoint, imds_timeout)
    except (OSError, urllib.error.URLError, UnicodeError) as e:
        raise RegionError(
            f"no region configured and the instance metadata service at {endpoint} did not "
            f"answer ({type(e).__name__}): {hint}"
        ) from None
    if not is_region(region):
        raise RegionError(f"instance metadata returned an invalid region {region[:40]!r}: {hint}")
    return region

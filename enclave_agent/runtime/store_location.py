"""Where a sealed secret lives: the one syntax of ``seal --to`` and of a secret's ``from``.

Pure, no I/O. The forms (docs/secrets.md, "Destinations"):

- ``secretsmanager:SECRET_ID``: a secret's name or ARN,
  ``arn:PARTITION:secretsmanager:REGION:ACCOUNT:secret:NAME-XXXXXX`` (the six characters
  after the last ``-`` are Secrets Manager's random suffix, part of the ARN);
- ``ssm:NAME``: an SSM parameter's name (``/app/db`` or ``db``) or ARN,
  ``arn:PARTITION:ssm:REGION:ACCOUNT:parameter/NAME``; the parameter holds the sealed
  bytes in base64 (a String parameter);
- ``s3://BUCKET/KEY``: an S3 object (path-style requests, no wildcard);
- ``file:PATH``: a file of the raw sealed bytes (for the agent, a file of its image).

An ARN names one resource in one account; a bare name names a resource in whatever
account the credentials belong to, which the enclave's parent chooses. So the agent
accepts only ARNs for Secrets Manager and SSM, and names S3's bucket owner
(``require_pinned``); the operator's ``seal`` accepts either. A file is pinned by the
image it is part of (measured into PCR0), which the parent cannot change.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from enclave_agent.runtime.trusted_keys import quoted
from enclave_common.aws import PARTITION_PATTERN, is_account_id, is_region

SECRETSMANAGER = "secretsmanager:"
SSM = "ssm:"
S3 = "s3://"
FILE = "file:"
FORMS = "secretsmanager:SECRET_ID_OR_ARN, ssm:PARAMETER_NAME_OR_ARN, s3://BUCKET/KEY, file:PATH"

# Secrets Manager: names of 1-512 of these; the ARN adds "-" and 6 random characters.
_SECRET_NAME = re.compile(r"[A-Za-z0-9/_+=.@-]{1,512}")
_SECRET_SUFFIX = re.compile(r"-[A-Za-z0-9]{6}")
# SSM: names of letters, digits, "_.-" and "/" between hierarchy levels (at most 15);
# 2048 characters in the model, of which AWS reserves 1037 for internal use.
_PARAMETER_NAME = re.compile(r"/?[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+){0,14}")
_MAX_PARAMETER_NAME = 1011
# S3 bucket names (general purpose buckets): 3-63 of a-z 0-9 . -, starting and ending
# with a letter or digit, no "..", not an IPv4 address.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_MAX_OBJECT_KEY_BYTES = 1024


class LocationError(ValueError):
    """Not a location a sealed secret can be at; the message says why."""


@dataclass(frozen=True)
class ResourceArn:
    """An ARN split into its fields (the resource part as written)."""

    partition: str
    service: str
    region: str
    account: str
    resource: str

    def __str__(self) -> str:
        return f"arn:{self.partition}:{self.service}:{self.region}:{self.account}:{self.resource}"


@dataclass(frozen=True)
class SecretsManagerLocation:
    secret_id: str  # as given: a name or the ARN
    arn: ResourceArn | None


@dataclass(frozen=True)
class SsmLocation:
    name: str  # the parameter's name (PutParameter takes no ARN)
    arn: ResourceArn | None


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"{S3}{self.bucket}/{self.key}"


@dataclass(frozen=True)
class FileLocation:
    path: str


Location = SecretsManagerLocation | SsmLocation | S3Location | FileLocation
# What the agent reads through the proxy.
StoreLocation = SecretsManagerLocation | SsmLocation | S3Location
# What the agent reads from (``require_pinned``): a store, or a file of its image.
PinnedLocation = StoreLocation | FileLocation


def parse_arn(text: str, service: str) -> ResourceArn:
    """An ARN of ``service``: partition, region and 12-digit account checked."""
    parts = text.split(":", 5)
    if len(parts) != 6 or parts[0] != "arn":
        raise LocationError(f"{quoted(text)} is not an ARN")
    _, partition, named_service, region, account, resource = parts
    if named_service != service:
        raise LocationError(f"{quoted(text)} is not a {service} ARN")
    if not re.fullmatch(PARTITION_PATTERN, partition):
        raise LocationError(f"{quoted(text)}: {quoted(partition)} is not an AWS partition")
    if not is_region(region):
        raise LocationError(f"{quoted(text)}: {quoted(region)} is not a region name")
    if not is_account_id(account):
        raise LocationError(f"{quoted(text)}: the account must be 12 digits")
    return ResourceArn(partition, named_service, region, account, resource)


def _secrets_manager(secret_id: str) -> SecretsManagerLocation:
    if not secret_id.startswith("arn:"):
        if not _SECRET_NAME.fullmatch(secret_id):
            raise LocationError(
                f"{quoted(secret_id)} is not a secret name (1-512 of A-Z a-z 0-9 / _ + = . @ -)"
            )
        return SecretsManagerLocation(secret_id, None)
    arn = parse_arn(secret_id, "secretsmanager")
    kind, _, name = arn.resource.partition(":")
    if kind != "secret" or not _SECRET_NAME.fullmatch(name):
        raise LocationError(f"{quoted(secret_id)} is not a secret ARN (…:secret:NAME-XXXXXX)")
    return SecretsManagerLocation(secret_id, arn)


def parameter_name_of(arn: ResourceArn) -> str:
    """The name of the parameter an SSM ARN names: ``parameter/a/b`` is ``/a/b`` and
    ``parameter/db`` is ``db`` (a one-level name written ``/db`` has the same ARN)."""
    rest = arn.resource.removeprefix("parameter/")
    return "/" + rest if "/" in rest else rest


def _ssm(reference: str) -> SsmLocation:
    arn = None
    name = reference
    if reference.startswith("arn:"):
        arn = parse_arn(reference, "ssm")
        if not arn.resource.startswith("parameter/"):
            raise LocationError(f"{quoted(reference)} is not a parameter ARN (…:parameter/NAME)")
        name = parameter_name_of(arn)
    if len(name) > _MAX_PARAMETER_NAME or not _PARAMETER_NAME.fullmatch(name):
        raise LocationError(
            f"{quoted(name)} is not a parameter name (A-Z a-z 0-9 _ . -, levels "
            f"separated by /, at most 15 levels and {_MAX_PARAMETER_NAME} characters)"
        )
    if name.lstrip("/").lower().startswith(("aws", "ssm")):
        raise LocationError(f"{quoted(name)}: parameter names cannot begin with aws or ssm")
    return SsmLocation(name, arn)


def _s3(rest: str) -> S3Location:
    bucket, slash, key = rest.partition("/")
    if not slash or not key:
        raise LocationError(f"{quoted(S3 + rest)}: expected s3://BUCKET/KEY")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket or _is_ipv4(bucket):
        raise LocationError(
            f"{quoted(bucket)} is not an S3 bucket name (3-63 of a-z 0-9 . -, starting "
            "and ending with a letter or digit)"
        )
    if len(key.encode()) > _MAX_OBJECT_KEY_BYTES:
        raise LocationError(f"the object key is over {_MAX_OBJECT_KEY_BYTES} bytes")
    return S3Location(bucket, key)


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def parse_location(text: str) -> Location:
    """A location in one of ``FORMS``; LocationError says what is wrong."""
    if text.startswith(SECRETSMANAGER):
        return _secrets_manager(text.removeprefix(SECRETSMANAGER))
    if text.startswith(SSM):
        return _ssm(text.removeprefix(SSM))
    if text.startswith(S3):
        return _s3(text.removeprefix(S3))
    if text.startswith(FILE):
        path = text.removeprefix(FILE)
        if not path or "\0" in path:
            raise LocationError(f"{quoted(text)}: expected file:PATH")
        return FileLocation(path)
    raise LocationError(f"{quoted(text)} is not a location; expected one of {FORMS}")


def require_pinned(location: Location) -> PinnedLocation:
    """``location`` if it names its resource independently of the credentials' account:
    a Secrets Manager ARN with its 6-character suffix, an SSM ARN, an S3 object
    (whose bucket owner is sent with every read) or a file (of the image);
    LocationError otherwise."""
    if isinstance(location, SecretsManagerLocation):
        if location.arn is None:
            raise LocationError(
                f"{quoted(location.secret_id)}: name the secret by its full ARN "
                "(arn:…:secretsmanager:REGION:ACCOUNT:secret:NAME-XXXXXX)"
            )
        if not _SECRET_SUFFIX.fullmatch(location.arn.resource[-7:]):
            raise LocationError(
                f"{quoted(location.secret_id)}: the ARN lacks Secrets Manager's "
                "6-character suffix (…:secret:NAME-XXXXXX); copy the full ARN"
            )
    if isinstance(location, SsmLocation) and location.arn is None:
        raise LocationError(
            f"{quoted(location.name)}: name the parameter by its ARN "
            "(arn:…:ssm:REGION:ACCOUNT:parameter/NAME)"
        )
    return location

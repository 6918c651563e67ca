"""``enclave-agent seal NAME --key-id KEY --to DEST``: seal a secret and store it.

Run by an operator, outside the enclave, with the operator's own AWS credentials and
endpoint settings (botocore's chain: ``AWS_PROFILE``, ``AWS_REGION``,
``AWS_ENDPOINT_URL_KMS``, ``AWS_ENDPOINT_URL_SECRETS_MANAGER``, ``AWS_ENDPOINT_URL_SSM``,
``AWS_ENDPOINT_URL_S3``, ``AWS_CA_BUNDLE`` ...). The value (stdin, or ``--from-file``)
is sealed under KEY for the secret NAME (enclave_agent/runtime/sealed.py: one KMS
Encrypt up to 4096 bytes, an AES-256-GCM envelope under a GenerateDataKey data key up
to 64 KiB, both bound to NAME by the encryption context) and written to DEST
(enclave_agent/runtime/store_location.py): a new Secrets Manager version (the secret is
created if missing), an SSM String parameter in base64 (Advanced tier when over 4096
characters), an S3 object or a file. It prints what it wrote as JSON, never the value.

boto3 (the ``operator`` extra) is imported when the command runs, never at import:
the enclave image has no boto3, and this module is registered in the same command
line. Errors follow enclave_common.cli: exit 2 for what the operator gave (name,
destination, value, region, credentials, a value too large for its store), 1 for what
AWS refused or a file that cannot be written.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from pathlib import Path
from typing import Any

from enclave_agent.runtime.config import SECRET_NAME
from enclave_agent.runtime.sealed import (
    MAX_PLAIN_VALUE,
    MAX_VALUE,
    NONCE_BYTES,
    digest_version,
    encryption_context,
    seal_envelope,
)
from enclave_agent.runtime.store_location import (
    FORMS,
    FileLocation,
    Location,
    LocationError,
    S3Location,
    SecretsManagerLocation,
    SsmLocation,
    parse_location,
)
from enclave_common.aws import is_account_id
from enclave_common.cli import CommandFailed, UsageError

SECRETS_MANAGER_LIMIT = 65536  # SecretBinary, bytes
SSM_STANDARD_LIMIT = 4096  # a String parameter's value, characters
SSM_ADVANCED_LIMIT = 8192


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "seal",
        help="seal a secret under a KMS key, bound to its name, and store it",
        description="Seal a secret's value (stdin, or --from-file) under KEY for the secret "
        "NAME and store it at DEST: " + FORMS + ". Prints what it wrote as JSON, never "
        "the value.",
    )
    parser.add_argument(
        "name", metavar="NAME", help="the secret's name (the agent's [secrets.NAME])"
    )
    parser.add_argument("--key-id", required=True, metavar="KEY", help="KMS key id, ARN or alias")
    parser.add_argument("--to", required=True, metavar="DEST", help=FORMS)
    parser.add_argument("--from-file", type=Path, metavar="F", help="read the value from F")
    parser.add_argument("--region", help="AWS region (default: the AWS configuration's)")
    parser.add_argument(
        "--bucket-owner",
        metavar="ACCOUNT",
        help="s3:// only: the bucket's account; S3 refuses the write if another owns it",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print(json.dumps(seal_and_store(args), indent=2))
    return 0


def seal_and_store(args: argparse.Namespace) -> dict[str, Any]:
    if not SECRET_NAME.match(args.name):
        raise UsageError(f"secret name {args.name!r} must be 1-128 of A-Z a-z 0-9 _ . - ")
    try:
        location = parse_location(args.to)
    except LocationError as exc:
        raise UsageError(f"--to: {exc}") from None
    if args.bucket_owner is not None:
        if not isinstance(location, S3Location):
            raise UsageError("--bucket-owner applies to an s3:// destination only")
        if not is_account_id(args.bucket_owner):
            raise UsageError("--bucket-owner must be a 12-digit account id")
    value = read_value(args.from_file)

    try:
        import boto3  # the operator extra's; never in the enclave
    except ImportError:
        raise UsageError(
            "boto3 is not installed: seal needs the operator extra "
            "(pip install 'enclave-kms[operator]')"
        ) from None
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError

    try:
        session = boto3.session.Session(region_name=args.region)
        blob, form, key_arn = seal(session.client("kms"), args.name, args.key_id, value)
        check_fits(location, blob)
        written = store(session, location, blob, args.bucket_owner)
    except NoRegionError:
        raise UsageError(
            "no AWS region: pass --region or set AWS_DEFAULT_REGION (or a profile's region)"
        ) from None
    except NoCredentialsError:
        raise UsageError("no AWS credentials found (environment, profile, instance role)") from None
    except ClientError as exc:
        error = exc.response.get("Error", {})
        raise CommandFailed(
            f"{exc.operation_name}: {error.get('Code', '?')}: {error.get('Message', '')}"
        ) from None
    except BotoCoreError as exc:
        raise CommandFailed(str(exc)) from None
    return {
        "name": args.name,
        "form": form,
        "key_id": key_arn,
        "sealed_bytes": len(blob),
        "destination": args.to,
        **written,
    }


def read_value(path: Path | None) -> bytes:
    """The value to seal, from ``path`` or stdin: 1 to MAX_VALUE bytes, taken as is."""
    try:
        if path is None:
            value = sys.stdin.buffer.read(MAX_VALUE + 1)
        else:
            with path.open("rb") as handle:
                value = handle.read(MAX_VALUE + 1)
    except OSError as exc:
        raise UsageError(f"cannot read {path or 'stdin'}: {exc.strerror}") from None
    if not value:
        raise UsageError("the value is empty")
    if len(value) > MAX_VALUE:
        raise UsageError(f"the value is over {MAX_VALUE} bytes (64 KiB), the most a secret may be")
    return value


def seal(kms: Any, name: str, key_id: str, value: bytes) -> tuple[bytes, str, str]:
    """(sealed bytes, form, the key's ARN as KMS answered it) for ``value``."""
    context = encryption_context(name)
    if len(value) <= MAX_PLAIN_VALUE:
        answer = kms.encrypt(KeyId=key_id, Plaintext=value, EncryptionContext=context)
        return bytes(answer["CiphertextBlob"]), "kms", str(answer["KeyId"])
    answer = kms.generate_data_key(KeyId=key_id, KeySpec="AES_256", EncryptionContext=context)
    blob = seal_envelope(
        name, value, answer["Plaintext"], answer["CiphertextBlob"], os.urandom(NONCE_BYTES)
    )
    return blob, "envelope", str(answer["KeyId"])


def check_fits(location: Location, blob: bytes) -> None:
    """Refuse, before writing, a sealed value larger than its store can hold."""
    if isinstance(location, SecretsManagerLocation) and len(blob) > SECRETS_MANAGER_LIMIT:
        limit, where = f"{SECRETS_MANAGER_LIMIT} bytes", "a Secrets Manager secret holds"
    elif isinstance(location, SsmLocation) and _base64_length(blob) > SSM_ADVANCED_LIMIT:
        limit = f"{SSM_ADVANCED_LIMIT} characters of base64 ({_base64_length(blob)} needed)"
        where = "an SSM parameter (Advanced tier) holds"
    else:
        return
    raise UsageError(
        f"the sealed value is {len(blob)} bytes; {where} at most {limit}: "
        "use s3:// (or file:) for this secret"
    )


def _base64_length(blob: bytes) -> int:
    return 4 * ((len(blob) + 2) // 3)


def store(
    session: Any, location: Location, blob: bytes, bucket_owner: str | None
) -> dict[str, Any]:
    """Write ``blob`` at ``location``; what was written, for the operator (never the value)."""
    if isinstance(location, SecretsManagerLocation):
        return _secrets_manager(session.client("secretsmanager"), location, blob)
    if isinstance(location, SsmLocation):
        return _ssm(session.client("ssm"), location, blob)
    if isinstance(location, S3Location):
        return _s3(session.client("s3"), location, blob, bucket_owner)
    return _file(location, blob)


def _secrets_manager(client: Any, location: SecretsManagerLocation, blob: bytes) -> dict[str, Any]:
    from botocore.exceptions import ClientError

    created = False
    try:
        answer = client.put_secret_value(SecretId=location.secret_id, SecretBinary=blob)
    except ClientError as exc:
        missing = exc.response.get("Error", {}).get("Code") == "ResourceNotFoundException"
        if not missing or location.arn is not None:  # an ARN names an existing secret only
            raise
        answer = client.create_secret(Name=location.secret_id, SecretBinary=blob)
        created = True
    return {
        "arn": answer["ARN"],
        "version_id": answer["VersionId"],
        "created": created,
        "from": f"secretsmanager:{answer['ARN']}",
    }


def _ssm(client: Any, location: SsmLocation, blob: bytes) -> dict[str, Any]:
    text = base64.b64encode(blob).decode()
    request: dict[str, Any] = {"Name": location.name, "Value": text, "Type": "String"}
    if len(text) > SSM_STANDARD_LIMIT:
        request["Tier"] = "Advanced"
    answer = client.put_parameter(Overwrite=True, **request)
    version = int(answer["Version"])
    parameter = client.get_parameter(Name=f"{location.name}:{version}")["Parameter"]
    return {
        "arn": parameter["ARN"],
        "version": version,
        "tier": answer.get("Tier"),
        "from": f"ssm:{parameter['ARN']}",
    }


def _s3(client: Any, location: S3Location, blob: bytes, owner: str | None) -> dict[str, Any]:
    request: dict[str, Any] = {
        "Bucket": location.bucket,
        "Key": location.key,
        "Body": blob,
        "ContentType": "application/octet-stream",
    }
    if owner is not None:
        request["ExpectedBucketOwner"] = owner
    answer = client.put_object(**request)
    return {
        "etag": answer.get("ETag"),
        "version_id": answer.get("VersionId"),
        "from": str(location),
    }


def _file(location: FileLocation, blob: bytes) -> dict[str, Any]:
    """The raw sealed bytes, replacing the file at once (a reader sees old or new).
    ``from`` names the file where it is now; in an image, the path it has there."""
    path = Path(location.path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("wb") as handle:
            handle.write(blob)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise CommandFailed(f"cannot write {path}: {exc.strerror}") from None
    where = path.resolve()
    return {
        "path": str(where),
        "version": digest_version(blob),  # what the agent serves as its version
        "from": f"file:{where}",
    }

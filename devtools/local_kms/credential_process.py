"""``python -m devtools.local_kms.credential_process --state-file FILE [--ttl S]
[--account ID] [--principal ARN]``.

Prints botocore ``credential_process`` JSON (Version 1, AccessKeyId, SecretAccessKey,
SessionToken, Expiration) for short-lived credentials minted by the running stand-in,
so a shared-config profile ``credential_process = python -m ...`` gets credentials that
expire and are refreshed, as with STS: of the stand-in's primary account, or of
``--account``, signing as any principal of it or as ``--principal`` (an IAM user or role
ARN of that account). Exit status 1 with a message on stderr on failure.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from devtools.local_kms.admin_client import AdminError, mint_credentials


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.local_kms.credential_process")
    parser.add_argument("--state-file", type=Path, required=True)
    parser.add_argument("--ttl", type=float, default=3600.0, help="lifetime in seconds")
    parser.add_argument("--account", help="one of the stand-in's accounts (default: primary)")
    parser.add_argument("--principal", help="an IAM user or role ARN of that account")
    args = parser.parse_args(argv)
    try:
        document = mint_credentials(
            args.state_file, args.ttl, account=args.account, principal=args.principal
        )
    except AdminError as exc:
        print(f"local-kms credential_process: {exc}", file=sys.stderr)
        return 1
    print(document)
    return 0


if __name__ == "__main__":
    sys.exit(main())

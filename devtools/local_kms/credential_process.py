"""``python -m devtools.local_kms.credential_process --state-file FILE [--ttl S]``.

Prints botocore ``credential_process`` JSON (Version 1, AccessKeyId, SecretAccessKey,
SessionToken, Expiration) for short-lived credentials minted by the running stand-in,
so a shared-config profile ``credential_process = python -m ...`` gets credentials that
expire and are refreshed, as with STS. Exit status 1 with a message on stderr on failure.
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
    args = parser.parse_args(argv)
    try:
        document = mint_credentials(args.state_file, args.ttl)
    except AdminError as exc:
        print(f"local-kms credential_process: {exc}", file=sys.stderr)
        return 1
    print(document)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Talk to a running stand-in's admin routes, given its state file (stdlib only).

    python -m devtools.local_kms.admin_client --state-file F faults internal --count 2
    python -m devtools.local_kms.admin_client --state-file F faults delay --count 1 --delay 3
    python -m devtools.local_kms.admin_client --state-file F faults internal --count 0  # clear
    python -m devtools.local_kms.admin_client --state-file F faults internal --service ssm
    python -m devtools.local_kms.admin_client --state-file F document-age 60 [--answer T]
    python -m devtools.local_kms.admin_client --state-file F document-age none  # clear

From Python (tests): ``set_faults(state_file, "throttle", count=3)`` (``service=``
"secretsmanager", "ssm" or "s3" for a store of a stand-in run with ``--stores``),
``set_document_age(state_file, 1.0, answer="AccessDeniedException")``,
``mint_credentials(state_file, ttl=60, account="444455556666")``,
``account_credentials(state, account)``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from devtools.local_kms.faults import DOCUMENT_ANSWERS, KINDS, SERVICES

ADMIN_TOKEN_HEADER = "X-Local-Kms-Admin-Token"
TIMEOUT = 10.0


class AdminError(Exception):
    """The state file is unreadable or the stand-in refused or did not answer."""


def load_state(state_file: Path) -> dict[str, Any]:
    try:
        state = json.loads(Path(state_file).read_text())
    except (OSError, ValueError) as exc:
        raise AdminError(f"cannot read state file {state_file}: {exc}") from exc
    if not isinstance(state, dict) or "admin_token" not in state:
        raise AdminError(f"{state_file} is not a local KMS state file")
    return state


def _post(state_file: Path, path: str, document: dict[str, Any]) -> dict[str, Any]:
    state = load_state(state_file)
    context = ssl.create_default_context(cafile=state["ca_bundle"])
    connection = http.client.HTTPSConnection(
        state["host"], state["port"], context=context, timeout=TIMEOUT
    )
    try:
        connection.request(
            "POST",
            f"/_local_kms/{path}",
            body=json.dumps(document),
            headers={ADMIN_TOKEN_HEADER: state["admin_token"], "Content-Type": "application/json"},
        )
        response = connection.getresponse()
        raw = response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise AdminError(f"local KMS at {state.get('endpoint')} did not answer: {exc}") from exc
    finally:
        connection.close()
    try:
        answer = json.loads(raw)
    except ValueError as exc:
        raise AdminError(f"local KMS answered {response.status} with non-JSON") from exc
    if not isinstance(answer, dict):
        raise AdminError(f"local KMS answered {response.status} with a non-object")
    if response.status != 200:
        raise AdminError(f"local KMS refused ({response.status}): {answer.get('error')}")
    return answer


def set_faults(
    state_file: Path, kind: str, *, count: int = 1, delay: float = 0.0, service: str = "kms"
) -> int:
    """Make the next ``count`` calls to ``service`` fail or stall (replacing any plan
    set before); returns the number pending."""
    document: dict[str, Any] = {"kind": kind, "count": count, "service": service}
    if delay:
        document["delay"] = delay
    return int(_post(state_file, "faults", document)["pending"])


def set_document_age(
    state_file: Path, max_age: float | None, *, answer: str = "ValidationException"
) -> float | None:
    """Refuse attestation documents older than ``max_age`` seconds (None: no more), with
    ``answer`` (ValidationException or AccessDeniedException)."""
    document: dict[str, Any] = {"max_age": max_age, "answer": answer}
    result = _post(state_file, "document_age", document)["max_age"]
    return None if result is None else float(result)


def mint_credentials(
    state_file: Path, ttl: float, *, account: str | None = None, principal: str | None = None
) -> str:
    """botocore credential_process JSON for fresh credentials living ``ttl`` seconds, of
    ``account`` (default: the primary), signing as ``principal`` (an IAM user or role
    ARN of that account; default: any principal of it)."""
    document: dict[str, Any] = {"ttl": ttl}
    if account is not None:
        document["account"] = account
    if principal is not None:
        document["principal"] = principal
    return json.dumps(_post(state_file, "credentials", document))


def account_credentials(state: dict[str, Any], account: str) -> tuple[str, str]:
    """(access key id, secret key): the long-term credentials of ``account`` in a state
    file's content; AdminError if the stand-in does not speak for that account."""
    for entry in state.get("accounts", []):
        if entry.get("account_id") == account:
            return str(entry["aws_access_key_id"]), str(entry["aws_secret_access_key"])
    raise AdminError(f"the local KMS does not speak for account {account}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.local_kms.admin_client")
    parser.add_argument("--state-file", type=Path, required=True)
    commands = parser.add_subparsers(dest="command", required=True)
    faults = commands.add_parser("faults", help="make the next calls to a service fail or stall")
    faults.add_argument("kind", choices=KINDS)
    faults.add_argument("--count", type=int, default=1)
    faults.add_argument("--delay", type=float, default=0.0)
    faults.add_argument("--service", choices=SERVICES, default="kms")
    age = commands.add_parser("document-age", help="refuse attestation documents older than N s")
    age.add_argument("max_age", help="seconds, or 'none' to clear the rule")
    age.add_argument("--answer", choices=DOCUMENT_ANSWERS, default="ValidationException")
    args = parser.parse_args(argv)
    try:
        if args.command == "document-age":
            limit = None if args.max_age == "none" else float(args.max_age)
            answer: dict[str, Any] = {
                "max_age": set_document_age(args.state_file, limit, answer=args.answer)
            }
        else:
            count = set_faults(
                args.state_file,
                args.kind,
                count=args.count,
                delay=args.delay,
                service=args.service,
            )
            answer = {"pending": count}
    except (AdminError, ValueError) as exc:
        print(f"local-kms admin: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())

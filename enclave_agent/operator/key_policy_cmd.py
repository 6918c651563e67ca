"""``enclave-agent key-policy``: print a KMS key policy for an enclave image.

Runs on a workstation or the parent, never in the enclave: it reads nitro-cli's
measurements and prints JSON for ``aws kms create-key --policy`` or
``aws kms put-key-policy --policy`` on stdout (only that, so it can be redirected),
and on stderr the ``trusted_keys`` line the agent's config needs to go with it,
as TOML (comments and the line) that can be pasted as is.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from enclave_agent.operator.key_policy import (
    DEFAULT_OPERATIONS,
    MAX_INPUT_BYTES,
    PARENT_MAY_CALL,
    PASS_THROUGH_OPERATIONS,
    RECIPIENT_OPERATIONS,
    KeyPolicyError,
    build_key_policy,
    enclave_statement,
    parse_measurements,
    parse_pcr_index,
    pass_through_operation,
    trusted_keys_entry,
    with_extra_pcrs,
)
from enclave_agent.runtime.trusted_keys import KeyArn, toml_line
from enclave_common.cli import UsageError


def _read_measurements(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read(MAX_INPUT_BYTES + 1)
    try:
        with Path(path).open("rb") as handle:
            return handle.read(MAX_INPUT_BYTES + 1)
    except OSError as error:
        raise KeyPolicyError(f"cannot read {path}: {error.strerror}") from None


def _parse_extra_pcr(text: str) -> tuple[int, str]:
    index, sep, value = text.partition("=")
    if not sep:
        raise KeyPolicyError(f"--pcr takes N=HEX (e.g. 3=<96 hex digits>), got {text!r}")
    return parse_pcr_index(index), value


def _trusted_keys_note(
    entry: KeyArn, encrypt_principal: str | None, pass_through: list[str]
) -> str:
    """What goes to stderr: the agent config's line, and what it means, as TOML."""
    lines = ["# enclave-agent config (measured with the image): the key this policy is for"]
    if entry.is_account:
        lines.append(
            f"# (every key of account {entry.account} in {entry.region}: only if no principal "
            "the parent can use may CreateKey, UpdateAlias or PutKeyPolicy there; "
            "--key-id ID trusts this key alone)"
        )
    lines.append(toml_line([entry]))
    if encrypt_principal is None and "Encrypt" not in pass_through:
        lines.append(
            "# no principal may kms:Encrypt under this key "
            "(--encrypt-principal ARN names the operator who encrypts its secrets)"
        )
    if pass_through:
        lines.append(
            f"# the role may call {', '.join(pass_through)} without the enclave: no condition "
            "binds a call without Recipient to it, so the parent may call them too"
        )
        lines += [
            f"# {name}: {PARENT_MAY_CALL[name]}" for name in pass_through if name in PARENT_MAY_CALL
        ]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    try:
        images = [parse_measurements(_read_measurements(path)) for path in args.measurements]
        extra = dict(_parse_extra_pcr(text) for text in args.pcr)
        if extra:
            images = [with_extra_pcrs(image, extra) for image in images]
        include = (
            None if args.include_pcr is None else [parse_pcr_index(x) for x in args.include_pcr]
        )
        operations = args.operation or list(DEFAULT_OPERATIONS)
        entry = trusted_keys_entry(
            args.role_arn, args.region, account_id=args.account_id, key_id=args.key_id
        )
        pass_through = list(dict.fromkeys(map(pass_through_operation, args.pass_through)))
        document: dict[str, Any]
        if args.statement_only:
            if len(images) != 1:
                raise KeyPolicyError("--statement-only takes one --measurements file")
            if pass_through:
                raise KeyPolicyError(
                    "--statement-only prints the enclave statement alone: leave out "
                    "--pass-through, or print the whole policy"
                )
            document = enclave_statement(
                images[0],
                args.role_arn,
                operations=operations,
                include_pcrs=include,
                allow_zero=args.allow_debug_zeros,
            )
        else:
            document = build_key_policy(
                images,
                args.role_arn,
                operations=operations,
                account_id=args.account_id,
                include_pcrs=include,
                allow_zero=args.allow_debug_zeros,
                encrypt_principal=args.encrypt_principal,
                pass_through=pass_through,
            )
    except KeyPolicyError as error:
        raise UsageError(str(error)) from None
    json.dump(document, sys.stdout, indent=2)
    sys.stdout.write("\n")
    sys.stderr.write(_trusted_keys_note(entry, args.encrypt_principal, pass_through))
    return 0


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "key-policy",
        help="print a KMS key policy that admits only the measured enclave image",
        description=(
            "Read nitro-cli's measurements (build-enclave, describe-eif or describe-enclaves "
            "output, or verify-attestation's for a running enclave's document) and print a "
            "key policy: the account may administer the key (not encrypt or decrypt); "
            "the role may use it only from an enclave whose attestation carries "
            "these PCRs (PCR0 as kms:RecipientAttestation:ImageSha384, others as "
            "kms:RecipientAttestation:PCR<n>, compared with StringEqualsIgnoreCase); "
            "--encrypt-principal alone may encrypt; --pass-through grants the role operations "
            "that carry no Recipient. stdout: the policy JSON; stderr: the "
            "agent config's trusted_keys line that goes with it."
        ),
    )
    parser.add_argument(
        "--measurements",
        required=True,
        action="extend",
        nargs="+",
        metavar="FILE",
        help="nitro-cli's JSON output ('-' for stdin); repeat it to admit several images "
        "(one statement each), e.g. the old and the new one during an upgrade",
    )
    parser.add_argument(
        "--role-arn",
        required=True,
        metavar="ARN",
        help="the IAM role whose credentials the proxy hands to the enclave",
    )
    parser.add_argument(
        "--region",
        required=True,
        help="the key's region (for the agent config's trusted_keys line)",
    )
    parser.add_argument(
        "--key-id",
        metavar="ID",
        help="the key's id, when it exists already: the trusted_keys line then names this "
        "key alone (default: every key of the account in --region)",
    )
    parser.add_argument(
        "--encrypt-principal",
        metavar="ARN",
        help="the IAM role or user (not the enclave's role) that may kms:Encrypt and "
        "kms:GenerateDataKey under the key, to seal the image's secrets; without it nobody may",
    )
    parser.add_argument(
        "--operation",
        action="extend",
        nargs="+",
        metavar="OP",
        help=f"allowed operation, repeatable: {', '.join(RECIPIENT_OPERATIONS)} (default Decrypt)",
    )
    parser.add_argument(
        "--pass-through",
        action="extend",
        nargs="+",
        default=[],
        metavar="OP",
        help="an operation the agent passes through (no Recipient) that the role may call, "
        f"repeatable: {', '.join(PASS_THROUGH_OPERATIONS)}; no condition ties these to the "
        "enclave, so the parent holding the role may call them too (Encrypt not with Decrypt)",
    )
    parser.add_argument(
        "--account-id",
        metavar="ID",
        help="account that administers the key (default: the role's account)",
    )
    parser.add_argument(
        "--include-pcr",
        action="extend",
        nargs="+",
        metavar="N",
        help="PCR to require besides PCR0, repeatable (default: every PCR given)",
    )
    parser.add_argument(
        "--pcr",
        action="extend",
        nargs="+",
        default=[],
        metavar="N=HEX",
        help="add a PCR value nitro-cli does not print (PCR3: parent's role, PCR4: instance id)",
    )
    parser.add_argument(
        "--statement-only",
        action="store_true",
        help="print only the enclave statement, to merge into an existing policy",
    )
    parser.add_argument(
        "--allow-debug-zeros",
        action="store_true",
        help="accept all-zero PCRs (debug-mode enclaves); for throwaway test keys only",
    )
    parser.set_defaults(func=run)

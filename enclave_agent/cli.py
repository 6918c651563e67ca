"""The ``enclave-agent`` command line: one sub-command per concern.

Each command module exposes ``add_parser(subparsers)``, which registers its parser
and sets ``func`` (taking the parsed namespace, returning the exit code). Every verb
runs under ``enclave_common.cli.run_command``: one error prefix, one exit-code
convention, no traceback when the output pipe closes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from enclave_agent.operator import key_policy_cmd, seal, verify_cmd
from enclave_agent.runtime import commands
from enclave_common.cli import run_command

COMMAND_MODULES = (key_policy_cmd, verify_cmd, seal, commands)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="enclave-agent",
        description="Fetch secrets from AWS KMS inside a Nitro Enclave and serve them to apps.",
    )
    subparsers = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(f"enclave-agent {args.verb}", lambda: int(args.func(args)))


if __name__ == "__main__":
    sys.exit(main())

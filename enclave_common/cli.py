"""The command-line conventions of ``enclave-agent`` and ``enclave-proxy``, in one place.

- An error is one line on stderr, ``PROG VERB: message`` (argparse's own usage errors
  carry the same prefix), never a traceback.
- Exit codes: 0 success; 1 a runtime failure (KMS or the agent refused, the agent
  cannot be reached, a document is refused, an output cannot be written); 2 usage
  or configuration (a bad flag or value, an unreadable input file, an invalid
  config); 130 interrupted.
- Output into a pipe whose reader has gone (``| head``) ends the command quietly,
  with status 1, as Python's documentation recommends.

A verb raises ``UsageError`` or ``CommandFailed``; ``run_command`` prints and maps it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

USAGE = 2
FAILED = 1
INTERRUPTED = 130


class CommandError(Exception):
    """A verb's error for the user: one line, printed after the command's prefix."""

    exit_code = FAILED


class CommandFailed(CommandError):
    """The command ran and failed (exit 1)."""


class UsageError(CommandError):
    """The command was given something it cannot use: a flag, a value, a file or a
    config (exit 2)."""

    exit_code = USAGE


def _silence_stdout() -> None:
    # Python flushes stdout again at exit; with the reader gone that flush would
    # print "Exception ignored ... BrokenPipeError". Point it at /dev/null instead.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def run_command(prefix: str, command: Callable[[], int]) -> int:
    """Run ``command`` (returning its exit code) under the conventions above;
    ``prefix`` begins each error line, e.g. ``enclave-agent decrypt``."""
    try:
        code = command()
        sys.stdout.flush()
    except CommandError as exc:
        print(f"{prefix}: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        _silence_stdout()
        return FAILED
    except KeyboardInterrupt:
        return INTERRUPTED
    return code

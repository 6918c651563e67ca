"""The command lines as a user meets them: one error prefix, one exit-code convention
(2 usage or config, 1 runtime; enclave_common.cli), no traceback into a closed pipe,
an unreachable agent named with the way to change it, no raw bytes on a terminal.

Every case runs the real command in a subprocess. The verbs that need an agent find
none here (its answers are tested in test_client.py against the real server)."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from enclave_agent.simulated.nsm import SimulatedNsm
from tests.conftest import REPO_ROOT

MEASUREMENTS = REPO_ROOT / "tests" / "data" / "nitro_cli_build_enclave.out"
ROLE = "arn:aws:iam::111122223333:role/enclave"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ENCLAVE_AGENT_SOCKET"}
    return {**env, "PYTHONPATH": str(REPO_ROOT), **extra}


def _agent(
    *argv: str, stdout: int | None = subprocess.PIPE, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "enclave_agent.cli", *argv],
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(**env),
        timeout=60,
        check=False,
    )


@pytest.fixture
def absent(tmp_path: Path) -> str:
    return str(tmp_path / "no-agent-here.sock")


@pytest.fixture
def refused_document(tmp_path: Path) -> str:
    """A well-formed document the AWS root does not sign: verify-attestation refuses it."""
    path = tmp_path / "doc.cbor"
    path.write_bytes(SimulatedNsm.create().attestation())
    return str(path)


def _cases(missing: str, absent: str, refused_document: str) -> list[tuple[list[str], int]]:
    policy = ["key-policy", "--role-arn", ROLE, "--region", "eu-west-1", "--measurements"]
    return [
        (["serve", "--config", missing], 2),
        (["run", "--config", missing, "--", "true"], 2),
        (["run", "--config", missing], 2),
        (["decrypt", "--socket", absent, "--ciphertext-base64", "not base64!"], 2),
        (["decrypt", "--socket", absent, "--ciphertext-file", missing], 2),
        (
            [
                "decrypt",
                "--socket",
                absent,
                "--ciphertext-base64",
                "AA==",
                "--encryption-context",
                "x",
            ],
            2,
        ),
        (["decrypt", "--socket", absent, "--ciphertext-base64", "AA=="], 1),
        (["generate-data-key", "--socket", absent, "--key-id", "alias/k"], 1),
        (["generate-random", "--socket", absent, "--number-of-bytes", "8", "--base64"], 1),
        (["secret", "--socket", absent, "db"], 1),
        ([*policy, missing], 2),
        ([*policy, str(MEASUREMENTS), "--pcr", "nonsense"], 2),
        (["verify-attestation", missing], 2),
        (["verify-attestation", refused_document], 1),
    ]


def test_every_verb_has_one_error_prefix_and_one_exit_code_convention(
    tmp_path: Path, absent: str, refused_document: str
) -> None:
    missing = str(tmp_path / "missing.toml")
    for argv, code in _cases(missing, absent, refused_document):
        result = _agent(*argv)
        lines = result.stderr.splitlines()
        assert (result.returncode, len(lines)) == (code, 1), (argv, result.stderr)
        assert lines[0].startswith(f"enclave-agent {argv[0]}: "), (argv, result.stderr)


def test_usage_errors_from_argparse_share_the_prefix_and_the_code(absent: str) -> None:
    for argv in (["decrypt"], ["generate-random", "--number-of-bytes", "x"], ["nosuchverb"]):
        result = _agent(*argv)
        assert result.returncode == 2
        assert result.stderr.splitlines()[-1].startswith("enclave-agent")
        assert ": error: " in result.stderr


def test_cannot_reach_the_agent_names_the_path_and_how_to_change_it(absent: str) -> None:
    by_flag = _agent("secret", "db", "--socket", absent)
    assert by_flag.stderr == (
        f"enclave-agent secret: cannot reach the agent at {absent} (No such file or "
        "directory); name its socket with --socket PATH or $ENCLAVE_AGENT_SOCKET\n"
    )
    by_env = _agent("secret", "db", ENCLAVE_AGENT_SOCKET=absent + ".env")
    assert f"cannot reach the agent at {absent}.env " in by_env.stderr
    default = _agent("secret", "db")
    assert "cannot reach the agent at /run/enclave-agent/agent.sock " in default.stderr


def _into_closed_pipe(*argv: str) -> subprocess.CompletedProcess[str]:
    """The command's stdout is a pipe whose reader is already gone, as `| head -1`
    leaves it once head has its line."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return _agent(*argv, stdout=write_end)
    finally:
        os.close(write_end)


def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    nsm = SimulatedNsm.create()
    (tmp_path / "root.pem").write_bytes(nsm.root_pem)
    (tmp_path / "doc.cbor").write_bytes(nsm.attestation())
    verify = [
        "verify-attestation",
        str(tmp_path / "doc.cbor"),
        "--root",
        str(tmp_path / "root.pem"),
    ]
    policy = ["key-policy", "--role-arn", ROLE, "--region", "eu-west-1"]
    for argv in (verify, [*policy, "--measurements", str(MEASUREMENTS)]):
        assert _agent(*argv).returncode == 0
        result = _into_closed_pipe(*argv)
        assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr
        assert result.returncode == 1


def test_generate_random_writes_no_raw_bytes_to_a_terminal(absent: str) -> None:
    leader, terminal = pty.openpty()
    try:
        raw = _agent(
            "generate-random", "--number-of-bytes", "8", "--socket", absent, stdout=terminal
        )
        text = _agent(
            "generate-random",
            "--number-of-bytes",
            "8",
            "--base64",
            "--socket",
            absent,
            stdout=terminal,
        )
    finally:
        os.close(terminal)
        os.close(leader)
    assert raw.returncode == 2
    assert raw.stderr == (
        "enclave-agent generate-random: will not write raw random bytes to a terminal: "
        "add --base64, or redirect the output (> FILE or | CMD)\n"
    )
    # Refused before asking the agent; with --base64 it goes on (and finds no agent).
    assert text.returncode == 1 and "cannot reach the agent" in text.stderr

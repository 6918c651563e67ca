"""``enclave-agent verify-attestation``: the operator's reader of PCRs."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

from enclave_agent.cli import main
from enclave_agent.simulated.nsm import SimulatedNsm

PRODUCTION = "nitrite_production_2024-09-07.cbor"
PRODUCTION_AT = "2024-09-07T14:37:40Z"


def _expected_pcr0(vectors_dir: Path) -> str:
    for line in (vectors_dir / "expected.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["file"] == PRODUCTION:
            return str(row["pcr0"])
    raise AssertionError("production row missing")


def test_prints_verified_fields_as_json(
    vectors_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = vectors_dir / "attestation" / PRODUCTION
    assert main(["verify-attestation", str(path), "--at", PRODUCTION_AT]) == 0
    output = json.loads(capsys.readouterr().out)
    assert output["pcrs"]["0"] == _expected_pcr0(vectors_dir)
    assert output["module_id"] == "i-0a22e5c5f24d22174-enc0191cceb4289903f"
    assert output["timestamp"] == "2024-09-07T14:37:39.545000Z"
    assert output["digest"] == "SHA384"
    assert len(output["nonce"]) == 2048


def test_refusal_exits_1_with_the_reason(
    vectors_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = vectors_dir / "attestation" / PRODUCTION
    assert main(["verify-attestation", str(path)]) == 1  # today: the leaf has long expired
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "not valid at" in captured.err


def test_self_signed_document_is_refused(
    vectors_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = vectors_dir / "attestation" / "nitrite_selfsigned_not_aws.cbor"
    assert main(["verify-attestation", str(path), "--at", "1970-01-20T19:56:20Z"]) == 1
    assert "refused" in capsys.readouterr().err


def test_simulated_document_with_its_root_and_base64_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nsm = SimulatedNsm.create(pcrs={3: b"\x03" * 48})
    (tmp_path / "root.pem").write_bytes(nsm.root_pem)
    (tmp_path / "doc.b64").write_bytes(base64.b64encode(nsm.attestation()) + b"\n")
    capsys.readouterr()  # the simulated NSM's own warning
    argv = ["verify-attestation", str(tmp_path / "doc.b64")]
    assert main([*argv, "--root", str(tmp_path / "root.pem")]) == 0
    assert json.loads(capsys.readouterr().out)["pcrs"]["3"] == "03" * 48
    assert main(argv) == 1  # the default root is AWS's
    assert "trusted root" in capsys.readouterr().err


def test_missing_file_and_bad_instant(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # An input that cannot be read is a usage error (2); a refused document is 1.
    assert main(["verify-attestation", str(tmp_path / "absent.cbor")]) == 2
    assert "cannot read" in capsys.readouterr().err
    with pytest.raises(SystemExit) as caught:
        main(["verify-attestation", str(tmp_path / "absent.cbor"), "--at", "yesterday"])
    assert caught.value.code == 2


def test_runs_as_a_real_command_reading_stdin(vectors_dir: Path) -> None:
    document = (vectors_dir / "attestation" / PRODUCTION).read_bytes()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "enclave_agent.cli",
            "verify-attestation",
            "-",
            "--at",
            PRODUCTION_AT,
        ],
        input=document,
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pcrs"]["0"] == _expected_pcr0(vectors_dir)

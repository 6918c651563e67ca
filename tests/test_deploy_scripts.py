"""scripts/build-eif and scripts/run-enclave without Nitro hardware.

Each script runs from a copy of the repository layout in a temporary directory,
with a PATH holding only the basic tools it needs plus, per test, fake docker /
nitro-cli / systemctl that record their arguments. Missing prerequisites must
make the script exit non-zero, name each one, and leave the tree untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from enclave_agent.operator.key_policy import parse_measurements
from tests.conftest import REPO_ROOT

DATA = Path(__file__).parent / "data"
BASIC_TOOLS = (
    "bash",
    "dirname",
    "mkdir",
    "mktemp",
    "sed",
    "mv",
    "cat",
    "rm",
    "head",
    "grep",
    "cut",
)
EPOCH = "1700000000"  # SOURCE_DATE_EPOCH: the tree here is no git checkout

FAKE_DOCKER = """#!/bin/sh
echo "docker $*" >>"$FAKE_LOG"
if [ "$1" = info ]; then exit "${FAKE_DOCKER_INFO_RC:-0}"; fi
exit 0
"""

FAKE_NITRO_CLI = """#!/bin/sh
echo "nitro-cli $*" >>"$FAKE_LOG"
case "$1" in
build-enclave)
    while [ $# -gt 0 ]; do
        if [ "$1" = --output-file ]; then echo fake-eif >"$2"; fi
        shift
    done
    cat "$FAKE_BUILD_OUTPUT"
    ;;
run-enclave)
    echo "Start allocating memory..."
    echo "Started enclave with enclave-cid: 16, memory: 2048 MiB, cpu-ids: [1, 3]"
    echo '{'
    echo '  "EnclaveName": "enclave-kms",'
    echo '  "EnclaveID": "i-0123456789abcdef0-enc0123456789abcdef",'
    echo '  "ProcessID": 4242,'
    echo '  "EnclaveCID": 16,'
    echo '  "NumberOfCPUs": 2,'
    echo '  "CPUIDs": [1, 3],'
    echo '  "MemoryMiB": 2048'
    echo '}'
    ;;
esac
exit 0
"""

FAKE_SYSTEMCTL = """#!/bin/sh
echo "systemctl $*" >>"$FAKE_LOG"
for unit in $FAKE_ACTIVE; do
    if [ "$unit" = "$3" ]; then exit 0; fi
done
exit 3
"""


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A repository-shaped directory holding the two scripts and the deploy inputs."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    for name in ("build-eif", "run-enclave"):
        shutil.copy2(REPO_ROOT / "scripts" / name, root / "scripts" / name)
    (root / "deploy" / "secrets").mkdir(parents=True)
    shutil.copy2(REPO_ROOT / "deploy" / "Dockerfile", root / "deploy" / "Dockerfile")
    shutil.copy2(REPO_ROOT / "deploy" / "agent.toml", root / "deploy" / "agent.toml")
    (root / "deploy" / "secrets" / "example.sealed").write_bytes(b"\x01\x02sealed")
    return root


def _bin(tmp_path: Path, fakes: dict[str, str]) -> Path:
    directory = tmp_path / "bin"
    directory.mkdir(parents=True, exist_ok=True)
    for tool in BASIC_TOOLS:
        found = shutil.which(tool)
        assert found, f"{tool} is needed to run these tests"
        (directory / tool).symlink_to(found)
    for name, text in fakes.items():
        path = directory / name
        path.write_text(text)
        path.chmod(0o755)
    return directory


def _run(
    tree: Path, script: str, args: list[str], bindir: Path, **env: str
) -> subprocess.CompletedProcess[str]:
    log = tree.parent / "calls.log"
    log.touch()
    environment = {
        "PATH": str(bindir),
        "HOME": str(tree.parent),
        "FAKE_LOG": str(log),
        "FAKE_BUILD_OUTPUT": str(DATA / "nitro_cli_build_enclave.out"),
        **env,
    }
    return subprocess.run(
        [str(tree / "scripts" / script), *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _calls(tree: Path) -> list[str]:
    return (tree.parent / "calls.log").read_text().splitlines()


def test_build_eif_names_missing_docker_and_nitro_cli(tree: Path, tmp_path: Path) -> None:
    before = _files(tree)
    result = _run(tree, "build-eif", [], _bin(tmp_path, {}))
    assert result.returncode == 1
    assert "docker: not found" in result.stderr
    assert "nitro-cli: not found" in result.stderr
    assert _files(tree) == before


def test_build_eif_names_unreachable_daemon_and_missing_secret(tree: Path, tmp_path: Path) -> None:
    (tree / "deploy" / "secrets" / "example.sealed").unlink()
    before = _files(tree)
    bindir = _bin(tmp_path, {"docker": FAKE_DOCKER, "nitro-cli": FAKE_NITRO_CLI})
    result = _run(tree, "build-eif", [], bindir, FAKE_DOCKER_INFO_RC="1")
    assert result.returncode == 1
    assert "docker daemon: not reachable" in result.stderr
    assert "deploy/secrets/example.sealed: not found" in result.stderr
    assert "nitro-cli" not in result.stderr.split("missing prerequisites:")[1]
    assert _calls(tree) == ["docker info"], "nothing but the check may run"
    assert _files(tree) == before


def test_build_eif_builds_and_saves_measurements(tree: Path, tmp_path: Path) -> None:
    bindir = _bin(tmp_path, {"docker": FAKE_DOCKER, "nitro-cli": FAKE_NITRO_CLI})
    result = _run(tree, "build-eif", ["--tag", "example:test"], bindir, SOURCE_DATE_EPOCH=EPOCH)
    assert result.returncode == 0, result.stderr
    assert _calls(tree) == [
        "docker info",
        "docker buildx version",
        f"docker buildx build --file deploy/Dockerfile --build-arg SOURCE_DATE_EPOCH={EPOCH} "
        "--output type=docker,name=example:test,rewrite-timestamp=true .",
        "nitro-cli build-enclave --docker-uri example:test --output-file build/enclave.eif",
    ]
    saved = (tree / "build" / "enclave.measurements.json").read_text()
    assert json.loads(saved)["Measurements"]["PCR0"] in result.stdout
    assert parse_measurements(saved) == parse_measurements(
        (DATA / "nitro_cli_build_enclave.out").read_text()
    )
    assert (tree / "build" / "enclave.eif").exists()
    # For a person: each PCR, the image's trusted_keys, and the key-policy and
    # put-key-policy commands filled in from deploy/agent.toml.
    for index, value in json.loads(saved)["Measurements"].items():
        if index.startswith("PCR"):
            assert f"\n  {index} {value}\n" in result.stderr
    key = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    assert f'\n  trusted_keys = ["{key}"]\n' in result.stderr
    assert (
        "  enclave-agent key-policy --measurements build/enclave.measurements.json \\\n"
        "      --role-arn arn:aws:iam::111122223333:role/ROLE --region us-east-1 "
        "--key-id 1234abcd-12ab-34cd-56ef-1234567890ab \\\n"
    ) in result.stderr
    assert "aws kms put-key-policy --key-id 1234abcd-12ab-34cd-56ef-1234567890ab " in (
        result.stderr
    )


def test_build_eif_needs_the_commit_time(tree: Path, tmp_path: Path) -> None:
    bindir = _bin(tmp_path, {"docker": FAKE_DOCKER, "nitro-cli": FAKE_NITRO_CLI})
    result = _run(tree, "build-eif", [], bindir)
    assert result.returncode == 1
    assert "the commit's time: 'git log' failed" in result.stderr
    assert _calls(tree) == ["docker info", "docker buildx version"], "nothing may be built"


def test_build_eif_signing_needs_both_files(tree: Path, tmp_path: Path) -> None:
    bindir = _bin(tmp_path, {"docker": FAKE_DOCKER, "nitro-cli": FAKE_NITRO_CLI})
    result = _run(tree, "build-eif", ["--signing-certificate", "cert.pem"], bindir)
    assert result.returncode == 1
    assert "--signing-certificate and --private-key go together" in result.stderr
    assert not (tree / "build").exists()


def test_run_enclave_names_every_missing_prerequisite(tree: Path, tmp_path: Path) -> None:
    before = _files(tree)
    bindir = _bin(tmp_path, {"systemctl": FAKE_SYSTEMCTL})
    result = _run(tree, "run-enclave", [], bindir, FAKE_ACTIVE="")
    assert result.returncode == 1
    for needed in (
        "nitro-cli: not found",
        "nitro-enclaves-allocator.service: not active",
        "enclave-proxy.service: not active",
        "build/enclave.eif not found",
    ):
        assert needed in result.stderr
    assert _files(tree) == before
    no_systemd = _run(tree, "run-enclave", [], _bin(tmp_path / "other", {}))
    assert no_systemd.returncode == 1 and "systemctl: not found" in no_systemd.stderr


def test_run_enclave_only_missing_proxy(tree: Path, tmp_path: Path) -> None:
    (tree / "build").mkdir()
    (tree / "build" / "enclave.eif").write_text("eif")
    bindir = _bin(tmp_path, {"systemctl": FAKE_SYSTEMCTL, "nitro-cli": FAKE_NITRO_CLI})
    result = _run(tree, "run-enclave", [], bindir, FAKE_ACTIVE="nitro-enclaves-allocator.service")
    assert result.returncode == 1
    assert "enclave-proxy.service: not active" in result.stderr
    assert "scripts/install-proxy" in result.stderr
    assert "allocator" not in result.stderr.split("missing prerequisites:")[1]
    assert not any(call.startswith("nitro-cli") for call in _calls(tree))


def test_run_enclave_starts_and_explains(tree: Path, tmp_path: Path) -> None:
    (tree / "build").mkdir()
    (tree / "build" / "enclave.eif").write_text("eif")
    bindir = _bin(tmp_path, {"systemctl": FAKE_SYSTEMCTL, "nitro-cli": FAKE_NITRO_CLI})
    active = "nitro-enclaves-allocator.service enclave-proxy.service"
    result = _run(
        tree,
        "run-enclave",
        ["--cpu-count", "4", "--memory", "4096", "--debug-mode", "--console"],
        bindir,
        FAKE_ACTIVE=active,
    )
    assert result.returncode == 0, result.stderr
    enclave_id = "i-0123456789abcdef0-enc0123456789abcdef"
    assert [c for c in _calls(tree) if c.startswith("nitro-cli")] == [
        "nitro-cli run-enclave --eif-path build/enclave.eif --cpu-count 4 --memory 4096 "
        "--enclave-name enclave-kms --debug-mode",
        f"nitro-cli console --enclave-id {enclave_id}",
    ]
    assert f"nitro-cli terminate-enclave --enclave-id {enclave_id}" in result.stderr
    assert '"EnclaveCID": 16' in result.stdout

    production = _run(tree, "run-enclave", ["--console"], bindir, FAKE_ACTIVE=active)
    assert production.returncode == 2 and "--console needs --debug-mode" in production.stderr


def test_scripts_parse_with_bash_n() -> None:
    for name in ("build-eif", "run-enclave"):
        subprocess.run(["bash", "-n", str(REPO_ROOT / "scripts" / name)], check=True, timeout=30)
        assert os.access(REPO_ROOT / "scripts" / name, os.X_OK)


def test_guide_matches_the_tools() -> None:
    """The deployment guide's steps name only flags, scripts and units that exist."""
    import re

    from enclave_agent.cli import build_parser

    section = (REPO_ROOT / "docs" / "deploy.md").read_text().split("\n## Installs", 1)[0]
    flags = re.compile(r"(?<![\w-])(--[a-z][a-z-]*)")
    subparsers = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    key_policy = {o for a in subparsers["key-policy"]._actions for o in a.option_strings}
    step4 = section.split("## 4.", 1)[1].split("## 5.", 1)[0]
    aws_cli = {"--key-id", "--policy-name", "--policy"}
    assert set(flags.findall(step4)) - aws_cli <= key_policy
    scripts_text = "".join(
        (REPO_ROOT / "scripts" / n).read_text() for n in ("build-eif", "run-enclave")
    )
    for usage in re.findall(r"scripts/(?:build-eif|run-enclave) +# (.*)", section):
        for flag in flags.findall(usage):
            assert f"{flag})" in scripts_text, f"docs/deploy.md shows {flag}"
    for path in re.findall(r"`(scripts/[\w-]+)", section):
        assert (REPO_ROOT / path).is_file(), path
    unit = "enclave-proxy.service"
    assert (REPO_ROOT / "systemd" / unit).is_file()
    assert f"proxy={unit}" in (REPO_ROOT / "scripts" / "run-enclave").read_text()
    assert "/opt/enclave-proxy/venv/bin/enclave-proxy" in (REPO_ROOT / "systemd" / unit).read_text()

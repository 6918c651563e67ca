"""The enclave image's Python packages: lean, and the same bytes on every build.

No Docker daemon or nitro-cli here, so the image itself is not built. What is tested
is what decides its Python content: the agent's wheel built from the Dockerfile's
build context, then ``pip install --no-compile --constraint deploy/constraints.txt``
into a fresh directory, twice, with different file times, compared byte for byte.
Offline: the dependencies are this environment's installed copies (scripts/setup
installs them at the pinned versions), re-packed as wheels. deploy/Dockerfile and
scripts/build-eif are then checked for the rules a test cannot run (docs/deploy.md,
"Reproducible builds", says which ones rest on paper).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from devtools.agent_image import (
    ImageBuildError,
    build_agent_wheel,
    copy_build_context,
    image_pins,
    install_agent,
    is_bytecode,
    measure,
    runtime_closure,
    tree_differences,
    tree_files,
    wheelhouse_from_environment,
)
from tests.conftest import REPO_ROOT

DOCKERFILE = REPO_ROOT / "deploy" / "Dockerfile"
TARGET_BYTES = 30_000_000


def _age_files(root: Path, seconds: int) -> None:
    """Give every file under ``root`` another time, as another checkout would."""
    for path in root.rglob("*"):
        os.utime(path, (seconds, seconds))


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two builds of this commit into fresh directories, the Dockerfile's way."""
    work = tmp_path_factory.mktemp("agent-image")
    try:
        wheelhouse_from_environment(work / "wheelhouse")
    except ImageBuildError as exc:
        pytest.fail(str(exc))
    targets = []
    for n, file_time in ((1, 1_000_000_000), (2, 1_600_000_000)):
        context = copy_build_context(work / f"context{n}")
        _age_files(context, file_time)
        built = build_agent_wheel(context, work / f"built{n}")
        # One path for both, as /tmp/wheels in the Dockerfile: pip records it.
        wheel = work / "wheels" / built.name
        wheel.parent.mkdir(exist_ok=True)
        shutil.copyfile(built, wheel)
        target = work / f"install{n}"
        install_agent(target, wheel, wheelhouse=work / "wheelhouse")
        targets.append(target)
    return targets[0], targets[1]


def test_two_builds_install_byte_identical_trees(builds: tuple[Path, Path]) -> None:
    first, second = builds
    assert len(tree_files(first)) > 500
    assert tree_differences(first, second) == []


def test_the_install_holds_no_bytecode(builds: tuple[Path, Path]) -> None:
    assert [p for p in tree_files(builds[0]) if is_bytecode(Path(p))] == []


def test_the_wheel_does_not_depend_on_file_times(tmp_path: Path) -> None:
    wheels = []
    for n, file_time in ((1, 1_000_000_000), (2, 1_700_000_000)):
        context = copy_build_context(tmp_path / f"context{n}")
        _age_files(context, file_time)
        wheels.append(build_agent_wheel(context, tmp_path / f"out{n}").read_bytes())
    assert wheels[0] == wheels[1]


def _run_installed(target: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Python with only ``target`` on its path: no site-packages (-S), not even the
    current directory (-P), run outside the repository."""
    return subprocess.run(
        [sys.executable, "-S", "-P", *args],
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(target)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


IMPORT_EVERYTHING = """
import importlib, importlib.util, pkgutil
import enclave_agent, enclave_common
modules = ["enclave_agent.cli"]
for package in (enclave_agent, enclave_common):
    modules += [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
for name in modules:
    importlib.import_module(name)
absent = [importlib.util.find_spec(name) is None for name in ("boto3", "proxy")]
print(len(modules), *absent)
"""


def test_the_installed_agent_imports_everything_from_its_own_packages(
    builds: tuple[Path, Path], tmp_path: Path
) -> None:
    result = _run_installed(builds[0], tmp_path, "-c", IMPORT_EVERYTHING)
    assert result.returncode == 0, result.stderr
    count, no_boto3, no_proxy = result.stdout.split()
    assert int(count) > 20
    assert (no_boto3, no_proxy) == ("True", "True")


@pytest.mark.parametrize(
    "verb",
    [
        "serve",
        "run",
        "decrypt",
        "generate-data-key",
        "generate-random",
        "secret",
        "key-policy",
        "verify-attestation",
        "seal",
    ],
)
def test_every_verb_starts_from_the_installed_agent(
    builds: tuple[Path, Path], tmp_path: Path, verb: str
) -> None:
    result = _run_installed(builds[0], tmp_path, "-m", "enclave_agent.cli", verb, "--help")
    assert result.returncode == 0, result.stderr
    assert f"enclave-agent {verb}" in result.stdout


def test_seal_without_the_operator_extra_says_what_to_install(
    builds: tuple[Path, Path], tmp_path: Path
) -> None:
    value = tmp_path / "value"
    value.write_bytes(b"v")
    result = _run_installed(
        builds[0], tmp_path, "-m", "enclave_agent.cli", "seal", "db", "--key-id", "k",
        "--to", "file:out", "--from-file", str(value),
    )  # fmt: skip
    assert (result.returncode, result.stderr) == (
        2,
        "enclave-agent seal: boto3 is not installed: seal needs the operator extra "
        "(pip install 'enclave-kms[operator]')\n",
    )


def _security_doc_packages() -> set[str]:
    text = (REPO_ROOT / "docs" / "security.md").read_text()
    section = text.split("## Inside the enclave", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z0-9-]+)` \|", section, re.MULTILINE))


def test_the_image_holds_exactly_the_listed_packages(builds: tuple[Path, Path]) -> None:
    installed = {p.name.split("-")[0].replace("_", "-") for p in builds[0].glob("*.dist-info")}
    installed.discard("enclave-kms")
    assert installed == set(runtime_closure()) == set(image_pins())
    assert installed == _security_doc_packages()
    assert "botocore" not in installed  # the agent's own operations table (issue 13)


def test_the_packages_fit_the_target(builds: tuple[Path, Path]) -> None:
    assert measure(builds[0]).total <= TARGET_BYTES


def test_agent_size_command_prints_the_total() -> None:
    result = subprocess.run(
        [str(REPO_ROOT / "scripts" / "agent-size")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"^total +[\d,]+ +[\d.]+ MB$", result.stdout, re.MULTILINE)


# --- the Dockerfile and build-eif: the rules a test here cannot run ----------------


def _instructions(path: Path) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    lines: list[str] = []
    current = ""
    for raw in path.read_text().splitlines():
        if raw.lstrip().startswith("#") and not current:
            continue
        current += raw.rstrip("\\").strip() + " "
        if not raw.rstrip().endswith("\\"):
            if current.strip():
                lines.append(current.strip())
            current = ""
    return lines


def test_dockerfile_pins_every_base_image_by_digest() -> None:
    bases = [line.split()[1] for line in _instructions(DOCKERFILE) if line.startswith("FROM ")]
    assert bases
    for base in bases:
        assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", base), base
        assert ":latest@" not in base


def test_dockerfile_installs_pinned_packages_without_bytecode() -> None:
    instructions = _instructions(DOCKERFILE)
    installs = [i for i in instructions if re.search(r"\bpip (install|wheel)\b", i)]
    assert len(installs) == 3
    for line in installs:
        if " pip install " in f" {line} ":
            assert "--no-compile" in line and "--constraint /tmp/constraints.txt" in line
        else:
            assert "--no-build-isolation" in line and "--no-deps" in line
    assert not [i for i in instructions if re.search(r"apt-get|apk |curl |wget |^ADD ", i)]
    environment = " ".join(i for i in instructions if i.startswith("ENV "))
    assert environment.count("PYTHONDONTWRITEBYTECODE=1") == 2


def test_dockerfile_takes_source_date_epoch_in_every_stage() -> None:
    stages = "\n".join(_instructions(DOCKERFILE)).split("FROM ")[1:]
    assert len(stages) == 2
    for stage in stages:
        assert "\nARG SOURCE_DATE_EPOCH\n" in stage
    assert 'test -n "$SOURCE_DATE_EPOCH"' in stages[0]


def test_build_eif_normalises_timestamps_from_the_commit() -> None:
    script = (REPO_ROOT / "scripts" / "build-eif").read_text()
    assert "git log -1 --format=%ct" in script
    assert "--build-arg SOURCE_DATE_EPOCH" in script
    assert "rewrite-timestamp=true" in script
    assert "docker build " not in script  # the legacy builder cannot rewrite timestamps

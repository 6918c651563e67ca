"""The agent's packages as the enclave image gets them: build, install, measure.

``deploy/Dockerfile`` builds the agent's wheel from its build context and installs it
with ``pip install --no-compile --constraint deploy/constraints.txt``. This module does
the same steps outside Docker, for the reproducibility test and for the size figure
in docs/benchmarks.md:

    scripts/agent-size [--index] [--keep DIR]

By default it works offline: the agent's dependencies come from this environment's
installed copies (re-packed as wheels, bytecode left out), which scripts/setup
installs at the versions of deploy/constraints.txt. ``--index`` instead lets pip
fetch them from the package index, exactly as the Dockerfile does.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO_ROOT = Path(__file__).resolve().parent.parent
PROJECT = "enclave-kms"
CONSTRAINTS = REPO_ROOT / "deploy" / "constraints.txt"
# The Dockerfile's wheel stage copies exactly these into its build context.
WHEEL_SOURCES = ("pyproject.toml", "enclave_agent", "enclave_common")
# In deploy/constraints.txt, the pins after this line are not in the image.
NOT_IN_IMAGE = "# Not in the image"
# Any fixed instant: what matters is that both builds use the same one.
DEFAULT_EPOCH = 1_700_000_000
# What pip writes about an installation rather than what a wheel holds.
_INSTALL_RECORDS = frozenset({"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"})


class ImageBuildError(Exception):
    """A step could not be done; the message says which and what to do."""


# --- which distributions the agent needs ------------------------------------------


def requirements_of(name: str) -> list[Requirement]:
    """The installed distribution's requirements that apply here: markers evaluated,
    those of its extras left out."""
    requirements = map(Requirement, metadata.requires(name) or [])
    return [r for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})]


def runtime_closure() -> dict[str, str]:
    """Canonical name → installed version of every distribution ``pip install .`` brings
    in (the project itself not included)."""
    seen: dict[str, str] = {}
    pending = requirements_of(PROJECT)
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        if name in seen:
            continue
        try:
            seen[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            raise ImageBuildError(
                f"{name} (needed by the agent) is not installed here: run scripts/setup"
            ) from None
        pending.extend(requirements_of(name))
    return dict(sorted(seen.items()))


def _pins_in(text: str, path: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-c "):
            pins.update(pinned_versions(path.parent / line[3:].strip()))
        elif line:
            name, sep, version = line.partition("==")
            if not sep:
                raise ImageBuildError(f"{path}: not an exact pin: {line!r}")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def pinned_versions(path: Path = CONSTRAINTS) -> dict[str, str]:
    """Canonical name → version of every ``name==version`` line in a constraints file,
    and in the files it includes (``-c FILE``, relative to it, as pip reads them)."""
    return _pins_in(path.read_text(), path)


def image_pins(path: Path = CONSTRAINTS) -> dict[str, str]:
    """The pins of what the image installs: those above the ``NOT_IN_IMAGE`` line."""
    return _pins_in(path.read_text().split(f"\n{NOT_IN_IMAGE}", 1)[0], path)


def check_pins(closure: dict[str, str], pins: dict[str, str]) -> None:
    """The installed versions are the pinned ones, and every one is pinned."""
    problems = [
        f"{name} {version} installed, {pins.get(name, 'not pinned')} in {CONSTRAINTS.name}"
        for name, version in closure.items()
        if pins.get(name) != version
    ]
    if problems:
        raise ImageBuildError(
            "this environment does not hold the image's versions ("
            + "; ".join(problems)
            + "): run scripts/setup, or update deploy/constraints.txt deliberately"
        )


# --- wheels -------------------------------------------------------------------------


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return f"sha256={digest.decode()}"


def _zip_entry(archive: zipfile.ZipFile, name: str, data: bytes, mode: int) -> None:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.external_attr = (mode & 0o777 | 0o100000) << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    archive.writestr(info, data)


def repack_installed(name: str, wheelhouse: Path) -> Path:
    """A wheel of the installed distribution ``name``: its files as installed, without
    bytecode, scripts (pip makes them again from entry points) or install records."""
    dist = metadata.distribution(name)
    wheel_text = dist.read_text("WHEEL") or ""
    tags = [line[4:].strip() for line in wheel_text.splitlines() if line.startswith("Tag:")]
    if not tags:
        raise ImageBuildError(f"{name}: its WHEEL file names no tag")
    members = []
    for path in dist.files or []:
        parts = path.parts
        if parts[0] == ".." or "__pycache__" in parts or path.suffix == ".pyc":
            continue
        if parts[0].endswith(".dist-info") and path.name in _INSTALL_RECORDS:
            continue
        members.append(path)
    dist_info = next(p.parts[0] for p in dist.files or [] if p.parts[0].endswith(".dist-info"))
    stem = f"{re.sub(r'[-_.]+', '_', dist.metadata['Name'])}-{dist.version}"
    # A wheel's name carries its tag set compressed: py2.py3-none-any.
    parts_of = [tag.split("-") for tag in tags]
    compressed = "-".join(".".join(dict.fromkeys(p[i] for p in parts_of)) for i in range(3))
    target = wheelhouse / f"{stem}-{compressed}.whl"
    rows = []
    with zipfile.ZipFile(target, "w") as archive:
        for path in sorted(members, key=str):
            located = Path(str(dist.locate_file(path)))
            data = located.read_bytes()
            _zip_entry(archive, path.as_posix(), data, located.stat().st_mode)
            rows.append([path.as_posix(), _record_hash(data), str(len(data))])
        rows.append([f"{dist_info}/RECORD", "", ""])
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(rows)
        _zip_entry(archive, f"{dist_info}/RECORD", text.getvalue().encode(), 0o644)
    return target


def wheelhouse_from_environment(wheelhouse: Path) -> dict[str, str]:
    """Re-pack the agent's installed dependencies into ``wheelhouse`` after checking they
    are the pinned versions; the closure (name → version)."""
    closure = runtime_closure()
    check_pins(closure, pinned_versions())
    wheelhouse.mkdir(parents=True, exist_ok=True)
    for name in closure:
        repack_installed(name, wheelhouse)
    return closure


def _pip(*args: str, isolated: bool, env: dict[str, str] | None = None) -> None:
    # --isolated: no user or site pip configuration, so two runs see the same inputs.
    argv = [sys.executable, "-m", "pip", *(["--isolated"] if isolated else []), *args]
    result = subprocess.run(
        argv, env=env, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL
    )
    if result.returncode != 0:
        raise ImageBuildError(f"{' '.join(argv)} failed:\n{result.stdout}{result.stderr}")


def copy_build_context(dest: Path, source: Path = REPO_ROOT) -> Path:
    """Copy what the Dockerfile's wheel stage copies (no bytecode) into ``dest``; the
    copies get fresh file times, as a fresh checkout's files do."""
    dest.mkdir(parents=True)
    for name in WHEEL_SOURCES:
        if (source / name).is_dir():
            shutil.copytree(
                source / name,
                dest / name,
                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                copy_function=shutil.copy,
            )
        else:
            shutil.copy(source / name, dest / name)
    return dest


def build_agent_wheel(
    context: Path, out_dir: Path, *, source_date_epoch: int = DEFAULT_EPOCH
) -> Path:
    """The agent's wheel from a build context, as the Dockerfile's wheel stage builds
    it: no build isolation (so offline, with this environment's pinned setuptools) and
    SOURCE_DATE_EPOCH fixing the archive's times."""
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(source_date_epoch))
    _pip(
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "--wheel-dir",
        str(out_dir),
        str(context),
        isolated=True,
        env=env,
    )
    (wheel,) = out_dir.glob("enclave_kms-*.whl")
    return wheel


def install_agent(
    target: Path, wheel: Path, *, wheelhouse: Path | None, constraints: Path = CONSTRAINTS
) -> None:
    """``pip install --no-compile --constraint`` of the agent's wheel into ``target``,
    dependencies from ``wheelhouse`` only, or from the index when it is None."""
    source = ["--no-index", "--find-links", str(wheelhouse)] if wheelhouse else []
    _pip(
        "install",
        "--quiet",
        "--no-compile",
        "--no-cache-dir",
        "--disable-pip-version-check",
        "--target",
        str(target),
        "--constraint",
        str(constraints),
        *source,
        str(wheel),
        isolated=wheelhouse is not None,
    )


# --- measuring ----------------------------------------------------------------------


def is_bytecode(path: Path) -> bool:
    return "__pycache__" in path.parts or path.suffix == ".pyc"


def tree_files(root: Path) -> dict[str, Path]:
    """Relative POSIX path → path of every file and symlink under ``root``."""
    return {
        path.relative_to(root).as_posix(): path
        for path in sorted(root.rglob("*"))
        if path.is_file() or path.is_symlink()
    }


def tree_differences(first: Path, second: Path) -> list[str]:
    """What differs between two trees: missing files, contents, modes, link targets."""
    a, b = tree_files(first), tree_files(second)
    differences = [f"only in the first: {p}" for p in sorted(a.keys() - b.keys())]
    differences += [f"only in the second: {p}" for p in sorted(b.keys() - a.keys())]
    for name in sorted(a.keys() & b.keys()):
        x, y = a[name], b[name]
        if x.is_symlink() or y.is_symlink():
            if not (x.is_symlink() and y.is_symlink()) or os.readlink(x) != os.readlink(y):
                differences.append(f"symlink differs: {name}")
        elif x.read_bytes() != y.read_bytes():
            differences.append(f"content differs: {name}")
        elif x.stat().st_mode != y.stat().st_mode:
            differences.append(f"mode differs: {name}")
    return differences


@dataclass(frozen=True)
class Sizes:
    by_distribution: dict[str, int]  # canonical name → bytes, bytecode excluded
    total: int


def measure(target: Path) -> Sizes:
    """Bytes installed under ``target`` (bytecode excluded), per distribution by its
    RECORD; what no RECORD names counts under "(other)"."""
    owner: dict[Path, str] = {}
    for record in target.glob("*.dist-info/RECORD"):
        name: str = canonicalize_name(record.parent.name.split("-")[0])
        for row in csv.reader(record.read_text().splitlines()):
            if row:
                owner[(target / row[0]).resolve()] = name
    by_distribution: dict[str, int] = {}
    total = 0
    for path in tree_files(target).values():
        if is_bytecode(path) or path.is_symlink():
            continue
        size = path.stat().st_size
        total += size
        name = owner.get(path.resolve(), "(other)")
        by_distribution[name] = by_distribution.get(name, 0) + size
    return Sizes(dict(sorted(by_distribution.items())), total)


def _mb(size: int) -> str:
    return f"{size / 1_000_000:.1f} MB"


def report(sizes: Sizes) -> str:
    lines = [f"{'distribution':<24} {'bytes':>12}"]
    for name, size in sorted(sizes.by_distribution.items(), key=lambda x: -x[1]):
        lines.append(f"{name:<24} {size:>12,}")
    lines.append(f"{'total':<24} {sizes.total:>12,}  {_mb(sizes.total)}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/agent-size",
        description="Install the agent's packages as the enclave image does (wheel, then pip "
        "install --no-compile with deploy/constraints.txt) into a fresh directory and print "
        "their size without bytecode, per distribution and in total.",
    )
    parser.add_argument(
        "--index",
        action="store_true",
        help="fetch the dependencies from the package index, as the Dockerfile does "
        "(default: re-pack this environment's installed copies; no network)",
    )
    parser.add_argument("--keep", type=Path, metavar="DIR", help="install into DIR and keep it")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="agent-size-") as scratch:
        work = Path(scratch)
        target = args.keep or work / "target"
        if target.exists() and any(target.iterdir()):
            print(f"agent-size: {target} is not empty", file=sys.stderr)
            return 2
        try:
            wheelhouse = None if args.index else work / "wheelhouse"
            if wheelhouse is not None:
                wheelhouse_from_environment(wheelhouse)
            context = copy_build_context(work / "context")
            wheel = build_agent_wheel(context, work / "wheel")
            install_agent(target, wheel, wheelhouse=wheelhouse)
        except ImageBuildError as exc:
            print(f"agent-size: {exc}", file=sys.stderr)
            return 1
        print(report(measure(target)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

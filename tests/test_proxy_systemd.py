"""The systemd unit (hardening score, verify) and scripts/install-proxy into a temp root."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from devtools.agent_image import pinned_versions
from tests.conftest import REPO_ROOT

UNIT = REPO_ROOT / "systemd" / "enclave-proxy.service"
needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed"
)


@needs_analyze
def test_unit_exposure_is_at_most_2() -> None:
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert match, done.stdout + done.stderr
    assert float(match.group(1)) <= 2.0, done.stdout


@needs_analyze
def test_unit_verifies(tmp_path: Path) -> None:
    # verify checks that ExecStart= binaries exist, so give it a root that has them
    # (and the stock units such as sysinit.target) rather than the machine's own.
    binary = tmp_path / "opt/enclave-proxy/venv/bin/enclave-proxy"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    (tmp_path / "bin").mkdir()
    shutil.copy2("/bin/kill", tmp_path / "bin/kill")
    for units in ("/usr/lib/systemd/system", "/lib/systemd/system"):
        if Path(units).is_dir():
            shutil.copytree(units, tmp_path / "usr/lib/systemd/system", symlinks=True)
            break
    (tmp_path / "etc/systemd/system").mkdir(parents=True)
    shutil.copy2(UNIT, tmp_path / "etc/systemd/system" / UNIT.name)
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={tmp_path}", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "enclave-proxy" not in done.stderr, done.stderr


def test_unit_essentials() -> None:
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "Restart=on-failure",
        "WatchdogSec=",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "--config /etc/enclave-proxy/proxy.toml",
        "RestrictAddressFamilies=AF_VSOCK AF_INET AF_INET6 AF_UNIX AF_NETLINK",
    ):
        assert line in text


@pytest.mark.skipif(shutil.which("systemctl") is None, reason="systemctl not installed")
def test_install_proxy_twice_into_a_root(tmp_path: Path) -> None:
    """Skips the venv (that needs PyPI); config, unit and enablement are real."""
    script = REPO_ROOT / "scripts" / "install-proxy"
    root = tmp_path / "root"
    for _ in range(2):
        done = subprocess.run(
            [str(script), "--root", str(root), "--skip-venv"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
    config = root / "etc/enclave-proxy/proxy.toml"
    assert "keeping existing" in done.stderr
    assert (root / "etc/systemd/system/enclave-proxy.service").read_text() == UNIT.read_text()
    wants = root / "etc/systemd/system/multi-user.target.wants/enclave-proxy.service"
    assert wants.is_symlink()

    # The default config is valid, and an edited one survives another run.
    check = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "check-config", str(config)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stderr
    assert "listen: vsock:ANY:8000" in check.stdout
    config.write_text('region = "eu-west-1"\n')
    subprocess.run(
        [str(script), "--root", str(root), "--skip-venv"], check=True, capture_output=True
    )
    assert config.read_text() == 'region = "eu-west-1"\n'


@pytest.mark.skipif(shutil.which("systemctl") is None, reason="systemctl not installed")
def test_install_proxy_keeps_a_config_symlink_whose_target_is_missing(tmp_path: Path) -> None:
    """A config managed elsewhere (a symlink, target not there yet) is never replaced."""
    root = tmp_path / "root"
    confdir = root / "etc/enclave-proxy"
    confdir.mkdir(parents=True)
    link = confdir / "proxy.toml"
    link.symlink_to("/nonexistent/managed/proxy.toml")
    done = subprocess.run(
        [str(REPO_ROOT / "scripts" / "install-proxy"), "--root", str(root), "--skip-venv"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert link.is_symlink()
    assert str(link.readlink()) == "/nonexistent/managed/proxy.toml"
    assert "keeping existing" in done.stderr


# The host directories a chroot needs to run this machine's Python, bound read-only.
_SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib64", "lib32", "libx32")


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="a chroot and bind mounts need root")
@pytest.mark.skipif(
    shutil.which("unshare") is None or shutil.which("systemctl") is None,
    reason="unshare (util-linux) and systemctl are needed",
)
def test_install_proxy_into_a_root_works_once_that_root_is_slash(tmp_path: Path) -> None:
    """A real venv (pip install with deploy/constraints-proxy.txt) into DIR; then, in a
    private mount namespace, DIR becomes / (chroot, with the system's directories and
    this Python bound read-only) and the installed command runs from there."""
    root = tmp_path / "stage.root"
    checkout = sorted(p.name for p in REPO_ROOT.iterdir())
    done = subprocess.run(
        [str(REPO_ROOT / "scripts" / "install-proxy"), "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in REPO_ROOT.iterdir()) == checkout  # no build/ nor egg-info left
    venv = root / "opt/enclave-proxy/venv"
    python = venv / "bin/python"

    # Nothing that runs names the staging directory; bytecode names the final paths.
    named = [
        path
        for path in [*venv.joinpath("bin").iterdir(), venv / "pyvenv.cfg"]
        if path.is_file() and not path.is_symlink() and str(root).encode() in path.read_bytes()
    ]
    assert named == []
    (cli_pyc,) = venv.glob("lib/python3*/site-packages/proxy/__pycache__/cli.*.pyc")
    assert str(root).encode() not in cli_pyc.read_bytes()
    assert b"/opt/enclave-proxy/venv/lib/" in cli_pyc.read_bytes()

    # Every package the proxy installs is pinned, at its pinned version.
    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format", "json", "--exclude", "pip",
         "--exclude", "setuptools", "--exclude", "enclave-kms"],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    installed = {
        p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(listed.stdout)
    }
    pins = pinned_versions(REPO_ROOT / "deploy" / "constraints-proxy.txt")
    assert {name: pins.get(name) for name in installed} == installed

    base = subprocess.run(
        [str(python), "-c", "import sys; print(sys.base_prefix)"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    binds = []
    for name in _SYSTEM_DIRS:
        host = Path("/") / name
        if host.is_symlink():
            (root / name).symlink_to(os.readlink(host))
        elif host.is_dir():
            binds.append(str(host))
    if not any(base == b or base.startswith(b + "/") for b in binds):
        binds.append(base)
    mounts = []
    for place in binds:
        (root / place.lstrip("/")).mkdir(parents=True, exist_ok=True)
        mounts.append(f"mount --bind -o ro {shlex.quote(place)} {shlex.quote(str(root) + place)}")
    if Path("/etc/ld.so.cache").is_file():
        (root / "etc/ld.so.cache").touch()
        mounts.append(
            f"mount --bind -o ro /etc/ld.so.cache {shlex.quote(str(root))}/etc/ld.so.cache"
        )
    command = (
        " && ".join(mounts)
        + f" && exec chroot {shlex.quote(str(root))} /opt/enclave-proxy/venv/bin/enclave-proxy"
        " check-config /etc/enclave-proxy/proxy.toml"
    )
    checked = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", command],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert checked.returncode == 0, checked.stderr
    assert "listen: vsock:ANY:8000" in checked.stdout

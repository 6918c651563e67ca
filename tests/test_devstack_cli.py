"""scripts/devstack as a user runs it: it sets the checkout up first, refuses a state
file it could not write in one line, says where its files are, and takes its
temporary folder (the simulated CA's private key is in it) away when stopped."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

from devtools.devstack import stop_process
from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "devstack"
READY_SECONDS = 90


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}


def _connect_status(proxy_address: str, endpoint: str) -> int:
    """The status the proxy answers to CONNECT for ``endpoint``'s host:port."""
    host, _, port = proxy_address.removeprefix("tcp:").rpartition(":")
    target = endpoint.removeprefix("https://")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        return int(connection.recv(4096).split()[1])


def test_devstack_sets_itself_up_like_demo_and_test() -> None:
    for name in ("devstack", "demo", "test"):
        lines = (REPO_ROOT / "scripts" / name).read_text().splitlines()
        setup = next(i for i, line in enumerate(lines) if "scripts/setup" in line.split("#")[0])
        python = next(i for i, line in enumerate(lines) if ".venv/bin/" in line.split("#")[0])
        assert setup < python, name


def test_a_state_file_in_a_missing_folder_is_a_one_line_error(tmp_path: Path) -> None:
    state = tmp_path / "no" / "such" / "folder" / "stack.json"
    result = subprocess.run(
        [str(SCRIPT), "--state-file", str(state)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"devstack: cannot write the state file {state}: its folder {state.parent} does not "
        "exist or is not writable"
    )
    assert "Traceback" not in result.stderr


def test_devstack_names_its_files_and_removes_its_temporary_folder(tmp_path: Path) -> None:
    state_file = tmp_path / "stack.json"
    stderr_path = tmp_path / "devstack.err"
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            [str(SCRIPT), "--state-file", "stack.json"],  # relative: the caller's folder
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=_env(),
        )
    try:
        deadline = time.monotonic() + READY_SECONDS
        while not state_file.exists():
            assert process.poll() is None, stderr_path.read_text()
            assert time.monotonic() < deadline, stderr_path.read_text()
            time.sleep(0.1)
        state = json.loads(state_file.read_text())
        work_dir = Path(state["work_dir"])
        assert (work_dir / "simulated-nsm-ca").is_dir()
        # The local KMS's stores: in the state file, and allowed by the proxy.
        stores = [state[f"{s}_endpoint"] for s in ("secretsmanager", "ssm", "s3")]
        for endpoint in [state["kms_endpoint"], *stores]:
            assert _connect_status(state["proxy_address"], endpoint) == 200, endpoint
        assert _connect_status(state["proxy_address"], "https://127.0.0.1:9") == 403
    finally:
        status = stop_process(process, timeout=60)  # SIGTERM, as Ctrl-C would; always reaped
    assert status == 0
    said = stderr_path.read_text()
    assert f"devstack: starting; logs, sockets and the simulated CA in {work_dir}" in said
    assert f"devstack: ready; state in {state_file}; agent socket {state['agent_socket']}" in said
    assert "kms.log, proxy.log, agent.log" in said
    assert f"devstack: stopped; removed {work_dir}" in said
    assert not work_dir.exists()
    assert not state_file.exists()

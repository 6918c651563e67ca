"""``enclave-agent run -- CMD`` as a real process: child start, signals, exit codes, orphans."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from enclave_agent.runtime import init
from tests.conftest import REPO_ROOT

# chown to a group we are in needs no privilege; root may pick any.
SOCKET_GROUP = 4242 if os.geteuid() == 0 else os.getegid()
AGENT = [sys.executable, "-m", "enclave_agent.cli"]


def write_config(
    tmp_path: Path,
    *,
    proxy: str = "tcp:127.0.0.1:9",
    listen: str = "",
    extra: str = "",
    trusted_keys: str = "[]",
) -> Path:
    # By default no secrets and no KMS call: only the log channel dials the proxy address
    # (nobody answers there; the agent goes on without it).
    config = tmp_path / "agent.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            region = "us-east-1"
            proxy = "{proxy}"
            nsm = "simulated"
            trusted_keys = {trusted_keys}
            [listen]
            socket = "{tmp_path / "agent.sock"}"
            socket_group = {SOCKET_GROUP}
            """
        )
        + listen
        + extra
    )
    return config


def start_run(tmp_path: Path, script: str) -> subprocess.Popen[bytes]:
    child = tmp_path / "child.py"
    child.write_text(textwrap.dedent(script))
    return subprocess.Popen(
        [
            *AGENT,
            "run",
            "--config",
            str(write_config(tmp_path)),
            "--",
            sys.executable,
            str(child),
            str(tmp_path),
            str(SOCKET_GROUP),
        ],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def finish(process: subprocess.Popen[bytes], timeout: float = 30) -> tuple[int, str]:
    try:
        _, err = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return process.returncode, err.decode(errors="replace")


def wait_until(
    ready: Callable[[], bool], process: subprocess.Popen[bytes], timeout: float = 30
) -> None:
    """Poll until ``ready()``; the test fails if ``process`` ends or ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)


def events(log: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


def test_run_starts_the_child_with_the_socket_and_returns_its_status(tmp_path: Path) -> None:
    process = start_run(
        tmp_path,
        """
        import os, sys
        from enclave_agent.client import AgentClient
        assert os.environ["ENCLAVE_AGENT_SOCKET"].endswith("agent.sock")
        info = os.stat(os.environ["ENCLAVE_AGENT_SOCKET"])
        assert info.st_mode & 0o777 == 0o660, oct(info.st_mode)
        assert info.st_gid == int(sys.argv[2]), info.st_gid
        # No agent socket (nor the NSM) leaks into the app: with the listening
        # socket it could accept other apps' connections in the agent's place.
        fds = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                fds.append(os.readlink(f"/proc/self/fd/{fd}"))
            except FileNotFoundError:  # listdir's own descriptor, closed by now
                pass
        assert not [fd for fd in fds if fd.startswith("socket:") or "nsm" in fd], fds
        assert AgentClient().health() == {"status": "ok"}
        assert len(AgentClient().attestation(nonce=b"n")) > 1000
        sys.exit(7)
        """,
    )
    code, log = finish(process)
    assert code == 7, log
    names = [e["event"] for e in events(log)]
    assert names.index("ready") < names.index("command_started") < names.index("command_exited")
    assert not (tmp_path / "agent.sock").exists()


def test_run_forwards_sigterm(tmp_path: Path) -> None:
    process = start_run(
        tmp_path,
        """
        import pathlib, signal, sys, time
        def stop(signum, frame):
            sys.exit(42)
        signal.signal(signal.SIGTERM, stop)
        pathlib.Path(sys.argv[1], "child-ready").touch()
        time.sleep(60)
        sys.exit(1)
        """,
    )
    try:
        wait_until((tmp_path / "child-ready").exists, process)
        process.send_signal(signal.SIGTERM)
    finally:
        code, log = finish(process)
    assert code == 42, log
    assert any(e["event"] == "signal_forwarded" for e in events(log))


def test_run_reaps_orphans(tmp_path: Path) -> None:
    # The child double-forks: the grandchild is orphaned and re-parented to the agent
    # (PID 1 in an enclave; a child subreaper here). Unreaped, it would stay a zombie.
    process = start_run(
        tmp_path,
        """
        import os, sys, time
        read_end, write_end = os.pipe()
        middle = os.fork()
        if middle == 0:
            grandchild = os.fork()
            if grandchild == 0:
                time.sleep(0.5)
                os._exit(0)
            os.write(write_end, str(grandchild).encode())
            os._exit(0)
        os.close(write_end)
        orphan = int(os.read(read_end, 32))
        os.waitpid(middle, 0)
        # Now the orphan's parent is the agent. Once it exits, only the agent can
        # reap it: it must vanish from /proc rather than stay a zombie ("Z").
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                stat = open(f"/proc/{orphan}/stat").read().rsplit(")", 1)[1].split()
            except FileNotFoundError:
                sys.exit(0)
            time.sleep(0.05)
        sys.exit(3)
        """,
    )
    code, log = finish(process)
    assert code == 0, log
    assert any(e["event"] == "orphan_reaped" for e in events(log))


def test_run_reports_signal_deaths_and_missing_commands(tmp_path: Path) -> None:
    process = start_run(tmp_path, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    code, log = finish(process)
    assert code == 128 + signal.SIGKILL, log

    missing = subprocess.run(
        [
            *AGENT,
            "run",
            "--config",
            str(write_config(tmp_path)),
            "--",
            "/nonexistent/command",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=30,
    )
    assert missing.returncode == 127


def test_run_gives_the_command_default_sigpipe(tmp_path: Path) -> None:
    # Python ignores SIGPIPE; the command must not inherit that (a shell pipeline
    # such as `producer | head` would then never stop its producer).
    shell = subprocess.run(
        [
            *AGENT,
            "run",
            "--config",
            str(write_config(tmp_path)),
            "--",
            "/bin/sh",
            "-c",
            "kill -PIPE $$; exit 7",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=30,
    )
    assert shell.returncode == 128 + signal.SIGPIPE, shell.stderr.decode(errors="replace")


def test_a_socket_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    # Anyone who can write the directory, or one above it, could swap the socket.
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    (shared / "inner").mkdir(mode=0o755)

    def serve_at(socket_path: Path) -> list[str]:
        config = write_config(tmp_path)
        text = config.read_text().replace(str(tmp_path / "agent.sock"), str(socket_path))
        config.write_text(text)
        return [*AGENT, "serve", "--config", str(config)]

    for socket_path in (shared / "a", shared / "inner" / "a"):
        result = subprocess.run(
            serve_at(socket_path), cwd=REPO_ROOT, capture_output=True, timeout=30
        )
        log = result.stderr.decode(errors="replace")
        assert result.returncode == 1, log
        assert "writable by others" in log and not socket_path.exists()
    # Sticky (as /tmp is), others cannot remove our entry: accepted.
    shared.chmod(0o1777)
    process = subprocess.Popen(serve_at(shared / "a"), cwd=REPO_ROOT, stderr=subprocess.PIPE)
    try:
        # Serving (the socket is bound a moment before it listens, so a first try may
        # be refused): a SIGTERM once it answers is a stop, not a start cut short (143).
        from enclave_agent.client import AgentClient, AgentError

        def healthy() -> bool:
            try:
                assert AgentClient(str(shared / "a")).health() == {"status": "ok"}
            except (AgentError, OSError):
                return False
            return True

        wait_until(healthy, process)
        process.send_signal(signal.SIGTERM)
    finally:
        code, log = finish(process)
    assert code == 0, log


def test_run_without_command_or_with_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('region = "us-east-1"\nsocket = "x"\n')
    for argv, needle in (
        (["run", "--config", str(bad), "--", "true"], "unknown key"),
        (["run", "--config", str(write_config(tmp_path))], "give the command"),
    ):
        result = subprocess.run(
            [*AGENT, *argv],
            cwd=REPO_ROOT,
            capture_output=True,
            timeout=30,
        )
        assert result.returncode == 2
        assert needle in result.stderr.decode()


def test_exit_code_convention() -> None:
    assert init.exit_code(3 << 8) == 3
    assert init.exit_code(signal.SIGTERM) == 128 + signal.SIGTERM


def unshared(
    argv: list[str], *, expected: int, timeout: float
) -> subprocess.CompletedProcess[bytes]:
    """``unshare *argv``: the test skips where unshare is missing, or where it failed
    (not the ``expected`` exit, and its own message) to create the namespaces."""
    try:
        result = subprocess.run(
            ["unshare", *argv],
            cwd=REPO_ROOT,
            capture_output=True,
            timeout=timeout,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )
    except FileNotFoundError:
        pytest.skip("unshare is not installed")
    if result.returncode != expected and result.stderr.startswith(b"unshare"):
        why = result.stderr.decode(errors="replace").strip()
        pytest.skip(f"cannot create namespaces here: {why}")
    return result


def test_interface_up_in_a_fresh_network_namespace() -> None:
    """A new network namespace starts with lo down, as an enclave does."""
    code = (
        "from enclave_agent.runtime.init import interface_up\n"
        "assert interface_up('lo') is True\n"
        "assert interface_up('lo') is False\n"
    )
    result = unshared(["--net", sys.executable, "-c", code], expected=0, timeout=30)
    assert result.returncode == 0, result.stderr.decode()


def test_serve_stops_on_sigterm_and_never_takes_a_live_socket(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    argv = [*AGENT, "serve", "--config", str(config)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    first = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE)
    try:
        wait_until((tmp_path / "agent.sock").exists, first)
        second = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, timeout=30)
        assert second.returncode == 1
        failed = [e for e in events(second.stderr.decode()) if e["event"] == "startup_failed"]
        assert failed and "in use" in str(failed[0]["reason"])
        assert (tmp_path / "agent.sock").exists()
        from enclave_agent.client import AgentClient

        assert AgentClient(str(tmp_path / "agent.sock")).health() == {"status": "ok"}
        first.send_signal(signal.SIGTERM)
    finally:
        code, log = finish(first)
    assert code == 0, log
    assert not (tmp_path / "agent.sock").exists()


def test_run_as_pid_1_in_fresh_namespaces(tmp_path: Path) -> None:
    """The enclave's situation: the agent is PID 1 and `lo` starts down.

    A new PID and network namespace (unshare) gives both on this machine: the child
    sees its parent as PID 1 and reaches the agent's loopback TCP listener, which only
    works once the agent has brought `lo` up.
    """
    config = write_config(tmp_path, listen='tcp = "tcp:127.0.0.1:0"\n')
    child = tmp_path / "child.py"
    child.write_text(
        textwrap.dedent(
            """
            import json, os, sys, urllib.request
            assert os.getppid() == 1, os.getppid()
            url = os.environ["ENCLAVE_AGENT_ENDPOINT"] + "/healthz"
            assert json.load(urllib.request.urlopen(url, timeout=10)) == {"status": "ok"}
            sys.exit(5)
            """
        )
    )
    namespaces = ["--net", "--pid", "--fork"]
    command = [*AGENT, "run", "--config", str(config), "--", sys.executable, str(child)]
    result = unshared([*namespaces, *command], expected=5, timeout=60)
    log = result.stderr.decode(errors="replace")
    assert result.returncode == 5, log
    assert any(e["event"] == "loopback_up" for e in events(log))


def test_sigterm_during_startup_stops_without_starting_the_command(tmp_path: Path) -> None:
    # A "proxy" that accepts and never answers: fetching the named secret hangs until
    # the KMS deadline (60 s here), far longer than this test waits.
    import socket

    silent = socket.create_server(("127.0.0.1", 0))
    try:
        config = write_config(
            tmp_path,
            proxy=f"tcp:127.0.0.1:{silent.getsockname()[1]}",
            extra='[limits]\nkms_call_timeout = 60\n[secrets.never]\nciphertext = "AAAA"\n',
            trusted_keys='["arn:aws:kms:us-east-1:111122223333:key/*"]',
        )
        process = subprocess.Popen(
            [
                *AGENT,
                "run",
                "--config",
                str(config),
                "--",
                "touch",
                str(tmp_path / "must-not-exist"),
            ],
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            stderr=subprocess.PIPE,
        )
        try:
            wait_until((tmp_path / "agent.sock").exists, process)  # bound: fetching secrets
            process.send_signal(signal.SIGTERM)
        finally:
            code, log = finish(process, timeout=20)
    finally:
        silent.close()
    assert code == 128 + signal.SIGTERM, log
    assert not (tmp_path / "must-not-exist").exists()
    assert any(e["event"] == "stopped_before_ready" for e in events(log))


def test_the_tcp_listener_must_end_up_on_loopback() -> None:
    from enclave_agent.runtime.service import require_loopback

    class Bound:
        def __init__(self, host: str) -> None:
            self.host = host

        def getsockname(self) -> tuple[str, int]:
            return (self.host, 9000)

    class Listener:
        def __init__(self, host: str) -> None:
            self.socket = Bound(host)

    for host in ("127.0.0.1", "127.8.0.1", "::1"):
        require_loopback(Listener(host))  # type: ignore[arg-type]
    for host in ("10.0.0.1", "0.0.0.0", "::"):
        with pytest.raises(OSError, match="not a loopback"):
            require_loopback(Listener(host))  # type: ignore[arg-type]


SDK_VARIABLES = (
    "AWS_ENDPOINT_URL_KMS",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
)
# Prints what the app got: the SDK variables and ENCLAVE_AGENT_ENDPOINT (JSON), after
# checking the endpoint answers.
_SHOW_ENV = f"""
import json, os, urllib.request
names = [*{SDK_VARIABLES!r}, "ENCLAVE_AGENT_ENDPOINT", "AWS_SESSION_TOKEN", "AWS_PROFILE"]
if "ENCLAVE_AGENT_ENDPOINT" in os.environ:
    url = os.environ["ENCLAVE_AGENT_ENDPOINT"] + "/healthz"
    assert json.load(urllib.request.urlopen(url, timeout=10)) == {{"status": "ok"}}
print(json.dumps({{name: os.environ.get(name) for name in names}}))
"""


def run_showing_env(tmp_path: Path, extra: str = "") -> tuple[dict[str, str | None], str]:
    config = write_config(tmp_path, extra=extra)
    # What an image may carry: a profile and a session token of its own.
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "AWS_PROFILE": "x", "AWS_SESSION_TOKEN": "t"}
    result = subprocess.run(
        [*AGENT, "run", "--config", str(config), "--", sys.executable, "-c", _SHOW_ENV],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        timeout=60,
    )
    log = result.stderr.decode(errors="replace")
    assert result.returncode == 0, log
    return json.loads(result.stdout), log


def test_run_gives_the_app_what_an_aws_sdk_needs(tmp_path: Path) -> None:
    seen, log = run_showing_env(tmp_path)
    endpoint = seen["ENCLAVE_AGENT_ENDPOINT"]
    assert endpoint is not None and endpoint.startswith("http://127.0.0.1:")
    assert seen["AWS_ENDPOINT_URL_KMS"] == endpoint
    assert seen["AWS_REGION"] == seen["AWS_DEFAULT_REGION"] == "us-east-1"
    # Placeholders: the agent signs every request itself.
    assert seen["AWS_ACCESS_KEY_ID"] == "ENCLAVEAGENTSIGNS"
    assert seen["AWS_SECRET_ACCESS_KEY"]
    assert seen["AWS_SESSION_TOKEN"] is None and seen["AWS_PROFILE"] is None
    [ready] = [e for e in events(log) if e["event"] == "ready"]
    assert ready["tcp_callers"] == "checked"


def test_run_with_sdk_env_false_sets_none_of_it_and_opens_no_tcp(tmp_path: Path) -> None:
    seen, log = run_showing_env(tmp_path, "[run]\nsdk_env = false\n")
    assert all(seen[name] is None for name in (*SDK_VARIABLES, "ENCLAVE_AGENT_ENDPOINT"))
    assert (seen["AWS_PROFILE"], seen["AWS_SESSION_TOKEN"]) == ("x", "t")  # left alone
    [ready] = [e for e in events(log) if e["event"] == "ready"]
    assert ready["tcp"] is None

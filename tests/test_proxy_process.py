"""enclave-proxy as a real process: listening event, sd_notify, SIGHUP, SIGTERM, CLI."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.conftest import REPO_ROOT
from tests.support.proxy_harness import (
    echo_handler,
    open_tunnel,
    read_head,
    read_to_eof,
    request,
    tcp_server,
)
from tests.support.stack import proxy_env as _env
from tests.support.stack import start_proxy

MARKER = b"SUBPROCESS-MARKER-51c0ffee-never-in-logs"


async def test_listening_sd_notify_watchdog_and_sigterm(tmp_path: Path) -> None:
    notify_path = tmp_path / "notify.sock"
    notify_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_sock.bind(str(notify_path))
    notify_sock.settimeout(10)
    env = _env(tmp_path, NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC="200000")
    try:
        with start_proxy(
            tmp_path, "--listen", "tcp:127.0.0.1:0", "--region", "us-east-1", env=env
        ) as proxy:
            port = await proxy.port()
            assert port != 0
            event = await proxy.wait_event("listening")
            assert event["allowlist"] == [
                "kms.us-east-1.amazonaws.com:443",
                "kms-fips.us-east-1.amazonaws.com:443",
                "secretsmanager.us-east-1.amazonaws.com:443",
                "ssm.us-east-1.amazonaws.com:443",
                "s3.us-east-1.amazonaws.com:443",
            ]
            messages: list[str] = []
            with trio.fail_after(20):
                while not (
                    any(m.startswith("READY=1") for m in messages) and "WATCHDOG=1" in messages
                ):
                    messages.append(
                        (await trio.to_thread.run_sync(notify_sock.recv, 4096)).decode()
                    )
            ready = next(m for m in messages if m.startswith("READY=1"))
            assert f"STATUS=listening on tcp:127.0.0.1:{port}" in ready
            status, _, body = await request(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (status, body) == (200, {"status": "ok"})
            proxy.process.send_signal(signal.SIGTERM)
            assert await proxy.wait_exit() == 0
            rest = []
            notify_sock.settimeout(0.5)
            try:
                while True:
                    rest.append(notify_sock.recv(4096).decode())
            except TimeoutError:
                pass
            assert "STOPPING=1" in rest
    finally:
        notify_sock.close()


async def test_sigterm_drains_open_tunnels(tmp_path: Path) -> None:
    async with tcp_server(echo_handler) as upstream:
        target = f"127.0.0.1:{upstream}"
        with start_proxy(
            tmp_path, "--listen", "tcp:127.0.0.1:0", "--allow", target, "--region", "us-east-1"
        ) as proxy:
            port = await proxy.port()
            status, tunnel, _ = await open_tunnel(port, target)
            assert status == 200
            proxy.process.send_signal(signal.SIGTERM)
            await proxy.wait_event("draining")
            # No new clients once draining...
            with pytest.raises(OSError):
                await trio.open_tcp_stream("127.0.0.1", port)
            # ...but the open tunnel keeps working until its client is done.
            await tunnel.send_all(MARKER)
            got = b""
            while len(got) < len(MARKER):
                got += await tunnel.receive_some(1000)
            assert got == MARKER
            assert proxy.process.poll() is None
            await tunnel.send_eof()
            while await tunnel.receive_some(1000):
                pass
            await tunnel.aclose()
            assert await proxy.wait_exit() == 0
            events = proxy.events()
            assert MARKER.decode() not in proxy.log_path.read_text()
            (connect,) = [e for e in events if e.get("method") == "CONNECT"]
            assert connect["outcome"] == "closed" and connect["bytes_up"] == len(MARKER)
            assert not [e for e in events if e.get("event") == "drain_timeout"]


async def test_sigterm_closes_idle_keep_alive_connections_at_once(tmp_path: Path) -> None:
    """An idle kept-alive connection does not hold the drain: it is closed on SIGTERM,
    quietly, and the proxy exits without waiting out drain_timeout."""
    config = tmp_path / "proxy.toml"
    config.write_text('region = "us-east-1"\nheader_timeout = 60\ndrain_timeout = 60\n')
    with start_proxy(tmp_path, "--config", str(config), "--listen", "tcp:127.0.0.1:0") as proxy:
        port = await proxy.port()
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, rest = await read_head(stream)
            assert status == 200
            proxy.process.send_signal(signal.SIGTERM)
            with trio.fail_after(30):  # well before drain_timeout or header_timeout
                assert await read_to_eof(stream, rest) == b'{"status":"ok"}'
        assert await proxy.wait_exit() == 0
        events = proxy.events()
        assert [e["outcome"] for e in events if e.get("event") == "request"] == ["ok"]
        assert not [e for e in events if e.get("event") == "drain_timeout"]


async def test_sigterm_grace_period_ends_stuck_tunnels(tmp_path: Path) -> None:
    config = tmp_path / "proxy.toml"
    async with tcp_server(echo_handler) as upstream:
        target = f"127.0.0.1:{upstream}"
        config.write_text(f'allow = ["{target}"]\nregion = "us-east-1"\ndrain_timeout = 0.5\n')
        with start_proxy(tmp_path, "--config", str(config), "--listen", "tcp:127.0.0.1:0") as proxy:
            port = await proxy.port()
            status, tunnel, _ = await open_tunnel(port, target)
            assert status == 200
            proxy.process.send_signal(signal.SIGTERM)
            assert await proxy.wait_exit() == 0
            with trio.fail_after(10):
                assert await tunnel.receive_some(1000) == b""
            await tunnel.aclose()
            assert [e for e in proxy.events() if e.get("event") == "drain_timeout"]
            (connect,) = [e for e in proxy.events() if e.get("method") == "CONNECT"]
            assert connect["outcome"] == "cancelled"


async def test_sighup_reloads_allowlist_keeping_tunnels(tmp_path: Path) -> None:
    config = tmp_path / "proxy.toml"
    async with tcp_server(echo_handler) as first, tcp_server(echo_handler) as second:
        a, b = f"127.0.0.1:{first}", f"127.0.0.1:{second}"
        config.write_text(f'allow = ["{a}"]\nregion = "us-east-1"\n')
        with start_proxy(tmp_path, "--config", str(config), "--listen", "tcp:127.0.0.1:0") as proxy:
            port = await proxy.port()
            status, tunnel, _ = await open_tunnel(port, a)
            assert status == 200
            connect_b = f"CONNECT {b} HTTP/1.1\r\nHost: {b}\r\n\r\n".encode()
            assert (await request(port, connect_b))[0] == 403

            config.write_text(f'allow = ["{b}"]\nregion = "us-east-1"\n')
            proxy.process.send_signal(signal.SIGHUP)
            reloaded = await proxy.wait_event("reloaded")
            assert reloaded["allowlist"] == [b]
            status, tunnel_b, _ = await open_tunnel(port, b)
            assert status == 200
            await tunnel_b.aclose()
            connect_a = f"CONNECT {a} HTTP/1.1\r\nHost: {a}\r\n\r\n".encode()
            assert (await request(port, connect_a))[0] == 403
            # The tunnel opened under the old list is untouched.
            await tunnel.send_all(b"ping")
            assert await tunnel.receive_some(100) == b"ping"

            # A broken file on reload keeps the list in force.
            config.write_text("allow = [\n")
            proxy.process.send_signal(signal.SIGHUP)
            failed = await proxy.wait_event("reload_failed")
            assert "not valid TOML" in failed["reason"]
            status, tunnel_b, _ = await open_tunnel(port, b)
            assert status == 200
            await tunnel_b.aclose()
            await tunnel.aclose()
            proxy.process.send_signal(signal.SIGTERM)
            assert await proxy.wait_exit() == 0


async def test_credentials_via_credential_process_in_process(tmp_path: Path) -> None:
    """The devstack's set-up: --allow an IP, --region, credentials from credential_process."""
    script = tmp_path / "creds.py"
    script.write_text(
        "import json\nprint(json.dumps({'Version': 1, 'AccessKeyId': 'AKIDPROC',"
        " 'SecretAccessKey': 'proc-secret-marker', 'SessionToken': 'proc-token',"
        " 'Expiration': '2099-01-01T00:00:00Z'}))\n"
    )
    (tmp_path / "aws-config").write_text(
        f"[default]\ncredential_process = {sys.executable} {script}\n"
    )
    with start_proxy(
        tmp_path,
        "--listen",
        "tcp:127.0.0.1:0",
        "--allow",
        "127.0.0.1:4443",
        "--region",
        "us-east-1",
    ) as proxy:
        port = await proxy.port()
        status, _, body = await request(port, b"GET /v1/credentials HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200
        assert body == {
            "AccessKeyId": "AKIDPROC",
            "SecretAccessKey": "proc-secret-marker",
            "Token": "proc-token",
            "Expiration": "2099-01-01T00:00:00Z",
            "Region": "us-east-1",
        }
        proxy.process.send_signal(signal.SIGTERM)
        assert await proxy.wait_exit() == 0
        text = proxy.log_path.read_text()
        assert "proc-secret-marker" not in text and "proc-token" not in text


async def test_credentials_from_environment_in_process(tmp_path: Path) -> None:
    env = _env(tmp_path, AWS_ACCESS_KEY_ID="AKIDENV", AWS_SECRET_ACCESS_KEY="env-secret")
    with start_proxy(
        tmp_path, "--listen", "tcp:127.0.0.1:0", "--region", "us-east-1", env=env
    ) as proxy:
        port = await proxy.port()
        status, _, body = await request(port, b"GET /v1/credentials HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200 and body["AccessKeyId"] == "AKIDENV" and body["Token"] is None
        proxy.process.send_signal(signal.SIGTERM)
        assert await proxy.wait_exit() == 0


async def test_startup_errors_are_clear(tmp_path: Path) -> None:
    with start_proxy(tmp_path, "--listen", "tcp:127.0.0.1:0") as proxy:
        assert await proxy.wait_exit() == 2
        (event,) = [e for e in proxy.events() if e.get("event") == "startup_failed"]
        assert "--region" in event["reason"]
    with start_proxy(tmp_path, "--listen", "tcp:nowhere", "--region", "us-east-1") as proxy:
        assert await proxy.wait_exit() == 2
        assert "expected HOST:PORT" in proxy.log_path.read_text()


@pytest.mark.parametrize(
    ("listen", "via_file", "shown"),
    [
        ("tcp:0.0.0.0:18000", False, "tcp:0.0.0.0:18000 is not"),
        ("tcp:0.0.0.0:18000", True, "tcp:0.0.0.0:18000 is not"),
        ("tcp:[::]:18000", False, "tcp:[::]:18000 is not"),
        # Names that getaddrinfo reads as addresses off loopback: refused before binding.
        ("tcp:0:18000", False, "tcp:0:18000 (resolves to 0.0.0.0) is not"),
        ("tcp:0x0a000001:18000", True, "tcp:0x0a000001:18000 (resolves to 10.0.0.1) is not"),
    ],
)
def test_a_tcp_listen_address_off_loopback_is_refused(
    tmp_path: Path, listen: str, via_file: bool, shown: str
) -> None:
    """Whoever reaches the proxy's port gets the role's credentials: a tcp: listener
    must stay on loopback, whether --listen or the config file names it."""
    config = tmp_path / "proxy.toml"
    config.write_text(f'listen = "{listen}"\n' if via_file else "")
    where = ["--config", str(config)] + ([] if via_file else ["--listen", listen])
    done = subprocess.run(
        [sys.executable, "-m", "proxy.cli", *where, "--region", "us-east-1"],
        cwd=REPO_ROOT,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert f"{shown} a loopback address" in done.stderr
    assert "hands the role's AWS credentials to whoever connects" in done.stderr
    assert '"event": "listening"' not in done.stderr


async def test_a_name_resolving_to_loopback_is_listened_on(tmp_path: Path) -> None:
    with start_proxy(tmp_path, "--listen", "tcp:localhost:0", "--region", "us-east-1") as proxy:
        port = await proxy.port()
        status, _, body = await request(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (status, body) == (200, {"status": "ok"})


def test_check_config(tmp_path: Path) -> None:
    def check_config(name: str, text: str) -> subprocess.CompletedProcess[str]:
        path = tmp_path / name
        path.write_text(text)
        return subprocess.run(
            [sys.executable, "-m", "proxy.cli", "check-config", str(path)],
            cwd=REPO_ROOT,
            env=_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=60,
        )

    done = check_config(
        "good.toml", 'allow = ["kms.*.amazonaws.com:443", "[::1]:8443"]\nregion = "eu-west-1"\n'
    )
    assert done.returncode == 0, done.stderr
    assert "kms.*.amazonaws.com:443" in done.stdout and "[::1]:8443" in done.stdout
    assert "metrics: off (metrics_listen)" in done.stdout
    done = check_config("metrics.toml", 'region = "eu-west-1"\nmetrics_listen = "tcp:[::1]:9464"\n')
    assert "metrics: tcp:[::1]:9464" in done.stdout

    done = check_config("region.toml", 'region = "cn-north-1"\n')
    assert done.returncode == 0
    assert "kms.cn-north-1.amazonaws.com.cn:443" in done.stdout

    done = check_config("bad.toml", 'allow = ["*.com:443"]\nmax_tunels = 5\n')
    assert done.returncode == 2  # a configuration error (enclave_common.cli)
    assert done.stderr.startswith("enclave-proxy check-config: ")
    assert "bad.toml" in done.stderr and ("max_tunels" in done.stderr or "*.com" in done.stderr)


@pytest.mark.skipif(not hasattr(socket, "AF_VSOCK"), reason="no AF_VSOCK")
async def test_listens_on_vsock(tmp_path: Path) -> None:
    """Binding is all this does on vsock: nothing ever connects to a CID on this machine."""
    import random

    try:
        probe = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        probe.close()
    except OSError:
        pytest.skip("AF_VSOCK sockets unavailable here")
    for _ in range(3):
        port = random.randint(20000, 60000)
        with start_proxy(
            tmp_path, "--listen", f"vsock:ANY:{port}", "--region", "us-east-1"
        ) as proxy:
            with trio.fail_after(20):
                while proxy.process.poll() is None and not any(
                    e.get("event") in ("listening", "listen_failed") for e in proxy.events()
                ):
                    await trio.sleep(0.05)
            if any(e.get("event") == "listen_failed" for e in proxy.events()):
                continue
            event = await proxy.wait_event("listening")
            assert event["address"] == f"vsock:ANY:{port}"
            proxy.process.send_signal(signal.SIGTERM)
            assert await proxy.wait_exit() == 0
            return
    pytest.fail("could not bind a vsock port in three tries")


PROXY = [sys.executable, "-m", "proxy.cli"]


def refused_on_a_taken_port(
    tmp_path: Path, holder: socket.socket, scheme: str, setting: str = "listen"
) -> list[str]:
    """The proxy started with ``setting`` at ``scheme:...:PORT`` where the bound
    ``holder`` listens: it exits 1; its lines that are not JSON."""
    with holder:
        holder.listen()
        host, port = holder.getsockname()[:2]
        address = f"{scheme}:{'ANY' if scheme == 'vsock' else host}:{port}"
        config = tmp_path / "proxy.toml"
        config.write_text(f'{setting} = "{address}"\n')
        done = subprocess.run(
            [*PROXY, "--config", str(config), "--region", "us-east-1"]
            + ([] if setting == "listen" else ["--listen", "tcp:127.0.0.1:0"]),
            env=_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    return [line for line in done.stderr.splitlines() if not line.startswith("{")]


def test_a_taken_vsock_port_is_one_plain_line_naming_aws_vsock_proxy(tmp_path: Path) -> None:
    """The port is held by a listener bound here (bind only: nothing connects)."""
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        pytest.skip("no AF_VSOCK in this Python")
    try:
        holder = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        pytest.skip(f"AF_VSOCK sockets unavailable here: {exc}")
    holder.bind((socket.VMADDR_CID_ANY, socket.VMADDR_PORT_ANY))
    port = holder.getsockname()[1]
    assert refused_on_a_taken_port(tmp_path, holder, "vsock") == [
        f"enclave-proxy: vsock:ANY:{port} is already in use, most likely by AWS's vsock-proxy "
        "(nitro-enclaves-vsock-proxy.service, which listens on port 8000 too): stop it "
        "(systemctl disable --now nitro-enclaves-vsock-proxy.service) or set listen to a "
        "free port (and the agent's proxy address to match)"
    ]


def test_a_taken_tcp_port_is_one_plain_line(tmp_path: Path) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    assert refused_on_a_taken_port(tmp_path, holder, "tcp") == [
        f"enclave-proxy: tcp:127.0.0.1:{port} is already in use by another process: "
        "stop it or set listen to a free port"
    ]


def test_a_taken_metrics_port_is_one_plain_line_naming_metrics_listen(tmp_path: Path) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    assert refused_on_a_taken_port(tmp_path, holder, "tcp", "metrics_listen") == [
        f"enclave-proxy: tcp:127.0.0.1:{port} is already in use by another process: "
        "stop it or set metrics_listen to a free port"
    ]


async def test_sigterm_ends_open_log_streams_at_once(tmp_path: Path) -> None:
    """A log stream is no tunnel to drain: with a drain_timeout of minutes, the proxy
    still stops as soon as SIGTERM comes, the stream answered 503."""
    config = tmp_path / "proxy.toml"
    config.write_text('region = "us-east-1"\ndrain_timeout = 600\n')
    with start_proxy(tmp_path, "--config", str(config), "--listen", "tcp:127.0.0.1:0") as proxy:
        port = await proxy.port()
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(
            b"POST /v1/logs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b'1f\r\n{"stream":"agent","line":"hi"}\n\r\n'
        )
        await proxy.wait_event("enclave_log")
        proxy.process.send_signal(signal.SIGTERM)
        assert await proxy.wait_exit() == 0
        answer = b""
        with trio.fail_after(10):
            while piece := await stream.receive_some(4096):
                answer += piece
        assert answer.startswith(b"HTTP/1.1 503 ")
        assert not [e for e in proxy.events() if e.get("event") == "drain_timeout"]

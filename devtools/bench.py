"""What every benchmark script shares: progress lines, figures as JSON, /proc readings.

Each ``scripts/bench-*`` builds a ``Bench`` from its parsed arguments (``add_arguments``
gives it ``--json FILE``), says what it is doing with ``step`` (one line on stderr per
step, with the time since the start, so a long run shows where it is), records its
figures with ``record`` and ends with ``finish``: with ``--json FILE`` the figures go
there, together with the command, the machine and the load average before and after
(the machine is shared, so a figure is worth as much as the load it was taken under).

Also here, so no script has its own copy: CPU seconds and resident memory of a process
from /proc, percentiles, min/median/max summaries, and an app connection to the agent
that speaks KMS JSON over HTTP/1.1 (the benchmarks' app side).

Development only: benchmarks are scripts, never tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h11
import trio

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", type=Path, metavar="FILE", help="also write the figures to FILE as JSON"
    )


def machine() -> dict[str, Any]:
    """Where a figure was taken: CPUs, kernel, Python, the CPU model when /proc says."""
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


class Bench:
    """One benchmark run: progress on stderr, figures for ``--json``."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name = name
        self.json_path: Path | None = getattr(args, "json", None)
        self.started = time.monotonic()
        self.figures: dict[str, Any] = {}
        self.info: dict[str, Any] = {
            "benchmark": name,
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "arguments": {k: _plain(v) for k, v in vars(args).items()},
            "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": machine(),
            "load_average_before": round(os.getloadavg()[0], 2),
        }

    def step(self, message: str) -> None:
        """One progress line on stderr (stdout stays for the results)."""
        elapsed = time.monotonic() - self.started
        print(f"[{self.name} {elapsed:6.1f}s] {message}", file=sys.stderr, flush=True)

    def record(self, key: str, value: Any) -> None:
        self.figures[key] = _plain(value)

    def header(self) -> str:
        """The line a results block starts with: when, where, under which load."""
        m = self.info["machine"]
        return (
            f"# {self.name}: {self.info['date_utc']}, {m['cpus']} CPUs ({m['cpu_model']}), "
            f"Linux {m['kernel']}, Python {m['python']}, load average "
            f"{self.info['load_average_before']:.2f} at the start (machine shared)"
        )

    def finish(self) -> None:
        self.info["load_average_after"] = round(os.getloadavg()[0], 2)
        self.info["seconds"] = round(time.monotonic() - self.started, 1)
        self.step(f"done, load average {self.info['load_average_after']:.2f}")
        if self.json_path is not None:
            document = {**self.info, "figures": self.figures}
            self.json_path.write_text(json.dumps(document, indent=2) + "\n")
            self.step(f"figures written to {self.json_path}")


def _plain(value: Any) -> Any:
    """``value`` with paths and tuples made JSON-friendly (dataclasses are not used)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# --- readings ---------------------------------------------------------------------


def cpu_times(pid: int, *, children: bool = False) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, all its threads, from /proc/PID/stat;
    with ``children``, plus those of its reaped children (socat forks one per client)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the ")": state is field 0, so utime, stime, cutime, cstime are 11..14.
    user, system = int(fields[11]), int(fields[12])
    if children:
        user, system = user + int(fields[13]), system + int(fields[14])
    return user / CLOCK_TICKS, system / CLOCK_TICKS


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """utime + stime (see ``cpu_times``)."""
    return sum(cpu_times(pid, children=children))


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0])
    return values


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def spread(values: Sequence[float]) -> dict[str, float]:
    """min / median / max of repeated measurements."""
    return {
        "min": min(values),
        "median": statistics.median(values),
        "max": max(values),
        "runs": len(values),
    }


def show_spread(values: Sequence[float], fmt: str = ".2f") -> str:
    s = spread(values)
    return f"{s['min']:{fmt}} / {s['median']:{fmt}} / {s['max']:{fmt}}"


# --- instruction counts (valgrind's callgrind) -------------------------------------------


def callgrind_prefix(out: Path) -> list[str]:
    """Put before a command to run it under callgrind, counting nothing until
    ``Callgrind.start``; dumps go to ``out``.N."""
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]


class Callgrind:
    """Count a process's instructions (user space only; other load does not change
    them) while some work runs: ``start``, the work, ``stop`` → totals."""

    def __init__(self, pid: int, out: Path) -> None:
        self.pid = pid
        self.out = out

    def _control(self, *args: str) -> None:
        subprocess.run(
            ["callgrind_control", *args, str(self.pid)],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def start(self) -> None:
        self._control("--instr=on")

    def stop(self, *functions: str) -> tuple[int, dict[str, int]]:
        """(instructions counted since ``start``, and those inside each function whose
        name contains one of ``functions``, inclusive)."""
        self._control("--dump")
        self._control("--instr=off")
        dump = sorted(self.out.parent.glob(self.out.name + ".*"))[-1]
        annotated = subprocess.run(
            ["callgrind_annotate", "--inclusive=yes", str(dump)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        total = 0
        inside = dict.fromkeys(functions, 0)
        for line in annotated.splitlines():
            count = line.strip().split(" ", 1)[0].replace(",", "")
            if not count.isdigit():
                continue
            if "PROGRAM TOTALS" in line:
                total = int(count)
            for name in functions:
                if name in line:
                    inside[name] = max(inside[name], int(count))
        return total, inside


# --- the app side -------------------------------------------------------------------


class SocketCaller:
    """One app connection to the agent's Unix socket, kept alive, one KMS JSON call
    at a time (``call`` raises unless the agent answers 200)."""

    def __init__(self, path: str, operation: str, body: bytes) -> None:
        self.path = path
        self.body = body
        self.stream: trio.SocketStream | None = None
        self.conn = h11.Connection(h11.CLIENT)
        self.head = h11.Request(
            method="POST",
            target="/",
            headers=[
                ("Host", "agent"),
                ("Content-Type", "application/x-amz-json-1.1"),
                ("X-Amz-Target", f"TrentService.{operation}"),
                ("Content-Length", str(len(body))),
            ],
        )

    async def call(self) -> None:
        if self.stream is None:
            self.stream = await trio.open_unix_socket(self.path)
            self.conn = h11.Connection(h11.CLIENT)
        conn = self.conn
        data = conn.send(self.head) + conn.send(h11.Data(data=self.body))
        await self.stream.send_all(data + conn.send(h11.EndOfMessage()))
        status = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await self.stream.receive_some(65536))
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise RuntimeError("agent closed the connection")
        if status != 200:
            raise RuntimeError(f"agent answered {status}")
        conn.start_next_cycle()

    async def aclose(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()
            self.stream = None


# --- one Decrypt in a fresh process (bench-agent's "fresh process" way) ------------------


def decrypt_once(argv: Sequence[str]) -> int:
    """``python -m devtools.bench decrypt-once SETTINGS_JSON CIPHERTEXT_FILE``: what a
    per-request tool such as kmstool-enclave-cli does, with this project's code: a new
    process makes a new RSA-2048 key, gets a new attestation document, opens a tunnel
    through the proxy and TLS inside it, fetches credentials, calls KMS Decrypt, opens
    the envelope, and exits (0 when the plaintext came out)."""
    from enclave_agent.runtime.kms import KmsGateway, KmsSettings
    from enclave_agent.runtime.recipient import RecipientKey
    from enclave_agent.runtime.trusted_keys import TrustedKeys, account_entry
    from enclave_agent.simulated.nsm import SimulatedNsm
    from enclave_common.address import parse_address

    state = json.loads(Path(argv[0]).read_text())
    blob = Path(argv[1]).read_bytes()
    settings = KmsSettings(
        region=state["region"],
        proxy=parse_address(state["proxy_address"]),
        endpoint=state["kms_endpoint"],
        ca_bundle=state["kms_ca_bundle"],
        pool_size=1,
        attestation_reuse=0,
        trusted_keys=TrustedKeys((account_entry("aws", state["region"], state["account_id"]),)),
    )

    async def run() -> int:
        key = RecipientKey.generate()
        gateway = KmsGateway(settings, SimulatedNsm.load(Path(state["simulated_nsm_ca"])), key)
        try:
            import base64

            answer = await gateway.call(
                "Decrypt", {"CiphertextBlob": base64.b64encode(blob).decode()}
            )
        finally:
            await gateway.aclose()
        return 0 if answer.get("Plaintext") else 1

    return trio.run(run)


if __name__ == "__main__":
    if sys.argv[1:2] != ["decrypt-once"] or len(sys.argv) != 4:
        sys.exit("usage: python -m devtools.bench decrypt-once SETTINGS_JSON CIPHERTEXT_FILE")
    sys.exit(decrypt_once(sys.argv[2:]))

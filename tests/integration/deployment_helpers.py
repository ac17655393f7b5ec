"""Drive a real fedge deployment through its command line, on loopback, for the tests.

Every process is started with ``python -m fedge ...`` in its own process group, its
output in a log file, and is ended (SIGTERM, then SIGKILL) by :meth:`Fleet.close`.
Ports are chosen free at run time; every file lies under one directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fl_client._supernode_main import POLL_ENV

__all__ = [
    "Fleet",
    "free_port",
    "lingering_processes",
    "set_config",
    "wait_for",
    "write_stripes",
]

TomlValue = bool | int | float | str


def free_port() -> int:
    """Return a TCP port on loopback that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_stripes(path: Path, count: int, *, seed: int) -> Path:
    """Write ``count`` learnable examples in the local ``.npz`` format (class = stripe row)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=count, dtype=np.int64)
    images = rng.integers(0, 40, size=(count, 28, 28), dtype=np.uint8)
    for index, label in enumerate(labels):
        images[index, 2 + 2 * int(label) : 4 + 2 * int(label), :] = 250
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=images, labels=labels)
    return path


def _toml(value: TomlValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)


def set_config(path: Path, changes: Mapping[str, Mapping[str, TomlValue]]) -> None:
    """Set ``changes[section][key]`` in the TOML file ``fedge server init`` wrote."""
    lines = path.read_text(encoding="utf-8").splitlines()
    section = ""
    pending = {name: dict(keys) for name, keys in changes.items()}
    for index, line in enumerate(lines):
        header = re.fullmatch(r"\[(\w+)\]", line.strip())
        if header:
            section = header.group(1)
            continue
        key = line.split("=", 1)[0].strip()
        if key in pending.get(section, {}):
            lines[index] = f"{key} = {_toml(pending[section].pop(key))}"
    missing = {name: keys for name, keys in pending.items() if keys}
    if missing:
        raise KeyError(f"keys not in {path}: {missing}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def wait_for(
    condition: Callable[[], bool], *, timeout: float, interval: float = 0.5, what: str = ""
) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace")


def lingering_processes(marker: str) -> list[str]:
    """Return ``pid: command line`` of every live process whose arguments name ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            continue
        line = _cmdline(int(entry.name))
        if state != "Z" and marker in line:
            found.append(f"{entry.name}: {line}")
    return found


@dataclass
class Fleet:
    """One deployment directory, its devices and every process the tests start."""

    root: Path
    env: dict[str, str] = field(default_factory=dict)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "FEDGE_HOME": str(self.root / "fedge-home"),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PYTHONUNBUFFERED": "1",
            # Flower's SuperNode sleeps 3 s after each pull that finds nothing, so every
            # message of a round waited up to 3 s (fl_client._supernode_main, tests only).
            POLL_ENV: "0.5",
            **self.env,
        }

    @property
    def server_dir(self) -> Path:
        """The deployment directory."""
        return self.root / "server"

    def device_dir(self, name: str) -> Path:
        """The state directory of device ``name``."""
        return self.root / "devices" / name

    def fedge(
        self, *args: str, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``python -m fedge ARGS`` to its end and return its output."""
        result = subprocess.run(
            [sys.executable, "-m", "fedge", *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"fedge {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def fedge_json(self, *args: str) -> Any:
        """Run a read-only ``fedge`` command with ``--json`` and return the document."""
        return json.loads(self.fedge(*args, "--json").stdout)

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """Start ``python -m fedge ARGS`` in the background, its output in ``logs/NAME.log``."""
        log_path = self.log(name)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "fedge", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        self.processes.append(process)
        return process

    def log(self, name: str) -> Path:
        """The log file of a process started with :meth:`spawn`."""
        return self.root / "logs" / f"{name}.log"

    def init_server(
        self,
        eval_examples: int,
        changes: Mapping[str, Mapping[str, TomlValue]],
    ) -> str:
        """``fedge server init`` on free ports, then edit the config; return the CA fingerprint."""
        eval_data = write_stripes(self.root / "eval.npz", eval_examples, seed=999)
        self.gateway_port = free_port()
        result = self.fedge(
            "server",
            "init",
            str(self.server_dir),
            "--san",
            "localhost",
            "--address",
            f"127.0.0.1:{self.gateway_port}",
            "--eval-data",
            str(eval_data),
        )
        match = re.search(r"sha256:[0-9a-f]{64}", result.stdout)
        assert match is not None, result.stdout
        ports: dict[str, TomlValue] = {
            "superlink_port": free_port(),
            "metrics_address": f"127.0.0.1:{free_port()}",
        }
        merged = {name: dict(keys) for name, keys in changes.items()}
        merged.setdefault("server", {}).update(ports)
        set_config(self.server_dir / "fedge-server.toml", merged)
        self.fingerprint = match.group(0)
        return self.fingerprint

    @property
    def server_url(self) -> str:
        """The URL devices enrol with."""
        return f"https://localhost:{self.gateway_port}"

    def tokens(self, count: int, expires: str = "1h") -> list[str]:
        """Issue ``count`` one-time tokens."""
        document = self.fedge_json(
            "server", "token", "create", str(self.server_dir), "--count", str(count),
            "--expires", expires,
        )  # fmt: skip
        assert document["ca_fingerprint"] == self.fingerprint
        return [str(token) for token in document["tokens"]]

    def enrol(
        self, name: str, token: str, *, fingerprint: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """``fedge client enroll`` device ``name`` with ``token``."""
        return self.fedge(
            "client", "enroll", "--server", self.server_url, "--token", token,
            "--ca-fingerprint", fingerprint or self.fingerprint,
            "--dir", str(self.device_dir(name)),
            check=check,
        )  # fmt: skip

    def device_id(self, name: str) -> str:
        """The device id enrolment gave device ``name``."""
        record = json.loads((self.device_dir(name) / "device.json").read_text())
        return str(record["device_id"])

    def start_server(self) -> subprocess.Popen[bytes]:
        """``fedge server start`` in the background."""
        return self.spawn("server", "server", "start", str(self.server_dir), "--exit-when-done")

    def start_device(self, name: str, data: Path) -> subprocess.Popen[bytes]:
        """``fedge client start`` device ``name`` on ``data`` in the background."""
        return self.spawn(
            name, "client", "start", "--data", str(data), "--dir", str(self.device_dir(name)),
            "--runtime-port", str(free_port()),
        )  # fmt: skip

    def audit_kinds(self) -> list[dict[str, Any]]:
        """Every audit record (oldest first)."""
        records = self.fedge_json(
            "audit", "list", "--home", str(self.server_dir), "--last", "100000"
        )
        return list(records)

    def close(self, processes: Sequence[subprocess.Popen[bytes]] | None = None) -> None:
        """SIGTERM each process group, wait, SIGKILL what is left."""
        chosen = list(self.processes if processes is None else processes)
        for process in chosen:
            if process.poll() is None:
                _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + 20.0
        for process in chosen:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait(timeout=10)
            # Children of a process killed above get SIGTERM from the kernel; any that
            # ignore it share the group.
            _signal_group(process, signal.SIGKILL)


def _signal_group(process: subprocess.Popen[bytes], number: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, number)

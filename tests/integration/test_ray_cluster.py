"""A scenario runs on an existing two-node Ray cluster (both nodes on this machine)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from simulations.scenario import parse_scenario
from simulations.scenario_run import run_scenario
from tests.conftest import make_synthetic_fashion
from tests.integration.deployment_helpers import lingering_processes

pytestmark = pytest.mark.slow

_PORT = 6391
_RAY = Path(sys.executable).with_name("ray")


def _ray(*args: str) -> None:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([str(_RAY), *args], check=True, capture_output=True, env=env, timeout=120)


def _cluster_processes(temp: str) -> list[int]:
    """This cluster's processes: named by its directory or port, or holding a file in it.

    Ray renames some of its processes (``ray::DashboardAgent``), but their logs stay open
    under the cluster's own temporary directory.
    """
    found = []
    for line in lingering_processes(""):
        pid_text, _, command = line.partition(":")
        pid = int(pid_text)
        named = temp in command or f":{_PORT} " in f"{command} "
        try:
            opened = any(
                str(fd.readlink()).startswith(temp) for fd in Path(f"/proc/{pid}/fd").iterdir()
            )
        except OSError:
            opened = False
        if named or opened:
            found.append(pid)
    return found


def _stop(temp: str) -> None:
    """Stop this cluster's processes only (``ray stop`` would stop every Ray on the machine,
    a simulation that another test runs at the same time included)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _cluster_processes(temp):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 10.0
        while _cluster_processes(temp) and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.fixture
def two_node_cluster() -> Iterator[str]:
    if not _RAY.exists() or shutil.which("ps") is None:
        pytest.skip("the ray command line is not installed beside this Python")
    address = f"127.0.0.1:{_PORT}"
    # A temporary directory of its own names every process of this cluster (and is short:
    # Ray's socket paths must fit 107 bytes).
    temp = tempfile.mkdtemp(prefix="fedge-ray-", dir="/tmp")
    try:
        _ray(
            "start", "--head", f"--port={_PORT}", "--num-cpus=1", "--include-dashboard=false",
            f"--temp-dir={temp}",
        )  # fmt: skip
        _ray("start", f"--address={address}", "--num-cpus=1")
        yield address
    finally:
        _stop(temp)
        shutil.rmtree(temp, ignore_errors=True)


def test_a_scenario_runs_its_devices_on_an_existing_two_node_cluster(
    two_node_cluster: str, tmp_path: Path
) -> None:
    import ray

    data = make_synthetic_fashion(tmp_path / "data", train=120, test=40)
    scenario = parse_scenario(
        {
            "scenario": {"name": "on-a-cluster", "rounds": 1},
            "population": {"clients": 2, "ray_address": two_node_cluster},
            "data": {"dir": str(data)},
            "output": {"plots": False},
        },
        source="cluster.toml",
    )

    ray.init(address=two_node_cluster, logging_level=logging.ERROR)
    try:
        alive = [node for node in ray.nodes() if node["Alive"]]  # type: ignore[no-untyped-call]
        cpus = ray.cluster_resources().get("CPU")  # type: ignore[no-untyped-call]
    finally:
        ray.shutdown()
    result = run_scenario(scenario, home=tmp_path / "home")

    assert len(alive) == 2 and cpus == 2.0
    assert result.summary.status == "completed"
    assert result.summary.rounds[0]["replies"] == 2
    assert result.summary.config["ray_address"] == two_node_cluster

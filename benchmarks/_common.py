"""Shared helpers of the benchmarks: machine description, medians, JSON output."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """Describe the machine and the package versions a result depends on."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str | None] = {}
    for name in ("flwr", "numpy", "cryptography", "torch"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cores": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "python": platform.python_version(),
        "packages": versions,
    }


def summary(samples: list[float]) -> dict[str, float]:
    """Median, min and max of timing samples in seconds."""
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write(path: Path, document: dict[str, Any]) -> None:
    """Write the benchmark's JSON document."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")

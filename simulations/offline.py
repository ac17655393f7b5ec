"""Keep Flower and Ray off the network and quiet, and size Ray to the machine."""

from __future__ import annotations

import logging
import os
from typing import Any

__all__ = ["OFFLINE_ENV", "apply_offline_env", "quiet_flower", "ray_backend_config"]

# Flower's telemetry and update check, and Ray's usage statistics, all phone
# home; fedge runs on machines that must not (and often cannot).
OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    # MLflow 3 reports usage unless told not to (the optional --mlflow export).
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # One BLAS/OpenMP thread per simulated client: clients run one per core.
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}

# Ray's object store holds the messages in flight; the default (30% of RAM) is
# far more than a simulation of small models needs.
_OBJECT_STORE_BYTES = 256 * 1024 * 1024


def apply_offline_env() -> None:
    """Set the variables above unless the user set them already."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


# Messages Flower logs that say nothing to a fedge user: the simulation entry
# point's deprecation notice, and the note that fedge evaluates centrally.
_EXPECTED = ("deprecated", "fraction_evaluate is set to 0.0")


class _DropExpected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(expected in message for expected in _EXPECTED)


def quiet_flower(verbose: bool) -> None:
    """Show Flower's warnings and errors only (everything with ``verbose``)."""
    flower = logging.getLogger("flwr")
    flower.setLevel(logging.DEBUG if verbose else logging.WARNING)
    # Flower installs its own console handler; propagating too would print twice.
    flower.propagate = False
    if not verbose and not any(isinstance(f, _DropExpected) for f in flower.filters):
        flower.addFilter(_DropExpected())


def ray_backend_config(
    num_cpus: int, *, verbose: bool, address: str | None = None
) -> dict[str, Any]:
    """Return Flower's backend config: one CPU per client, Ray sized to ``num_cpus``.

    With ``address`` (``"auto"``, ``"HOST:6379"`` or ``"ray://HOST:10001"``), Ray joins
    that existing cluster instead of starting one sized to this machine: the cluster's
    CPUs then bound how many clients train at once.
    """
    init_args: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": verbose,
        "logging_level": logging.INFO if verbose else logging.ERROR,
    }
    if address:
        init_args["address"] = address
    else:
        # "local": a Ray of its own even where `ray start` left a cluster running on this
        # machine (Ray would join that one, and refuse the CPU count given here).
        init_args |= {
            "address": "local",
            "num_cpus": num_cpus,
            "num_gpus": 0,
            "object_store_memory": _OBJECT_STORE_BYTES,
        }
    return {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": init_args}

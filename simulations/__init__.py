"""Runnable scenarios on Flower's simulation engine; data loading and partitioning.

``run_scenario``, ``load_scenario`` and ``Scenario`` are imported on first use: they
pull in torch, Flower and Ray, which ``fedge --help`` should not pay for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from simulations.data import FashionMNIST, Split, load_fashion_mnist
from simulations.partition import PartitionConfig, PartitionMode, label_skew, partition

if TYPE_CHECKING:
    from simulations.scenario import Scenario, load_scenario
    from simulations.scenario_run import ScenarioResult, run_scenario

__all__ = [
    "FashionMNIST",
    "PartitionConfig",
    "PartitionMode",
    "Scenario",
    "ScenarioResult",
    "Split",
    "label_skew",
    "load_fashion_mnist",
    "load_scenario",
    "partition",
    "run_scenario",
]

_LAZY = {
    "Scenario": "simulations.scenario",
    "load_scenario": "simulations.scenario",
    "ScenarioResult": "simulations.scenario_run",
    "run_scenario": "simulations.scenario_run",
}


def __getattr__(name: str) -> Any:
    """Import the scenario API on first use."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'simulations' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)

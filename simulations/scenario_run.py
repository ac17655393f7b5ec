"""Run a scenario: the Python API behind ``fedge sim run SCENARIO.toml``.

::

    from simulations import run_scenario

    result = run_scenario("scenarios/quickstart.toml")
    print(result.summary.final_accuracy, result.plots)

:func:`run_scenario` checks the scenario, loads and partitions its data set
(failing before anything is recorded when either is wrong), then runs it
through the same coordinator and client app as ``fedge sim run``: the device
mods are composed in their one valid order (:func:`fl_client.composition.device_mods`),
so a script never assembles them by hand. Every round is in the audit trail and
the model store; the run's directory holds ``summary.json``, ``scenario.json``
(the checked scenario) and ``plots/``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fedge.errors import ConfigError, StorageError
from fedge.home import FedgeHome, check_writable_directory, check_writable_file
from fl_server import RoundObserver
from fl_server.run_summary import RunSummary
from simulations.attack_metrics import BackdoorObserver
from simulations.attacks import AttackKind
from simulations.config import SimConfig
from simulations.datasets import cached_dataset
from simulations.run import RunPaths, check_paths, new_run_id, prepare_data, run_federation
from simulations.scenario import Scenario, load_scenario

__all__ = ["ScenarioResult", "ScenarioRun", "prepare_scenario", "run_scenario"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ScenarioResult:
    """What a scenario run produced."""

    scenario: Scenario
    summary: RunSummary
    run_dir: Path
    summary_path: Path
    plots: list[Path] = field(default_factory=list)
    mlflow_run_id: str | None = None
    attack: dict[str, Any] | None = None
    baseline: ScenarioResult | None = None
    """With ``[defence] compare``: the same scenario run without the defence first."""


@dataclass(frozen=True, slots=True)
class ScenarioRun:
    """A checked scenario, its simulation, its paths and its run id: ready to run."""

    scenario: Scenario
    config: SimConfig
    paths: RunPaths
    run_id: str
    run_dir: Path
    home: Path


def prepare_scenario(
    scenario: Scenario | Path | str,
    *,
    home: Path | None = None,
    out: Path | None = None,
    runs_dir: Path | None = None,
    db_url: str | None = None,
    store_dir: Path | None = None,
    devices_dir: Path | None = None,
) -> ScenarioRun:
    """Check a scenario and where its run goes, writing nothing.

    Parameters
    ----------
    scenario
        A checked :class:`~simulations.scenario.Scenario` or a scenario file's path.
    home
        The fedge home (default: ``FEDGE_HOME`` or ``~/.fedge``); the other paths
        default to its database, store, runs and devices.
    out
        The summary JSON (default: ``RUNS/RUN_ID/summary.json``).

    Raises
    ------
    ScenarioError
        If the file or the scenario is malformed.
    DataError
        If the data set is missing.
    ConfigError
        If a path is unusable.
    """
    checked = scenario if isinstance(scenario, Scenario) else load_scenario(Path(scenario))
    if checked.output.mlflow is not None and importlib.util.find_spec("mlflow") is None:
        raise ConfigError(
            f"{checked.source}: [output] mlflow needs the mlflow extra: pip install 'fedge[mlflow]'"
        )
    data_dir = None if checked.data.dir is None else str(checked.data.dir)
    dataset = cached_dataset(checked.data.dataset, data_dir)
    config = checked.sim_config(dataset.encoding, num_classes=dataset.num_classes)
    state = FedgeHome.resolve(home)
    runs = runs_dir or state.runs_dir
    run_id = new_run_id()
    run_dir = runs / run_id
    paths = RunPaths(
        summary=out or run_dir / "summary.json",
        models=run_dir / "models",
        db_url=db_url or state.db_url,
        store=store_dir or state.store_dir,
        devices=devices_dir or state.devices_dir,
        audit=state.audit_dir,
    )
    check_writable_directory(runs, option="--runs-dir")
    check_writable_file(paths.summary, option="--out")
    check_writable_directory(paths.store_dir, option="--store-dir")
    check_writable_directory(paths.devices_dir, option="--devices-dir")
    check_paths(paths)
    return ScenarioRun(
        scenario=checked,
        config=config,
        paths=paths,
        run_id=run_id,
        run_dir=run_dir,
        home=state.root,
    )


def run_scenario(
    scenario: Scenario | Path | str | ScenarioRun,
    *,
    home: Path | None = None,
    out: Path | None = None,
    observers: Sequence[RoundObserver] = (),
    verbose: bool = False,
    on_baseline: Callable[[ScenarioRun], Sequence[RoundObserver]] | None = None,
) -> ScenarioResult:
    """Run a scenario to the end and return its summary, plots and MLflow run.

    With ``[defence] compare``, the scenario first runs without its defence
    (:meth:`~simulations.scenario.Scenario.without_defence`: same seed, same
    attackers) and then with it; the result's ``baseline`` is the first run, and
    ``comparison.json`` and ``plots/compare-accuracy.png`` in the run's directory
    set the two side by side.

    Parameters
    ----------
    scenario
        A scenario file's path, a checked :class:`~simulations.scenario.Scenario`,
        or the output of :func:`prepare_scenario`.
    home, out
        As in :func:`prepare_scenario` (ignored for a prepared run).
    observers
        Told about every round (e.g. :class:`simulations.display.RoundDisplay`).
    verbose
        Show Flower's and Ray's own logs.
    on_baseline
        With ``[defence] compare``: returns the observers of the undefended run.

    Raises
    ------
    ScenarioError, DataError, ConfigError, StorageError
        As :func:`prepare_scenario` and :func:`simulations.run.run_federation`;
        nothing is recorded when the scenario or its data are wrong.
    """
    prepared_run = (
        scenario
        if isinstance(scenario, ScenarioRun)
        else prepare_scenario(scenario, home=home, out=out)
    )
    baseline = None
    if prepared_run.scenario.defence.compare:
        paths = prepared_run.paths
        undefended = prepare_scenario(
            prepared_run.scenario.without_defence(),
            runs_dir=prepared_run.run_dir.parent,
            db_url=paths.db_url,
            store_dir=paths.store_dir,
            devices_dir=paths.devices_dir,
            home=prepared_run.home,
        )
        watchers = () if on_baseline is None else on_baseline(undefended)
        baseline = _run_one(undefended, watchers, verbose=verbose)
    result = _run_one(prepared_run, observers, verbose=verbose)
    if baseline is None:
        return result
    return _compare(baseline, result)


def _run_one(
    prepared_run: ScenarioRun, observers: Sequence[RoundObserver], *, verbose: bool
) -> ScenarioResult:
    checked, config, paths = prepared_run.scenario, prepared_run.config, prepared_run.paths
    data = prepare_data(config)
    _write_json(prepared_run.run_dir / "scenario.json", checked.to_json())
    backdoor = None
    if config.attack is not None and config.attack.kind is AttackKind.BACKDOOR:
        backdoor = BackdoorObserver(
            config.attack, config.architecture, data.test.images, data.test.labels
        )
    summary = run_federation(
        config,
        paths,
        run_id=prepared_run.run_id,
        prepared=data,
        observers=[*observers, *([backdoor] if backdoor is not None else [])],
        verbose=verbose,
    )
    attack = None
    if config.attack is not None:
        attack = {
            "kind": config.attack.kind.value,
            "byzantine_partitions": sorted(config.attack.byzantine_partitions(config.num_clients)),
            "scale": config.attack.scale,
            "final_accuracy": summary.final_accuracy,
            "backdoor_success_rate": None if backdoor is None else backdoor.rates,
            "defence": _defence_of(config),
        }
        _write_json(prepared_run.run_dir / "attack.json", attack)
    plots: list[Path] = []
    if checked.output.plots:
        from simulations.plots import write_plots

        plots = write_plots(summary, prepared_run.run_dir / "plots")
    mlflow_run_id = None
    if checked.output.mlflow is not None:
        from simulations.mlflow_export import export_to_mlflow

        mlflow_run_id = export_to_mlflow(
            summary, checked.output.mlflow, experiment=checked.name, plots=plots
        )
    return ScenarioResult(
        scenario=checked,
        summary=summary,
        run_dir=prepared_run.run_dir,
        summary_path=paths.summary,
        plots=plots,
        mlflow_run_id=mlflow_run_id,
        attack=attack,
    )


def _defence_of(config: SimConfig) -> dict[str, Any] | None:
    if config.norm_bound is not None:
        return {"norm_bound": config.norm_bound, "site": config.norm_bound_site.value}
    if config.strategy.rule.robust:
        return {"strategy": config.strategy.to_json()}
    return None


def _final_backdoor(result: ScenarioResult) -> float | None:
    rates = (result.attack or {}).get("backdoor_success_rate") or {}
    return rates[max(rates)] if rates else None


def _compare(baseline: ScenarioResult, defended: ScenarioResult) -> ScenarioResult:
    comparison = {
        label: {
            "run_id": result.summary.run_id,
            "final_accuracy": result.summary.final_accuracy,
            "backdoor_success_rate": _final_backdoor(result),
            "defence": (result.attack or {}).get("defence"),
        }
        for label, result in (("without_defence", baseline), ("with_defence", defended))
    }
    _write_json(defended.run_dir / "comparison.json", comparison)
    plots = list(defended.plots)
    if defended.scenario.output.plots:
        from simulations.plots import compare_plots

        plots += compare_plots(
            {"without defence": baseline.summary, "with defence": defended.summary},
            defended.run_dir / "plots",
        )
    return replace(defended, plots=plots, baseline=baseline)


def _write_json(path: Path, document: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc}") from exc

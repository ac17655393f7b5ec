"""``fedge sim``: run federations on Flower's simulation engine.

A run's default paths come from the fedge home (:mod:`fedge.home`): the database
``HOME/fedge.db``, the model store ``HOME/store``, the run's own directory
``HOME/runs/RUN_ID`` and the simulated devices' state ``HOME/devices``. Every
path is checked before the run starts (and before ``run.started`` is logged).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fedge.errors import ConfigError, StorageError
from fedge.home import HOME_HELP, FedgeHome, check_writable_directory, check_writable_file
from secure_agg.params import ThreatModel
from simulations.data import DATA_DIR_ENV
from simulations.modes import DpMode, VariantRounds
from simulations.partition import PartitionMode

if TYPE_CHECKING:
    from rich.console import Console

    from fl_server import RoundReport
    from simulations.display import RoundDisplay
    from simulations.run import RunPaths
    from simulations.scenario_run import ScenarioResult, ScenarioRun

__all__ = ["app"]

app = typer.Typer(
    help="Run simulated federations on Flower's simulation engine (Ray).",
    no_args_is_help=True,
)


_SCENARIO_FLAGS = frozenset(
    {
        "scenario",
        "out",
        "runs_dir",
        "db_url",
        "store_dir",
        "home",
        "devices_dir",
        "verbose",
        "mlflow",
    }
)
"""The options ``fedge sim run SCENARIO`` accepts besides the file: where things go."""


@app.command("run")
def run_command(
    ctx: typer.Context,
    scenario: Annotated[
        Path | None,
        typer.Argument(
            help="A scenario file (TOML, see `fedge sim schema` and scenarios/); the "
            "federation options below then come from it.",
            show_default=False,
        ),
    ] = None,
    clients: Annotated[
        int, typer.Option("--clients", min=1, help="Simulated clients (Flower SuperNodes).")
    ] = 10,
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="FedAvg rounds.")] = 5,
    seed: Annotated[
        int, typer.Option("--seed", min=0, help="Seeds partitioning, initial model, shuffling.")
    ] = 0,
    partition: Annotated[
        PartitionMode, typer.Option("--partition", help="How the training set is split.")
    ] = PartitionMode.DIRICHLET,
    alpha: Annotated[
        float, typer.Option("--alpha", help="Dirichlet concentration (> 0); smaller = more skew.")
    ] = 0.5,
    fraction_train: Annotated[
        float, typer.Option("--fraction-train", help="Fraction of clients sampled per round.")
    ] = 1.0,
    local_epochs: Annotated[
        int, typer.Option("--local-epochs", min=1, help="Local epochs per round.")
    ] = 1,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Local batch size.")] = 32,
    learning_rate: Annotated[float, typer.Option("--lr", help="Local SGD learning rate.")] = 0.05,
    momentum: Annotated[float, typer.Option("--momentum", help="Local SGD momentum.")] = 0.9,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            envvar=DATA_DIR_ENV,
            help="Directory of the Fashion-MNIST IDX files "
            "[default: /usr/share/datasets/fashion-mnist].",
        ),
    ] = None,
    train_examples: Annotated[
        int | None,
        typer.Option("--train-examples", min=1, help="Use only the first N training examples."),
    ] = None,
    test_examples: Annotated[
        int | None,
        typer.Option("--test-examples", min=1, help="Evaluate on the first N test examples."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Summary JSON path (default: RUNS_DIR/RUN_ID/summary.json)."),
    ] = None,
    runs_dir: Annotated[
        Path | None,
        typer.Option("--runs-dir", help="Where runs keep their checkpoints (default: HOME/runs)."),
    ] = None,
    db_url: Annotated[
        str | None,
        typer.Option(
            "--db-url",
            envvar="FEDGE_DB_URL",
            help="Database for the audit log, the privacy ledger and the model store's "
            "index (default: HOME/fedge.db, SQLite).",
        ),
    ] = None,
    store_dir: Annotated[
        Path | None,
        typer.Option(
            "--store-dir",
            envvar="FEDGE_STORE_DIR",
            help="The model store the run publishes to (default: HOME/store).",
        ),
    ] = None,
    home: Annotated[Path | None, typer.Option("--home", help=HOME_HELP)] = None,
    parallelism: Annotated[
        int | None,
        typer.Option("--parallel", min=1, help="Clients trained at once [default: CPU cores]."),
    ] = None,
    secure_agg: Annotated[
        bool,
        typer.Option(
            "--secure-agg",
            help="Aggregate with fedge SecAgg+: the server sees only the sum of the updates.",
        ),
    ] = False,
    threat_model: Annotated[
        ThreatModel,
        typer.Option(
            "--threat-model",
            help="With --secure-agg: 'active' signs keys with enrolled device identities and "
            "runs the consistency check; 'semi-honest' trusts the server to follow the protocol.",
        ),
    ] = ThreatModel.ACTIVE,
    clip_range: Annotated[
        float,
        typer.Option(
            "--clip-range", help="With --secure-agg: clip each update coordinate to [-c, c]."
        ),
    ] = 0.5,
    secagg_dropout: Annotated[
        float | None,
        typer.Option(
            "--secagg-dropout",
            help="With --secure-agg: fraction of a round's clients whose dropout the round "
            "must survive (chooses the neighbours k and threshold t) [default: the largest "
            "of 0.2, 0.1 and 0 that the clients sampled per round allow].",
        ),
    ] = None,
    ring_bits: Annotated[
        int,
        typer.Option(
            "--ring-bits",
            help="With --secure-agg: bits per uploaded value (8, 16, 32 or 64); narrower "
            "rings upload less and quantise more coarsely.",
        ),
    ] = 32,
    dp: Annotated[
        DpMode,
        typer.Option(
            "--dp",
            help="Differential privacy. 'central': clients clip, the server adds Gaussian "
            "noise; 'distributed': clients add discrete Gaussian noise under secure "
            "aggregation (implies --secure-agg); 'local': clients clip and noise their own "
            "updates; 'sample': DP-SGD (Opacus) on every device; 'sample-distributed': one "
            "DP-SGD step a round over every device's examples, each device adding its share "
            "of the noise under secure aggregation (implies --secure-agg; the step is "
            "--lr). Every round's spend goes to the privacy ledger (see `fedge ledger show`).",
        ),
    ] = DpMode.OFF,
    epsilon: Annotated[
        float | None,
        typer.Option(
            "--epsilon",
            help="With --dp: the run's budget; the run stops before exceeding it. With "
            "--dp sample: each device's DP-SGD target over the whole run.",
        ),
    ] = None,
    delta: Annotated[
        float, typer.Option("--delta", help="With --dp: the delta of every epsilon.")
    ] = 1e-5,
    dp_clip: Annotated[
        float,
        typer.Option(
            "--dp-clip",
            help="With --dp: the L2 bound of each client's update (--dp sample: of each "
            "example's gradient).",
        ),
    ] = 1.0,
    noise_multiplier: Annotated[
        float,
        typer.Option(
            "--noise-multiplier",
            help="With --dp: the noise's standard deviation over the L2 bound (--dp sample "
            "without --epsilon: DP-SGD's noise multiplier).",
        ),
    ] = 1.0,
    dp_sample_rate: Annotated[
        float,
        typer.Option(
            "--dp-sample-rate",
            help="With --dp sample-distributed: each example's chance to be in a round's "
            "step (each device samples its own examples).",
        ),
    ] = 0.05,
    adaptive_clip: Annotated[
        bool,
        typer.Option(
            "--adaptive-clip",
            help="With --dp central --secure-agg: move the bound towards the median update "
            "norm (Andrew et al. 2021); the clipped-update bits are summed securely.",
        ),
    ] = False,
    poisson_sampling: Annotated[
        bool,
        typer.Option(
            "--poisson-sampling",
            help="Sample each client independently with probability --fraction-train from "
            "the OS CSPRNG (lets --dp central claim amplification by sampling).",
        ),
    ] = False,
    client_epsilon: Annotated[
        float | None,
        typer.Option(
            "--client-epsilon",
            help="With --dp: each device's lifetime budget (over every run it takes part in); "
            "a device declines rounds past it.",
        ),
    ] = None,
    client_lifetime_epsilon: Annotated[
        float | None,
        typer.Option(
            "--client-lifetime-epsilon",
            help="With --dp: each client's cap in the server's ledger, over every run in "
            "the database it took part in; the server refuses a round that would take a "
            "participant past it and the run stops there. Clients are keyed by their "
            "enrolled identity (--secure-agg, active threat model); other runs charge node "
            "ids, which every simulation draws afresh. See `fedge ledger show --subject ID`.",
        ),
    ] = None,
    devices_dir: Annotated[
        Path | None,
        typer.Option(
            "--devices-dir",
            help="The simulated devices' own state, kept across runs: lifetime privacy "
            "ledgers and refusal logs (default: HOME/devices).",
        ),
    ] = None,
    model_name: Annotated[
        str | None,
        typer.Option(
            "--model-name",
            help="Publish the run's versions under this name in the model store "
            "([A-Za-z0-9_.-], at most 64) [default: the architecture, cnn]. Give private "
            "and non-private run families different names.",
        ),
    ] = None,
    variants: Annotated[
        VariantRounds,
        typer.Option(
            "--variants",
            help="Which published rounds also get ONNX variants (FP32, FP16, INT8 static "
            "and dynamic, INT4), each measured on held-out images; a variant below its "
            "accuracy floor is recorded as rejected and never offered. About 4 s a round.",
        ),
    ] = VariantRounds.OFF,
    plots: Annotated[
        bool,
        typer.Option(
            "--plots/--no-plots",
            help="Write PNG plots (accuracy, loss, epsilon, participation) to the run's "
            "directory (a scenario file says it in [output] plots).",
        ),
    ] = True,
    mlflow: Annotated[
        str | None,
        typer.Option(
            "--mlflow",
            help="Also log the run to this MLflow tracking URI, e.g. sqlite:///mlflow.db "
            "(needs the mlflow extra: pip install 'fedge[mlflow]').",
        ),
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show Flower's and Ray's own logs.")
    ] = False,
) -> None:
    """Run a simulated federation: a scenario file, or a CNN on Fashion-MNIST from the options.

    Shows each round live, saves every round's global model with its SHA-256,
    appends the run to the audit log and the model store, and writes a JSON
    summary (with a scenario file: also the checked scenario and PNG plots).
    """
    # Heavy imports (torch, Flower, Ray) only when a run is asked for.
    from rich.console import Console

    if scenario is not None:
        _refuse_flags_beside_a_scenario(ctx)
        _run_scenario_file(
            scenario,
            out=out,
            runs_dir=runs_dir,
            db_url=db_url,
            store_dir=store_dir,
            home=home,
            devices_dir=devices_dir,
            verbose=verbose,
            mlflow=mlflow,
        )
        return
    if mlflow is not None:
        _check_mlflow_extra()

    from fl_client.training import TrainConfig
    from simulations.config import SimConfig, default_parallelism
    from simulations.display import RoundDisplay
    from simulations.run import RunPaths, check_paths, new_run_id, prepare_data, run_federation

    config = SimConfig(
        num_clients=clients,
        num_rounds=rounds,
        seed=seed,
        partition=partition,
        alpha=alpha,
        fraction_train=fraction_train,
        train=TrainConfig(
            local_epochs=local_epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            momentum=momentum,
        ),
        data_dir=data_dir,
        train_examples=train_examples,
        test_examples=test_examples,
        parallelism=parallelism or default_parallelism(),
        secure_agg=secure_agg or dp.needs_secure_aggregation,
        threat_model=threat_model,
        clip_range=clip_range,
        secagg_dropout=secagg_dropout,
        ring_bits=ring_bits,
        dp=dp,
        epsilon=epsilon,
        delta=delta,
        dp_clip=dp_clip,
        noise_multiplier=noise_multiplier,
        dp_sample_rate=dp_sample_rate,
        adaptive_clip=adaptive_clip,
        poisson_sampling=poisson_sampling,
        client_epsilon=client_epsilon,
        client_lifetime_epsilon=client_lifetime_epsilon,
        variants=variants,
        model_name=model_name,
    )
    run_id = new_run_id()
    state = FedgeHome.resolve(home)
    runs = runs_dir or state.runs_dir
    paths = RunPaths(
        summary=out or runs / run_id / "summary.json",
        models=runs / run_id / "models",
        db_url=db_url or state.db_url,
        store=store_dir or state.store_dir,
        devices=devices_dir or state.devices_dir,
        audit=state.audit_dir,
    )
    _check_writable(paths, runs_dir=runs)
    check_paths(paths)
    prepared = prepare_data(config)
    console = Console(stderr=True)
    console.print(
        f"[bold]fedge sim run[/] {run_id}: {clients} clients, {rounds} rounds, "
        f"{prepared.stats['train_examples']} training examples, {partition.value} partition"
        + (f" (alpha {alpha})" if partition is PartitionMode.DIRICHLET else "")
        + f", label skew {prepared.stats['label_skew']:.2f}"
        + (f", SecAgg+ ({threat_model.value} server)" if secure_agg else ""),
        highlight=False,
    )
    title = f"{'Secure ' if secure_agg else ''}FedAvg on Fashion-MNIST - {run_id}"
    with RoundDisplay(console, num_rounds=rounds, title=title) as view:
        summary = run_federation(
            config, paths, run_id=run_id, prepared=prepared, observers=[view], verbose=verbose
        )
    console.line()
    final = summary.final_accuracy
    if summary.privacy is not None:
        typer.echo(_privacy_line(summary.privacy))
    outcome = (
        "no round completed"
        if final is None
        else f"final accuracy {final:.4f} after {len(summary.rounds)} rounds"
    )
    typer.echo(
        f"{outcome} in {summary.wall_seconds:.1f} s; "
        f"summary {paths.summary}; audit head {summary.audit_head}"
    )
    _results(summary, runs / run_id, plots=plots, mlflow=mlflow, experiment="fedge-sim")


def _check_mlflow_extra() -> None:
    """Fail before the run when --mlflow is asked for without the extra installed."""
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError("--mlflow needs the mlflow extra: pip install 'fedge[mlflow]'")


def _results(
    summary: Any, run_dir: Path, *, plots: bool, mlflow: str | None, experiment: str
) -> None:
    """Write the run's plots and export it to MLflow, as asked."""
    written: list[Path] = []
    if plots:
        from simulations.plots import write_plots

        written = write_plots(summary, run_dir / "plots")
        typer.echo(f"plots: {run_dir / 'plots'} ({len(written)} PNG)")
    if mlflow is not None:
        from simulations.mlflow_export import export_to_mlflow, masked_uri

        run = export_to_mlflow(summary, mlflow, experiment=experiment, plots=written)
        typer.echo(f"MLflow run {run} at {masked_uri(mlflow)}")


def _refuse_flags_beside_a_scenario(ctx: typer.Context) -> None:
    """Refuse federation options given with a scenario file: the file says it all."""
    from click.core import ParameterSource

    given = [
        "--" + name.replace("_", "-")
        for name in ctx.params
        if name not in _SCENARIO_FLAGS
        and ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE
    ]
    if given:
        raise ConfigError(
            f"{', '.join(given)} cannot be combined with a scenario file: set them in the "
            "file instead (see `fedge sim schema`)"
        )


def _run_scenario_file(
    path: Path,
    *,
    out: Path | None,
    runs_dir: Path | None,
    db_url: str | None,
    store_dir: Path | None,
    home: Path | None,
    devices_dir: Path | None,
    verbose: bool,
    mlflow: str | None,
) -> None:
    from dataclasses import replace

    from rich.console import Console

    from simulations.scenario_run import prepare_scenario, run_scenario

    if mlflow is not None:
        _check_mlflow_extra()
    prepared = prepare_scenario(
        path,
        home=home,
        out=out,
        runs_dir=runs_dir,
        db_url=db_url,
        store_dir=store_dir,
        devices_dir=devices_dir,
    )
    if mlflow is not None:
        # --mlflow beside a file: the file's [output] mlflow, overridden.
        output = replace(prepared.scenario.output, mlflow=mlflow)
        prepared = replace(prepared, scenario=replace(prepared.scenario, output=output))
    config, checked = prepared.config, prepared.scenario
    console = Console(stderr=True)
    console.print(
        f"[bold]fedge sim run[/] {checked.name} ({prepared.run_id}): "
        f"{config.num_clients} clients, {config.sampled_clients} per round, "
        f"{config.num_rounds} rounds, {config.dataset} ({config.partition.value}), "
        f"{config.architecture.label}, {config.strategy.rule.value}"
        + (f", SecAgg+ ({config.threat_model.value} server)" if config.secure_agg else "")
        + (f", DP {config.dp.value}" if config.dp is not DpMode.OFF else ""),
        highlight=False,
    )
    if checked.scenario.description:
        console.print(checked.scenario.description, highlight=False)
    title = f"{checked.name} - {prepared.run_id}"
    with _Displays(console) as displays:

        def baseline_display(run: ScenarioRun) -> list[_LazyDisplay]:
            console.print(
                f"first without the defence ({run.run_id}), then with it ({prepared.run_id})",
                highlight=False,
            )
            label = f"{run.scenario.name} - {run.run_id}"
            return [displays.observer(label, run.config.num_rounds)]

        result = run_scenario(
            prepared,
            observers=[displays.observer(title, config.num_rounds)],
            verbose=verbose,
            on_baseline=baseline_display,
        )
    console.line()
    _echo_attack(result)
    summary = result.summary
    if summary.privacy is not None:
        typer.echo(_privacy_line(summary.privacy))
    final = summary.final_accuracy
    outcome = (
        "no round completed"
        if final is None
        else f"final accuracy {final:.4f} after {len(summary.rounds)} rounds"
    )
    typer.echo(
        f"{outcome} in {summary.wall_seconds:.1f} s; summary {result.summary_path}; "
        f"audit head {summary.audit_head}"
    )
    if result.plots:
        typer.echo(f"plots: {result.plots[0].parent} ({len(result.plots)} PNG)")
    if result.mlflow_run_id is not None:
        from simulations.mlflow_export import masked_uri

        uri = checked.output.mlflow or ""
        typer.echo(f"MLflow run {result.mlflow_run_id} at {masked_uri(uri)}")


class _Displays:
    """Live round displays shown one after the other (rich shows one live display at once)."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._open: RoundDisplay | None = None

    def __enter__(self) -> _Displays:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the display on screen, if any."""
        if self._open is not None:
            self._open.__exit__(None, None, None)
            self._open = None

    def show(self, title: str, num_rounds: int) -> RoundDisplay:
        """Close the display on screen and open a new one."""
        from simulations.display import RoundDisplay

        self.close()
        self._open = RoundDisplay(self._console, num_rounds=num_rounds, title=title).__enter__()
        return self._open

    def observer(self, title: str, num_rounds: int) -> _LazyDisplay:
        """Return a round observer whose display opens at its run's first round."""
        return _LazyDisplay(self, title, num_rounds)


class _LazyDisplay:
    def __init__(self, displays: _Displays, title: str, num_rounds: int) -> None:
        self._displays = displays
        self._title = title
        self._rounds = num_rounds
        self._view: RoundDisplay | None = None

    def on_round(self, report: RoundReport) -> None:
        if self._view is None:
            self._view = self._displays.show(self._title, self._rounds)
        self._view.on_round(report)


def _echo_attack(result: ScenarioResult) -> None:
    """Say what the attack achieved, and with [defence] compare, what the defence changed."""
    for run in (result.baseline, result):
        if run is None or run.attack is None:
            continue
        attack = run.attack
        rates = attack.get("backdoor_success_rate") or {}
        backdoor = f", backdoor success {rates[max(rates)]:.1%}" if rates else ""
        accuracy = attack["final_accuracy"]
        typer.echo(
            f"{run.scenario.name}: attack {attack['kind']} by partitions "
            f"{attack['byzantine_partitions']}; defence {_defence_text(attack['defence'])}: "
            f"final accuracy {'-' if accuracy is None else f'{accuracy:.4f}'}{backdoor}"
        )


def _defence_text(defence: dict[str, Any] | None) -> str:
    if defence is None:
        return "none"
    if "norm_bound" in defence:
        return f"L2 norm bound {defence['norm_bound']:g} on the {defence['site']}"
    strategy = defence["strategy"]
    options = ", ".join(f"{k} {v:g}" for k, v in strategy["options"].items())
    return f"{strategy['name']}" + (f" ({options})" if options else "")


@app.command("check")
def check_command(
    scenario: Annotated[Path, typer.Argument(help="The scenario file to check.")],
) -> None:
    """Check a scenario file and its data set without running it (writes nothing)."""
    from simulations.datasets import cached_dataset
    from simulations.scenario import load_scenario

    checked = load_scenario(scenario)
    data_dir = None if checked.data.dir is None else str(checked.data.dir)
    config = checked.sim_config(cached_dataset(checked.data.dataset, data_dir).encoding)
    typer.echo(
        f"{scenario}: scenario {checked.name!r} is valid: {config.num_clients} clients, "
        f"{config.sampled_clients} per round, {config.num_rounds} rounds, "
        f"{config.strategy.rule.value}"
        + (
            f", SecAgg+ tolerating {config.dropout_tolerance:.0%} dropouts"
            if config.secure_agg
            else ""
        )
    )


@app.command("schema")
def schema_command() -> None:
    """Print the scenario file schema: every table, key, type, default and meaning (Markdown)."""
    from simulations.scenario_schema import schema_markdown

    typer.echo(schema_markdown(), nl=False)


def _check_writable(paths: RunPaths, *, runs_dir: Path) -> None:
    """Fail before the run starts (nothing written, nothing logged) if a path is unusable."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    check_writable_directory(runs_dir, option="--runs-dir")
    check_writable_file(paths.summary, option="--out")
    check_writable_directory(paths.store_dir, option="--store-dir")
    check_writable_directory(paths.devices_dir, option="--devices-dir")
    try:
        url = make_url(paths.db_url)
    except ArgumentError as exc:
        raise ConfigError(f"invalid database URL {paths.db_url!r}: {exc}") from exc
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        check_writable_file(Path(url.database), option="--db-url")


def _privacy_line(privacy: dict[str, Any]) -> str:
    """One line on what a run spent and which claim it rests on."""
    spent = privacy["epsilon"]
    level = "per example (DP-SGD, worst device)" if privacy["level"] == "example" else "per client"
    from strategies.sample_ddp import SHARED_NOISE_MECHANISM

    shared = privacy["mechanism"] == SHARED_NOISE_MECHANISM
    if shared:
        level = "per example (one DP-SGD step a round, noise shared by the devices)"
    if (
        not shared
        and privacy["level"] == "example"
        and privacy["max_client_epsilon"] is None
        and spent is not None
    ):
        level += " by the devices' own ledgers"
    line = (
        f"privacy ({privacy['mechanism']}): epsilon "
        + ("unknown (devices keep their own ledgers)" if spent is None else f"{spent:.3f}")
        + f" at delta {privacy['delta']:g} {level}"
    )
    if privacy["budget"] is not None:
        line += f" (budget {privacy['budget']:g})"
    if privacy["max_client_epsilon"] is not None and privacy["level"] == "client":
        line += f"; worst single device {privacy['max_client_epsilon']:.3f}"
    claim = privacy["amplification"]
    line += (
        f"; amplification by sampling claimed at q = {claim['sample_rate']:g}"
        if claim["claimed"] and privacy["level"] == "client"
        else ""
    )
    if privacy["stopped"]:
        line += f"; stopped early: {privacy['stopped']}"
    return line


@app.command("samples")
def samples_command(
    out: Annotated[Path, typer.Option("--out", help="The .npz to write (images, labels).")],
    count: Annotated[int, typer.Option("--count", min=1, help="How many test images.")] = 1000,
    offset: Annotated[int, typer.Option("--offset", min=0, help="First test image.")] = 0,
    brightness: Annotated[
        float,
        typer.Option(
            "--brightness",
            min=-1.0,
            max=1.0,
            help="Add this fraction of full scale to every pixel (clipped): a drifted input "
            "distribution for `fedge client infer`.",
        ),
    ] = 0.0,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            envvar=DATA_DIR_ENV,
            help="Fashion-MNIST IDX files [default: /usr/share/datasets/fashion-mnist].",
        ),
    ] = None,
) -> None:
    """Write held-out Fashion-MNIST test images and labels for the device-side commands."""
    import numpy as np

    from simulations.data import load_fashion_mnist

    check_writable_file(out, option="--out")
    test = load_fashion_mnist(data_dir).test
    if offset + count > len(test.labels):
        raise ConfigError(
            f"--offset {offset} + --count {count} exceeds the {len(test.labels)} test images"
        )
    images = test.images[offset : offset + count].astype(np.int16)
    images = np.clip(images + round(brightness * 255), 0, 255).astype(np.uint8)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez(out, images=images, labels=test.labels[offset : offset + count])
    except OSError as exc:
        raise StorageError(f"cannot write --out {out}: {exc}") from exc
    shift = f", brightness {brightness:+.2f}" if brightness else ""
    typer.echo(f"wrote {count} test images{shift} to {out}")


@app.command("rollout")
def rollout_command(
    devices: Annotated[
        int, typer.Option("--devices", min=20, help="How many simulated devices.")
    ] = 1000,
    stages: Annotated[
        str, typer.Option("--stages", help="Cohort percentages of each stage, ending at 100.")
    ] = "1,10,50,100",
    bake_s: Annotated[float, typer.Option("--bake", min=0, help="Seconds each stage bakes.")] = 2.0,
    broker: Annotated[
        str, typer.Option("--broker", help="The MQTT broker, HOST:PORT (plaintext, local).")
    ] = "127.0.0.1:1883",
    workdir: Annotated[
        Path | None,
        typer.Option(
            "--workdir",
            help="Where the scenario's store, models and database go "
            "[default: HOME/runs/rollout-scenario].",
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Write the result as JSON here.")
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            envvar=DATA_DIR_ENV,
            help="Fashion-MNIST IDX files [default: /usr/share/datasets/fashion-mnist].",
        ),
    ] = None,
    home: Annotated[Path | None, typer.Option("--home", help=HOME_HELP)] = None,
) -> None:
    """Canary rollouts on a simulated fleet over the real MQTT broker: a good and a bad variant.

    Trains the CNN briefly, builds a good INT8 variant and one with broken calibration,
    then rolls each out in stages to DEVICES simulated devices that verify the signed
    directives and report signed health events over MQTT. The good one reaches the whole
    fleet; the bad one is caught at the canary stage and rolled back automatically.
    """
    import json
    import shutil

    from edge_runtime.mqtt_config import split_broker
    from simulations.data import load_fashion_mnist
    from simulations.rollout_scenario import RolloutScenario, run_rollout_scenario

    host, port = split_broker(broker)
    try:
        fractions = tuple(float(part) / 100 for part in stages.split(","))
    except ValueError:
        raise ConfigError(f"--stages takes percentages like 1,10,50,100, got {stages!r}") from None
    if out is not None:
        check_writable_file(out, option="--out")
    root = workdir or FedgeHome.resolve(home).runs_dir / "rollout-scenario"
    check_writable_directory(root, option="--workdir")
    data = load_fashion_mnist(data_dir)
    shutil.rmtree(root, ignore_errors=True)  # a fresh store and fleet every time
    config = RolloutScenario(
        devices=devices,
        stages=fractions,
        bake_s=bake_s,
        broker_host=host,
        broker_port=port,
    )
    result = run_rollout_scenario(config, root, data, progress=typer.echo)
    bad = result.bad
    typer.echo(
        f"good variant: {result.good.state} at {100 * result.good.fraction_reached:g} %; "
        f"bad variant: {bad.state} at {100 * bad.fraction_reached:g} %, "
        f"{100 * bad.max_exposed_fraction:.1f} % of the fleet ever exposed, rolled back "
        f"{bad.seconds_to_rollback or float('nan'):.1f} s after its first report; "
        f"{result.events_stored} events stored ({result.seconds:.0f} s)"
    )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result.to_json(), indent=2) + "\n")

"""Export a run summary to MLflow: config as params, rounds as metrics, summary and plots as files.

MLflow is an optional extra (``pip install 'fedge[mlflow]'``, the lighter
``mlflow-skinny`` client): it is imported only when an export is asked for.
Any tracking URI MLflow accepts works: ``sqlite:///PATH/mlflow.db`` offline
(SQLAlchemy and Alembic are fedge dependencies already), ``http(s)://`` for a
tracking server, ``databricks``. MLflow 3.x refuses a ``file:`` store unless
``MLFLOW_ALLOW_FILE_STORE=true`` is set.

Notes
-----
A tracking URI may carry a password or a token (``https://user:secret@host``,
``postgresql://user:secret@db``). This module never logs or raises the URI as
given: messages show it masked, exception text is scrubbed of its secrets,
and errors are raised without their cause chained (a traceback of the cause
could print the URI). The summary's own database URL is masked the same way
before the summary is uploaded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from fedge.errors import ConfigError, StorageError
from fl_server.run_summary import RunStatus, RunSummary
from simulations._run_rounds import RunSeries, number, read_series, summary_document

if TYPE_CHECKING:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

__all__ = ["MAX_PARAM_VALUE_LENGTH", "export_to_mlflow", "masked_uri"]

logger = logging.getLogger(__name__)

# MLflow servers before 2.x reject a param value over 500 characters (3.x allows 6000):
# the lower limit keeps an export loadable by any server.
MAX_PARAM_VALUE_LENGTH = 500
_MAX_TAG_VALUE_LENGTH = 5000
_MAX_KEY_LENGTH = 250
# MLflow's log_batch limits (mlflow.utils.validation).
_METRICS_PER_BATCH = 1000
_PARAMS_TAGS_PER_BATCH = 100
_SECRET_QUERY_WORDS = ("password", "passwd", "secret", "token", "key", "signature", "sig")
_MLFLOW_STATUS = {
    RunStatus.FAILED: "FAILED",
    RunStatus.INTERRUPTED: "KILLED",
}
_MISSING_EXTRA = "--mlflow needs the mlflow extra: pip install 'fedge[mlflow]'"


def _secrets(uri: str) -> list[str]:
    try:
        parts = urlsplit(uri)
    except ValueError:
        return [uri]
    found = []
    userinfo = parts.netloc.rpartition("@")[0]
    if userinfo:
        user, colon, password = userinfo.partition(":")
        found.append(password if colon else user)
    found.extend(
        value
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
        if any(word in name.lower() for word in _SECRET_QUERY_WORDS)
    )
    # Both spellings: an error message may show the percent-decoded password.
    return sorted({form for s in found if s for form in (s, unquote(s))}, key=len, reverse=True)


def masked_uri(uri: str) -> str:
    """Return ``uri`` with its password, user token and secret query values replaced by ``***``.

    Parameters
    ----------
    uri
        A tracking or database URI, or a plain path.

    Returns
    -------
    str
        ``https://alice:***@mlflow.example/`` for ``https://alice:pw@mlflow.example/``;
        a userinfo without a colon (a bare token) becomes ``***``; a value that
        cannot be parsed as a URI is hidden whole.
    """
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparsable URI>"
    netloc = parts.netloc
    userinfo, at, host = netloc.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:***@{host}" if colon else f"***@{host}"
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    secret_query = any(any(w in name.lower() for w in _SECRET_QUERY_WORDS) for name, _ in pairs)
    if not at and not secret_query:
        return uri
    query = parts.query
    if secret_query:
        query = urlencode(
            [
                (name, "***" if any(w in name.lower() for w in _SECRET_QUERY_WORDS) else value)
                for name, value in pairs
            ],
            safe="*",
        )
    # Assembled by hand: urlunsplit drops the "//" of an empty authority (sqlite:////path).
    scheme = f"{parts.scheme}:" if parts.scheme else ""
    authority = f"//{netloc}" if uri[len(scheme) :].startswith("//") else ""
    return (
        f"{scheme}{authority}{parts.path}"
        + (f"?{query}" if query else "")
        + (f"#{parts.fragment}" if parts.fragment else "")
    )


def _scrub(text: str, uri: str) -> str:
    text = text.replace(uri, masked_uri(uri))
    for secret in _secrets(uri):
        text = text.replace(secret, "***")
    return text


def _flatten(config: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    for key in sorted(config, key=str):
        value = config[key]
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from _flatten(value, f"{name}.")
        elif isinstance(value, str):
            yield name, value
        else:
            yield name, json.dumps(value, sort_keys=True, default=str)


def _truncated(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 1] + "…"


def _params(document: Mapping[str, Any]) -> list[Param]:
    from mlflow.entities import Param

    config = document.get("config")
    params = []
    for key, value in _flatten(config if isinstance(config, Mapping) else {}):
        if len(key) > _MAX_KEY_LENGTH:
            logger.warning("config key %.40s... is too long for an MLflow param: skipped", key)
            continue
        params.append(Param(key, _truncated(value, MAX_PARAM_VALUE_LENGTH)))
    return params


def _tags(document: Mapping[str, Any], series: RunSeries) -> list[RunTag]:
    from mlflow.entities import RunTag

    audit = document.get("audit")
    audit = audit if isinstance(audit, Mapping) else {}
    values = {
        "fedge.run_id": series.run_id,
        "fedge.config_sha256": document.get("config_sha256"),
        "fedge.audit_head": audit.get("head_hash"),
        "fedge.status": series.status,
        "fedge.code_version": document.get("code_version"),
        "fedge.dp": series.dp_mode or "off",
        "fedge.secure_agg": "true" if series.secure_agg else "false",
    }
    return [
        RunTag(key, _truncated(str(value), _MAX_TAG_VALUE_LENGTH))
        for key, value in values.items()
        if value not in (None, "")
    ]


def _metrics(document: Mapping[str, Any], series: RunSeries, timestamp: int) -> list[Metric]:
    from mlflow.entities import Metric

    metrics: list[Metric] = []

    def add(key: str, value: float | None, step: int) -> None:
        if value is not None:
            metrics.append(Metric(key, float(value), timestamp, step))

    for point in series.points:
        add("accuracy", point.accuracy, point.round)
        add("loss", point.loss, point.round)
        add("epsilon", point.epsilon, point.round)
        add("participation/sampled", point.sampled, point.round)
        add("participation/completed", point.completed, point.round)
        add("participation/dropped", point.dropped, point.round)
        add("participation/refused", point.refused, point.round)
        add("round_seconds", point.seconds, point.round)
        add("secagg/upload_bytes_per_client", point.upload_bytes_per_client, point.round)
    completed = series.completed_rounds
    last = max((p.round for p in completed), default=0)
    if not any(p.epsilon is not None for p in completed) and completed:
        # An older summary: only the run's total, which is the cumulative ε after its last round.
        add("epsilon", series.final_epsilon, last)
    privacy = document.get("privacy")
    if isinstance(privacy, Mapping):
        add("privacy/max_client_epsilon", number(privacy.get("max_client_epsilon")), last)
    add("final_accuracy", number(document.get("final_accuracy")), last)
    add("wall_seconds", number(document.get("wall_seconds")), last)
    return metrics


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _default_artifact_location(tracking_uri: str) -> str | None:
    # MLflow puts a SQLite store's artifacts in ./mlruns of the *current* folder:
    # keep them beside the database instead, wherever the export runs from.
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix) or tracking_uri.endswith(":memory:"):
        return None
    database = Path(tracking_uri[len(prefix) :].split("?", 1)[0])
    return (database.resolve().parent / "mlartifacts").as_uri()


def _experiment_id(client: MlflowClient, name: str, tracking_uri: str) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(
                name, artifact_location=_default_artifact_location(tracking_uri)
            )
        except MlflowException:
            # Another exporter created it meanwhile: use theirs.
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage != "active":
        raise ConfigError(
            f"MLflow experiment {name!r} is deleted: restore it or export to another experiment"
        )
    return str(experiment.experiment_id)


def _summary_file(document: Mapping[str, Any], folder: Path) -> Path:
    copy = json.loads(json.dumps(document, default=str))
    audit = copy.get("audit")
    if isinstance(audit, dict) and isinstance(audit.get("db_url"), str):
        audit["db_url"] = masked_uri(audit["db_url"])
    path = folder / "summary.json"
    path.write_text(json.dumps(copy, indent=2) + "\n", encoding="utf-8")
    return path


def _client(tracking_uri: str) -> MlflowClient:
    # MLflow 3 reports usage to its makers unless told not to (read when mlflow is
    # imported); fedge machines stay off the network (simulations.offline). A user's
    # own setting wins.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        import mlflow  # noqa: F401  (an absent extra fails here, before anything else)
    except ImportError:
        raise ConfigError(_MISSING_EXTRA) from None
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def export_to_mlflow(
    summary: RunSummary | Mapping[str, Any],
    tracking_uri: str,
    *,
    experiment: str = "fedge",
    plots: Sequence[Path] = (),
) -> str:
    """Record one fedge run as a new MLflow run and return the MLflow run id.

    Parameters
    ----------
    summary
        The run's :class:`RunSummary` or the JSON document ``fedge sim run``
        wrote (older summaries with fewer fields are accepted).
    tracking_uri
        Where MLflow keeps runs, e.g. ``sqlite:///runs/mlflow.db`` or
        ``https://mlflow.example``. For a ``sqlite:`` store, a new experiment
        keeps its artifacts in ``mlartifacts/`` beside the database.
    experiment
        The MLflow experiment's name; created if missing.
    plots
        Image files (from :func:`simulations.plots.write_plots`) uploaded under
        ``plots/``.

    Returns
    -------
    str
        The MLflow run id. Each call creates a new MLflow run.

    Raises
    ------
    ConfigError
        If the mlflow extra is missing, an argument is empty, a plot file does
        not exist, the summary is malformed, or the experiment is deleted.
    StorageError
        If MLflow cannot be reached or refuses the data; the message shows the
        tracking URI masked.

    Notes
    -----
    What is exported: the configuration flattened to params
    (``train.learning_rate``; values stringified, cut to
    :data:`MAX_PARAM_VALUE_LENGTH` characters); per round, with ``step`` the
    round number (0: the initial model), the metrics ``accuracy``, ``loss``,
    ``epsilon`` (cumulative), ``participation/{sampled,completed,dropped,refused}``,
    ``round_seconds`` and ``secagg/upload_bytes_per_client``; tags
    ``fedge.run_id``, ``fedge.config_sha256``, ``fedge.audit_head``,
    ``fedge.status``, ``fedge.code_version``, ``fedge.dp``, ``fedge.secure_agg``;
    the summary as ``summary.json`` (its database URL masked). No model
    weights, client updates or data leave the machine.
    """
    if not isinstance(tracking_uri, str) or not tracking_uri.strip():
        raise ConfigError("the MLflow tracking URI must not be empty")
    if not experiment.strip():
        raise ConfigError("the MLflow experiment name must not be empty")
    plot_paths = [Path(p) for p in plots]
    missing = [str(p) for p in plot_paths if not p.is_file()]
    if missing:
        raise ConfigError(f"plot files not found: {', '.join(missing)}")
    series = read_series(summary)
    document = summary.to_json() if isinstance(summary, RunSummary) else summary_document(summary)
    client = None
    run_id = None
    shown = masked_uri(tracking_uri)
    try:
        client = _client(tracking_uri)
        experiment_id = _experiment_id(client, experiment, tracking_uri)
        run = client.create_run(experiment_id, run_name=series.run_id or None)
        run_id = run.info.run_id
        timestamp = int(time.time() * 1000)
        for params in _batches(_params(document), _PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, params=params)
        for tags in _batches(_tags(document, series), _PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, tags=tags)
        for metrics in _batches(_metrics(document, series, timestamp), _METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=metrics)
        with tempfile.TemporaryDirectory(prefix="fedge-mlflow-") as folder:
            client.log_artifact(run_id, str(_summary_file(document, Path(folder))))
        for plot in plot_paths:
            client.log_artifact(run_id, str(plot), artifact_path="plots")
        client.set_terminated(run_id, status=_MLFLOW_STATUS.get(series.status, "FINISHED"))
    except ConfigError:
        raise
    except Exception as exc:
        # Any backend error (HTTP, database, file system): scrubbed of the URI's secrets
        # and raised without the original chained, whose traceback could show them.
        if client is not None and run_id is not None:
            # Best effort: the first error is the one to report.
            with contextlib.suppress(Exception):
                client.set_terminated(run_id, status="FAILED")
        message = _scrub(str(exc), tracking_uri)
        if "MLFLOW_ALLOW_FILE_STORE" in message:
            raise ConfigError(
                f"MLflow refuses the file store {shown}: use sqlite:///PATH/mlflow.db, "
                "or set MLFLOW_ALLOW_FILE_STORE=true"
            ) from None
        raise StorageError(
            f"cannot export run {series.run_id} to MLflow at {shown}: "
            f"{type(exc).__name__}: {message}"
        ) from None
    logger.info("exported run %s to MLflow at %s (run %s)", series.run_id, shown, run_id)
    return str(run_id)

"""A run's Prometheus metrics, scraped from the real HTTP server on loopback."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from fedge.errors import ConfigError
from fl_server.federation import RoundReport
from fl_server.metrics import DeviceCounts, MetricsServer, RunMetrics

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _report(
    server_round: int,
    *,
    replies: int = 3,
    failures: int = 0,
    seconds: float = 2.0,
    secure: dict[str, Any] | None = None,
) -> RoundReport:
    return RoundReport(
        server_round=server_round,
        loss=1.0 / (server_round + 1),
        accuracy=0.5 + server_round / 100,
        seconds=seconds,
        num_replies=replies,
        num_failures=failures,
        model_sha256="0" * 64,
        model_path=f"/runs/r/round-{server_round}.npz",
        secure_aggregation=secure,
    )


def _scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def metrics() -> RunMetrics:
    return RunMetrics(run_id="run-7", model="cnn")


@pytest.fixture
def server(metrics: RunMetrics) -> Iterator[MetricsServer]:
    with metrics.serve("127.0.0.1:0") as running:
        yield running


def test_a_plain_round_sets_the_round_gauges_and_counts_it(
    metrics: RunMetrics, server: MetricsServer
) -> None:
    metrics.on_round(_report(0, replies=0))
    metrics.on_round(_report(1, replies=4, failures=1, seconds=3.5))
    metrics.on_round(_report(2, replies=5, failures=0, seconds=42.0))

    samples = _scrape(server.url)

    assert _value(samples, "fedge_round") == 2
    assert _value(samples, "fedge_round_sampled") == 5
    assert _value(samples, "fedge_round_completed") == 5
    assert _value(samples, "fedge_round_dropped") == 0
    assert _value(samples, "fedge_rounds_total") == 2
    assert _value(samples, "fedge_round_seconds_count") == 2
    assert _value(samples, "fedge_round_seconds_sum") == pytest.approx(45.5)
    assert _value(samples, "fedge_round_seconds_bucket", le="5.0") == 1
    assert _value(samples, "fedge_round_seconds_bucket", le="60.0") == 2
    assert _value(samples, "fedge_model_accuracy") == pytest.approx(0.52)
    assert _value(samples, "fedge_run_info", run_id="run-7", model="cnn") == 1


def test_round_zero_reports_the_initial_model_but_counts_no_round(
    metrics: RunMetrics, server: MetricsServer
) -> None:
    metrics.on_round(_report(0, replies=0, seconds=9.0))

    samples = _scrape(server.url)

    assert _value(samples, "fedge_round") == 0
    assert _value(samples, "fedge_rounds_total") == 0
    assert _value(samples, "fedge_round_seconds_count") == 0
    assert _value(samples, "fedge_round_sampled") == 0
    assert _value(samples, "fedge_model_accuracy") == pytest.approx(0.5)
    assert _value(samples, "fedge_model_loss") == pytest.approx(1.0)


def test_a_secure_round_counts_the_clients_inside_the_aggregate(
    metrics: RunMetrics, server: MetricsServer
) -> None:
    # The strategy saw one aggregate reply; the secure round knows 8 were sampled, 6 survived.
    secure = {"sampled": 8, "survivors": 6, "threshold": 4, "aborted": None}
    metrics.on_round(_report(1, replies=1, failures=0, secure=secure))

    samples = _scrape(server.url)

    assert _value(samples, "fedge_round_sampled") == 8
    assert _value(samples, "fedge_round_completed") == 6
    assert _value(samples, "fedge_round_dropped") == 2


def test_epsilon_is_read_after_every_round() -> None:
    spent = iter([None, 0.25, 0.5])
    metrics = RunMetrics(run_id="run-7", model="cnn", epsilon=lambda: next(spent))

    with metrics.serve("127.0.0.1:0") as server:
        metrics.on_round(_report(0))
        assert _value(_scrape(server.url), "fedge_epsilon_spent") == 0
        metrics.on_round(_report(1))
        metrics.on_round(_report(2))
        assert _value(_scrape(server.url), "fedge_epsilon_spent") == 0.5


def test_a_failing_epsilon_callback_never_stops_the_run(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> float:
        raise RuntimeError("ledger unreachable")

    metrics = RunMetrics(run_id="run-7", model="cnn", epsilon=broken)

    metrics.on_round(_report(1))

    assert "cannot read the privacy spent so far" in caplog.text
    assert b"fedge_rounds_total 1.0" in metrics.render()


def test_a_run_without_dp_or_registry_exports_neither(metrics: RunMetrics) -> None:
    text = metrics.render().decode()

    assert "fedge_epsilon_spent" not in text
    assert "fedge_devices_enrolled" not in text


def test_device_counts_are_read_at_every_scrape() -> None:
    fleet = [DeviceCounts(enrolled=3, revoked=0), DeviceCounts(enrolled=4, revoked=1)]
    metrics = RunMetrics(run_id="run-7", model="cnn", devices=lambda: fleet[0])

    with metrics.serve("127.0.0.1:0") as server:
        first = _scrape(server.url)
        fleet.pop(0)
        second = _scrape(server.url)

    assert (_value(first, "fedge_devices_enrolled"), _value(first, "fedge_devices_revoked")) == (
        3,
        0,
    )
    assert (_value(second, "fedge_devices_enrolled"), _value(second, "fedge_devices_revoked")) == (
        4,
        1,
    )


def test_a_failing_device_callback_leaves_the_series_out_not_the_scrape(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken() -> DeviceCounts:
        raise RuntimeError("database down")

    metrics = RunMetrics(run_id="run-7", model="cnn", devices=broken)

    with metrics.serve("127.0.0.1:0") as server:
        samples = _scrape(server.url)

    assert ("fedge_devices_enrolled", ()) not in samples
    assert _value(samples, "fedge_rounds_total") == 0
    assert "cannot count the enrolled devices" in caplog.text


def test_two_runs_in_one_process_keep_their_own_registries() -> None:
    first = RunMetrics(run_id="run-a", model="cnn")
    second = RunMetrics(run_id="run-b", model="cnn")

    first.on_round(_report(1))

    assert b"fedge_rounds_total 1.0" in first.render()
    assert b"fedge_rounds_total 0.0" in second.render()
    assert REGISTRY.get_sample_value("fedge_rounds_total") is None


def test_only_the_metrics_path_is_served(server: MetricsServer) -> None:
    base = server.url.removesuffix("/metrics")

    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{base}/", timeout=10)

    assert refused.value.code == 404
    assert server.host == "127.0.0.1"
    assert server.port > 0


def test_close_releases_the_port_and_is_idempotent(metrics: RunMetrics) -> None:
    server = metrics.serve("127.0.0.1:0")
    port = server.port

    server.close()
    server.close()

    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    # The port is free again: a new server can take it.
    metrics.serve(f"127.0.0.1:{port}").close()


def test_a_port_in_use_is_a_config_error(metrics: RunMetrics, server: MetricsServer) -> None:
    with pytest.raises(ConfigError, match=rf"cannot serve metrics on 127\.0\.0\.1:{server.port}"):
        metrics.serve(f"127.0.0.1:{server.port}")


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("9400", r"must be HOST:PORT"),
        (":9400", r"must be HOST:PORT"),
        ("::1:9400", r"put an IPv6 address in brackets"),
        ("[not-ipv6]:9400", r"'not-ipv6' in brackets is not an IPv6 address"),
        ("bad host:9400", r"'bad host' is not an IP address or host name"),
        ("-leading.example:9400", r"is not an IP address or host name"),
        ("999.1.1.1:9400", r"'999\.1\.1\.1' is not an IP address or host name"),
        ("127.0.0.1:", r"port must be an integer in \[0, 65535\], got ''"),
        ("127.0.0.1:http", r"port must be an integer in \[0, 65535\], got 'http'"),
        ("127.0.0.1:65536", r"port must be an integer in \[0, 65535\], got '65536'"),
        ("127.0.0.1:-1", r"port must be an integer"),
        ("127.0.0.1:٩٤", r"port must be an integer"),
    ],
)
def test_a_malformed_address_is_refused(metrics: RunMetrics, address: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        metrics.serve(address)


def test_an_ipv6_loopback_address_is_served_in_brackets(metrics: RunMetrics) -> None:
    try:
        server = metrics.serve("[::1]:0")
    except ConfigError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    with server:
        assert server.url == f"http://[::1]:{server.port}/metrics"
        assert _value(_scrape(server.url), "fedge_rounds_total") == 0


@pytest.mark.parametrize(
    ("run_id", "model", "message"),
    [("", "cnn", r"run_id must not be empty"), ("run-7", "", r"model must not be empty")],
)
def test_run_metrics_needs_a_run_and_a_model(run_id: str, model: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunMetrics(run_id=run_id, model=model)


@pytest.mark.parametrize(
    ("enrolled", "revoked", "message"),
    [(-1, 0, r"enrolled must be >= 0, got -1"), (0, -2, r"revoked must be >= 0, got -2")],
)
def test_device_counts_are_never_negative(enrolled: int, revoked: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DeviceCounts(enrolled=enrolled, revoked=revoked)

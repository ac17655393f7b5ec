"""Prometheus metrics of a run: a round observer with its own registry, served over HTTP.

Notes
-----
The metrics say how the federation is doing (rounds, participation, duration,
privacy spent, fleet size); they carry no model values, updates, keys or device
identities. Each :class:`RunMetrics` owns a private ``CollectorRegistry`` instead
of prometheus_client's global one, so several runs in one process (and tests)
never collide.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from types import TracebackType
from typing import Any, Final, Self
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIEnvironment

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
    make_wsgi_app,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from fedge.errors import ConfigError
from fl_server.federation import RoundReport

__all__ = ["DeviceCounts", "MetricsServer", "RunMetrics"]

logger = logging.getLogger(__name__)

METRICS_PATH: Final = "/metrics"

# Rounds take from seconds (a simulation) to tens of minutes (a fleet waiting on its
# round timeout); the default buckets stop at 10 s.
_ROUND_SECONDS_BUCKETS: Final = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)

_HOSTNAME_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_MAX_PORT = 65535
_EXAMPLE = "e.g. 127.0.0.1:9400, 0.0.0.0:9400 or [::1]:9400"


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceCounts:
    """The size of the fleet at one moment.

    Parameters
    ----------
    enrolled
        Devices enrolled and not revoked, >= 0.
    revoked
        Devices whose enrolment was revoked, >= 0.
    """

    enrolled: int
    revoked: int

    def __post_init__(self) -> None:
        if self.enrolled < 0:
            raise ConfigError(f"enrolled must be >= 0, got {self.enrolled}")
        if self.revoked < 0:
            raise ConfigError(f"revoked must be >= 0, got {self.revoked}")


class _DeviceCollector(Collector):
    """Ask the callback for the fleet's size at every scrape."""

    def __init__(self, devices: Callable[[], DeviceCounts]) -> None:
        self._devices = devices

    def collect(self) -> Iterable[GaugeMetricFamily]:
        try:
            counts = self._devices()
        except Exception:
            # A scrape must not fail (and the gauges must not lie) because the
            # registry is briefly unreachable: the two series are left out instead.
            logger.warning("cannot count the enrolled devices", exc_info=True)
            return []
        return [
            GaugeMetricFamily(
                "fedge_devices_enrolled",
                "Devices enrolled and not revoked.",
                value=counts.enrolled,
            ),
            GaugeMetricFamily(
                "fedge_devices_revoked",
                "Devices whose enrolment was revoked.",
                value=counts.revoked,
            ),
        ]


class RunMetrics:
    """Keep a run's Prometheus metrics; a :class:`fl_server.RoundObserver`.

    Parameters
    ----------
    run_id
        The run, exported as a label of ``fedge_run_info``.
    model
        The model's name, exported as a label of ``fedge_run_info``.
    epsilon
        The privacy spent by the run so far (``None`` while nothing is known),
        read after every round; leave out for a run without differential privacy
        (``fedge_epsilon_spent`` is then not exported).
    devices
        The fleet's size, read at every scrape; leave out where there is no
        device registry (``fedge_devices_*`` are then not exported).

    Notes
    -----
    Metrics never stop a run: a callback that raises is logged and its metric is
    left as it was.

    Examples
    --------
    >>> metrics = RunMetrics(run_id="run-1", model="cnn", epsilon=lambda: 0.5)
    >>> server = metrics.serve("127.0.0.1:0")  # doctest: +SKIP
    >>> # make_server_app(..., observers=[metrics]); server.close() when the run ends
    """

    def __init__(
        self,
        *,
        run_id: str,
        model: str,
        epsilon: Callable[[], float | None] | None = None,
        devices: Callable[[], DeviceCounts] | None = None,
    ) -> None:
        if not run_id:
            raise ConfigError("run_id must not be empty")
        if not model:
            raise ConfigError("model must not be empty")
        self._epsilon = epsilon
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self._round = Gauge("fedge_round", "The last completed round.", registry=registry)
        self._sampled = Gauge(
            "fedge_round_sampled", "Clients sampled in the last round.", registry=registry
        )
        self._completed = Gauge(
            "fedge_round_completed",
            "Clients whose update the last round aggregated.",
            registry=registry,
        )
        self._dropped = Gauge(
            "fedge_round_dropped",
            "Clients sampled in the last round that failed or dropped out.",
            registry=registry,
        )
        self._rounds = Counter("fedge_rounds", "Training rounds completed.", registry=registry)
        self._seconds = Histogram(
            "fedge_round_seconds",
            "Wall-clock seconds of a training round, evaluation and checkpoint included.",
            buckets=_ROUND_SECONDS_BUCKETS,
            registry=registry,
        )
        self._accuracy = Gauge(
            "fedge_model_accuracy",
            "Central accuracy of the latest global model.",
            registry=registry,
        )
        self._loss = Gauge(
            "fedge_model_loss", "Central loss of the latest global model.", registry=registry
        )
        self._epsilon_spent: Gauge | None = None
        if epsilon is not None:
            self._epsilon_spent = Gauge(
                "fedge_epsilon_spent", "Privacy budget (epsilon) spent so far.", registry=registry
            )
        Info("fedge_run", "The run these metrics describe.", registry=registry).info(
            {"run_id": run_id, "model": model}
        )
        if devices is not None:
            registry.register(_DeviceCollector(devices))

    def on_round(self, report: RoundReport) -> None:
        """Record a finished round (round 0, the initial model, counts no round)."""
        self._accuracy.set(report.accuracy)
        self._loss.set(report.loss)
        if report.server_round > 0:
            sampled, completed = _participation(report)
            self._round.set(report.server_round)
            self._sampled.set(sampled)
            self._completed.set(completed)
            self._dropped.set(sampled - completed)
            self._rounds.inc()
            self._seconds.observe(report.seconds)
        self._read_epsilon()

    def render(self) -> bytes:
        """Return the metrics in Prometheus' text exposition format."""
        return generate_latest(self.registry)

    def serve(self, address: str) -> MetricsServer:
        """Serve ``/metrics`` over HTTP on ``address`` from a background thread.

        Parameters
        ----------
        address
            ``HOST:PORT``: an IPv4 address, a host name, or an IPv6 address in
            brackets; port 0 picks a free port (see :attr:`MetricsServer.port`).
            Only that host's interface is bound.

        Returns
        -------
        MetricsServer
            The running server; close it when the run ends.

        Raises
        ------
        ConfigError
            If ``address`` is malformed or cannot be listened on.
        """
        host, port = _parse_address(address)
        return MetricsServer(_only_metrics(make_wsgi_app(self.registry)), host, port)

    def _read_epsilon(self) -> None:
        if self._epsilon is None or self._epsilon_spent is None:
            return
        try:
            spent = self._epsilon()
        except Exception:
            logger.warning("cannot read the privacy spent so far", exc_info=True)
            return
        if spent is not None:
            self._epsilon_spent.set(spent)


def _participation(report: RoundReport) -> tuple[int, int]:
    """Return (clients sampled, clients aggregated) of a training round."""
    secure = report.secure_aggregation
    if secure is not None:
        # The strategy saw one aggregate reply: the secure round knows the clients in it.
        return int(secure["sampled"]), int(secure["survivors"])
    return report.num_replies + report.num_failures, report.num_replies


class _QuietHandler(WSGIRequestHandler):
    """Log no request line to stderr (library code adds no output)."""

    def log_message(self, format: str, *args: Any) -> None:
        """Log nothing."""


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    """One thread per scrape, never joined at shutdown."""

    daemon_threads = True


def _only_metrics(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    def application(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != METRICS_PATH:
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"not found: metrics are at /metrics\n"]
        return app(environ, start_response)

    return application


class MetricsServer:
    """An HTTP server for ``/metrics`` on a daemon thread; a context manager.

    Build it with :meth:`RunMetrics.serve`.
    """

    def __init__(self, app: Callable[..., Iterable[bytes]], host: str, port: int) -> None:
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
            server_class = type("_Server", (_ThreadingServer,), {"address_family": family})
            self._httpd: WSGIServer = make_server(
                host, port, app, server_class=server_class, handler_class=_QuietHandler
            )
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {_join(host, port)}: {exc}") from exc
        self.host = host
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            # How long close() may wait for the loop to notice; the idle cost is negligible.
            kwargs={"poll_interval": 0.1},
            name="fedge-metrics",
            daemon=True,
        )
        self._thread.start()
        logger.info("serving metrics on http://%s%s", _join(host, self.port), METRICS_PATH)

    @property
    def url(self) -> str:
        """The URL Prometheus scrapes."""
        return f"http://{_join(self.host, self.port)}{METRICS_PATH}"

    def close(self) -> None:
        """Stop serving and release the port; idempotent."""
        if not self._thread.is_alive():
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _parse_address(address: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` and check both parts."""
    host, separator, port_text = address.rpartition(":")
    if not separator or not host:
        raise ConfigError(f"metrics address must be HOST:PORT ({_EXAMPLE}), got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(
                f"metrics address {address!r}: {host!r} in brackets is not an IPv6 address"
            ) from None
    elif ":" in host:
        raise ConfigError(
            f"metrics address {address!r}: put an IPv6 address in brackets, e.g. [::1]:9400"
        )
    elif not _is_host(host):
        raise ConfigError(
            f"metrics address {address!r}: {host!r} is not an IP address or host name"
        )
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > _MAX_PORT:
        raise ConfigError(
            f"metrics address {address!r}: port must be an integer in [0, {_MAX_PORT}], "
            f"got {port_text!r}"
        )
    return host, int(port_text)


def _is_host(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        labels = host.removesuffix(".").split(".")
        return (
            len(host) <= 253
            and all(_HOSTNAME_LABEL.match(label) for label in labels)
            # A name whose last label is all digits is a malformed IPv4 address.
            and not labels[-1].isdigit()
        )
    return True

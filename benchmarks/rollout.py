"""Canary rollout: device events ingested per second, and (later) the time to roll back a canary.

Sections, each a function of the parsed arguments that returns its part of the JSON
(a failing section keeps its keys with ``error`` set):

``ingest``
    D simulated devices (1,000 by default) each publish E signed events
    (:mod:`edge_runtime.device_events`, one enrolment identity per device, its own
    topic, seq 1..E) over a local Mosquitto; the cloud's
    :class:`fl_server.events.MqttIngestService` verifies each event (certificate,
    signature, topic) and stores it once in SQLite (one transaction per batch,
    acknowledged after the commit). ``fedge_ingest`` is timed from the moment the
    publishers start until the last event is committed: ``events_per_s`` end to end.
    ``raw_broker`` is the baseline measured side by side in the same run: the same
    publishers, connections, topics and payload size, but unsigned bytes and a plain
    QoS 1 subscriber that only counts (no parsing, verification or database).
    1,000 TCP connections from Python would measure thread scheduling, not ingestion,
    so the devices are spread over ``--publishers`` processes with ONE shared MQTT
    connection each (devices still sign with their own keys and publish on their own
    topics). Variants alternate, a warm-up run first, then ``--repeats`` timed runs
    each (medians, min, max). Also ``device_emit_per_s``: what
    :meth:`edge_runtime.mqtt_publisher.EventPublisher.emit` (sign, fsync to the
    outbox) sustains on one device, no network.
``rollback``
    ``seconds_to_rollback`` (time from a bad canary's first reports to the rollback)
    and ``max_exposed_fraction``: measured by the rollout controller's section, not
    yet part of this file (null, with ``error`` saying so).

The broker: by default a private ``mosquitto`` started on a free loopback port with
the queue settings docs/device-events.md recommends (``max_queued_messages 0``: the
default 1000 would drop acknowledged events whenever the ingestor lags by more);
``--broker HOST:PORT`` uses a running one instead (lost events are then reported).

Writes ``benchmarks/results/rollout.json``: ``events_per_s``,
``seconds_to_rollback``, ``max_exposed_fraction`` (top level, stable), and the
sections ``ingest`` (``variants.{fedge_ingest, raw_broker}`` with
``median_events_per_s``, ``min_events_per_s``, ``max_events_per_s``, ``median_s``,
``lost``, ``error``; ``ratios.fedge_ingest_over_raw_broker``; ``payload_bytes``,
``device_emit_per_s``) and ``rollback``.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from benchmarks._common import RESULTS, machine, peak_rss_mb, write
from edge_runtime.device_events import EventKind, sign_event
from edge_runtime.mqtt_config import MqttConfig, connect_properties, event_topic
from edge_runtime.mqtt_publisher import EventPublisher
from fl_server.audit import AuditLog
from fl_server.db import open_database
from fl_server.events import EventIngestor, EventStore, MqttIngestService, RejectionRecorder
from secure_agg.identity import EnrolmentAuthority
from secure_agg.randomness import DeterministicRandom

__all__ = ["main"]

_AUTHORITY_SEED = 20_260_501
_RUN_TIMEOUT_S = 600.0
_STALL_S = 10.0
_VARIANTS = ("fedge_ingest", "raw_broker")
_BROKER_CONF = """\
listener {port} 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 0
max_queued_bytes 0
log_dest none
"""


def _authority() -> EnrolmentAuthority:
    return EnrolmentAuthority.generate(DeterministicRandom(_AUTHORITY_SEED))


def _device_id(number: int) -> str:
    return f"dev-{number:016x}"


# --- the broker -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Broker:
    host: str
    port: int
    description: str


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _broker(address: str | None, work: Path) -> Iterator[_Broker]:
    if address is not None:
        host, _, port = address.rpartition(":")
        if not _answers(host, int(port)):
            raise RuntimeError(f"no MQTT broker answers on {address}")
        yield _Broker(host, int(port), f"running broker {address} (its own queue limits)")
        return
    binary = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if binary is None:
        if not _answers("127.0.0.1", 1883):
            raise RuntimeError("no mosquitto binary and nothing on 127.0.0.1:1883")
        yield _Broker("127.0.0.1", 1883, "running broker 127.0.0.1:1883 (no mosquitto binary)")
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = work / "mosquitto.conf"
    config.write_text(_BROKER_CONF.format(port=port))
    process = subprocess.Popen(
        [binary, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 10
        while not _answers("127.0.0.1", port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"mosquitto did not start: {process.stderr.read() if process.stderr else ''!r}"
                )
            time.sleep(0.05)
        yield _Broker(
            "127.0.0.1", port, f"private mosquitto on 127.0.0.1:{port}, max_queued_messages 0"
        )
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(5)
        if process.poll() is None:
            process.kill()


# --- the publisher processes ------------------------------------------------------------


def _payloads(
    devices: list[int], events: int, root: str, variant: str, size: int
) -> list[tuple[str, bytes]]:
    """Return (topic, payload) in publishing order: event k of every device, then k + 1."""
    authority = _authority()
    identities = [authority.enrol(_device_id(n), DeterministicRandom(n + 1)) for n in devices]
    messages: list[tuple[str, bytes]] = []
    for seq in range(1, events + 1):
        for identity in identities:
            device = identity.certificate.enrolment_id
            topic = event_topic(device, root)
            if variant == "fedge_ingest":
                body = {
                    "error_rate": 0.001 * (seq % 7),
                    "latency_p95_ms": 3.1,
                    "inferences": 100 * seq,
                }
                event = sign_event(
                    identity, seq=seq, kind=EventKind.HEALTH, body=body, time=1.767e9 + seq
                )
                messages.append((topic, event.to_bytes()))
            else:
                messages.append((topic, os.urandom(size // 2).hex().encode()[:size]))
    return messages


@dataclass(frozen=True, slots=True)
class _PublisherSpec:
    index: int
    devices: list[int]
    host: str
    port: int


def _publisher_main(
    spec: _PublisherSpec,
    commands: multiprocessing.Queue[Any],
    results: multiprocessing.Queue[Any],
    start: Any,
) -> None:
    """One publisher process: one MQTT connection shared by its devices."""
    acked = 0
    refused = 0
    changed = threading.Condition()
    index = spec.index

    def acknowledged(total: int) -> int:
        with changed:
            changed.wait_for(lambda: acked >= total, timeout=_RUN_TIMEOUT_S)
            return acked

    def on_publish(
        client: mqtt.Client, userdata: object, mid: int, code: ReasonCode, properties: object
    ) -> None:
        nonlocal acked, refused
        with changed:
            acked += 1
            refused += code.value not in (0x00,)
            changed.notify_all()

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"bench-pub-{index}-{secrets.token_hex(3)}",
        protocol=mqtt.MQTTv5,
    )
    client.on_publish = on_publish
    client.connect(
        spec.host, spec.port, keepalive=60, clean_start=True, properties=connect_properties()
    )
    client.loop_start()
    try:
        while True:
            command = commands.get()
            if command[0] == "stop":
                return
            _, root, variant, events, size = command
            messages = _payloads(spec.devices, events, root, variant, size)
            with changed:
                acked = refused = 0
            results.put(("ready", index, len(messages)))
            start.wait()
            started = time.perf_counter()
            for topic, payload in messages:
                client.publish(topic, payload, qos=1)
            done = acknowledged(len(messages))
            results.put(("done", index, time.perf_counter() - started, done, refused))
    finally:
        client.disconnect()
        client.loop_stop()


class _Publishers:
    """``count`` publisher processes sharing the devices round-robin."""

    def __init__(self, count: int, devices: int, broker: _Broker) -> None:
        context = multiprocessing.get_context("spawn")
        self._start = context.Barrier(count + 1)
        self._results: multiprocessing.Queue[Any] = context.Queue()
        self._commands: list[multiprocessing.Queue[Any]] = [context.Queue() for _ in range(count)]
        self._processes = [
            context.Process(
                target=_publisher_main,
                args=(
                    _PublisherSpec(
                        index, list(range(index, devices, count)), broker.host, broker.port
                    ),
                    self._commands[index],
                    self._results,
                    self._start,
                ),
                daemon=True,
            )
            for index in range(count)
        ]
        for process in self._processes:
            process.start()

    def prepare(self, root: str, variant: str, events: int, size: int) -> int:
        for queue in self._commands:
            queue.put(("run", root, variant, events, size))
        total = 0
        for _ in self._processes:
            kind, _index, count = self._results.get(timeout=_RUN_TIMEOUT_S)
            assert kind == "ready"
            total += count
        return total

    def go(self) -> float:
        self._start.wait()
        return time.perf_counter()

    def finish(self) -> tuple[float, int, int]:
        """Return the slowest publisher's seconds, the acknowledged and the refused counts."""
        seconds, acked, refused = 0.0, 0, 0
        for _ in self._processes:
            kind, _index, elapsed, done, refusals = self._results.get(timeout=_RUN_TIMEOUT_S)
            assert kind == "done"
            seconds, acked, refused = max(seconds, elapsed), acked + done, refused + refusals
        return seconds, acked, refused

    def close(self) -> None:
        for queue in self._commands:
            queue.put(("stop",))
        for process in self._processes:
            process.join(10)
            if process.is_alive():
                process.terminate()


# --- the two receivers ------------------------------------------------------------------


class _RawCounter:
    """The baseline: a QoS 1 subscriber that counts messages and does nothing else."""

    def __init__(self, broker: _Broker, root: str) -> None:
        self.count = 0
        self._changed = threading.Condition()
        self._subscribed = threading.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"bench-raw-{root}", protocol=mqtt.MQTTv5
        )
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *args: self._subscribed.set()
        self._client.on_connect = lambda client, *args: client.subscribe(
            f"{root}/devices/+/events", qos=1
        )
        self._client.connect(
            broker.host,
            broker.port,
            clean_start=True,
            properties=connect_properties(receive_maximum=1_000),
        )
        self._client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("the raw subscriber did not subscribe")

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        with self._changed:
            self.count += 1
            self._changed.notify_all()

    def received(self) -> int:
        with self._changed:
            return self.count

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


class _Cloud:
    """fedge's ingestor on a fresh SQLite database."""

    def __init__(self, broker: _Broker, root: str, database: Path) -> None:
        self._engine = open_database(f"sqlite:///{database}")
        self.ingestor = EventIngestor(
            EventStore(self._engine),
            authority_public_key=_authority().public_key,
            rejections=RejectionRecorder(AuditLog(self._engine)),
            topic_root=root,
        )
        config = MqttConfig(
            host=broker.host,
            port=broker.port,
            tls=False,
            client_id=f"bench-ingestor-{root}",
            topic_root=root,
        )
        self._service = MqttIngestService(
            config, self.ingestor, session_expiry_s=0, receive_maximum=1_000
        )
        self._service.start()
        if not self._service.wait_subscribed(10):
            raise RuntimeError("the ingestor did not subscribe")

    def received(self) -> int:
        return self.ingestor.stats().received

    def close(self) -> None:
        self._service.close(end_session=True)
        self._engine.dispose()


def _wait(receiver: _Cloud | _RawCounter, total: int) -> tuple[int, float]:
    """Wait for ``total`` messages, or until none came for ``_STALL_S``; return the count and
    when the last one came (a broker that dropped messages must not stall the benchmark)."""
    count, last = 0, time.perf_counter()
    while count < total:
        time.sleep(0.002)
        now, seen = time.perf_counter(), receiver.received()
        if seen != count:
            count, last = seen, now
        elif now - last > _STALL_S:
            break
    return count, last


# --- the ingest section -----------------------------------------------------------------


def _emit_rate(work: Path, count: int) -> float:
    """Events per second one device's EventPublisher.emit sustains (sign + fsync), offline."""
    identity = _authority().enrol(_device_id(0), DeterministicRandom(1))
    publisher = EventPublisher(
        MqttConfig(host="127.0.0.1", tls=False), identity, work / "emit", max_buffered=count + 1
    )
    publisher.emit(EventKind.HEALTH, {"warm": True})
    started = time.perf_counter()
    for number in range(count):
        publisher.emit(EventKind.HEALTH, {"error_rate": 0.0, "n": number})
    return count / (time.perf_counter() - started)


def _one_run(
    variant: str,
    *,
    broker: _Broker,
    publishers: _Publishers,
    args: argparse.Namespace,
    work: Path,
    size: int,
) -> dict[str, Any]:
    root = f"bench-{secrets.token_hex(4)}"
    receiver: _Cloud | _RawCounter = (
        _Cloud(broker, root, work / f"{root}.db")
        if variant == "fedge_ingest"
        else _RawCounter(broker, root)
    )
    try:
        total = publishers.prepare(root, variant, args.events_per_device, size)
        started = publishers.go()
        received, finished = _wait(receiver, total)
        seconds = finished - started
        publish_s, acked, refused = publishers.finish()
        run: dict[str, Any] = {
            "seconds": seconds,
            "messages": total,
            "received": received,
            "publish_s": publish_s,
            "acked": acked,
            "refused": refused,
        }
        if isinstance(receiver, _Cloud):
            stats = receiver.ingestor.stats()
            run.update(
                stored=stats.stored, duplicates=stats.duplicates, rejected=stats.rejected_total
            )
        return run
    finally:
        receiver.close()


def _variant_result(runs: list[dict[str, Any]], error: str | None) -> dict[str, Any]:
    if not runs:
        return {
            "median_events_per_s": None,
            "min_events_per_s": None,
            "max_events_per_s": None,
            "median_s": None,
            "lost": None,
            "runs": [],
            "error": error,
        }
    rates = [run["received"] / run["seconds"] for run in runs]
    lost = max(run["messages"] - run.get("stored", run["received"]) for run in runs)
    return {
        "median_events_per_s": round(statistics.median(rates), 1),
        "min_events_per_s": round(min(rates), 1),
        "max_events_per_s": round(max(rates), 1),
        "median_s": round(statistics.median(run["seconds"] for run in runs), 4),
        "median_publish_s": round(statistics.median(run["publish_s"] for run in runs), 4),
        "lost": lost,
        "runs": runs,
        "error": error
        if error
        else (f"{lost} events not received or not stored" if lost else None),
    }


def ingest_section(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Measure fedge's end-to-end ingest rate and the raw broker's, alternating."""
    size = len(_payloads([0], 1, "bench-size", "fedge_ingest", 0)[0][1])
    section: dict[str, Any] = {
        "devices": args.devices,
        "events_per_device": args.events_per_device,
        "publishers": args.publishers,
        "connections": args.publishers,
        "layout": f"{args.devices} devices, each signing with its own identity on its own topic, "
        f"spread over {args.publishers} publisher processes with one shared MQTT 5 connection each",
        "payload_bytes": size,
        "database": "sqlite",
    }
    runs: dict[str, list[dict[str, Any]]] = {variant: [] for variant in _VARIANTS}
    errors: dict[str, str | None] = dict.fromkeys(_VARIANTS)
    try:
        with _broker(args.broker, work) as broker:
            section["broker"] = broker.description
            publishers = _Publishers(args.publishers, args.devices, broker)
            try:
                for attempt in range(args.repeats + 1):  # the first pass warms up
                    order = _VARIANTS if attempt % 2 == 0 else tuple(reversed(_VARIANTS))
                    for variant in order:
                        if errors[variant] is not None:
                            continue
                        try:
                            run = _one_run(
                                variant,
                                broker=broker,
                                publishers=publishers,
                                args=args,
                                work=work,
                                size=size,
                            )
                        except Exception as error:  # a failed variant keeps its keys
                            errors[variant] = f"{type(error).__name__}: {error}"
                            continue
                        label = "warm-up" if attempt == 0 else f"run {attempt}"
                        rate = run["received"] / run["seconds"]
                        print(f"  {variant}: {rate:.0f} events/s ({label})", flush=True)
                        if attempt > 0:
                            runs[variant].append(run)
            finally:
                publishers.close()
    except Exception as error:
        for variant in _VARIANTS:
            errors[variant] = errors[variant] or f"{type(error).__name__}: {error}"
    variants = {variant: _variant_result(runs[variant], errors[variant]) for variant in _VARIANTS}
    fedge, raw = (variants[name]["median_events_per_s"] for name in _VARIANTS)
    section["variants"] = variants
    section["ratios"] = {
        "fedge_ingest_over_raw_broker": round(fedge / raw, 3) if fedge and raw else None
    }
    try:
        section["device_emit_per_s"] = round(_emit_rate(work, 200 if args.quick else 1_000), 1)
    except Exception as error:
        section["device_emit_per_s"] = None
        section["device_emit_error"] = f"{type(error).__name__}: {error}"
    section["events_per_s"] = fedge
    return section


# --- the rollback section (the rollout controller adds its measurement here) -------------


def rollback_section(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Run the rollout scenario: time from a bad canary's first report to its rollback.

    The scenario (``simulations.rollout_scenario``) rolls a good INT8 variant and then a
    badly calibrated one out to ``--devices`` simulated devices over the broker; the
    baseline beside it is what a fleet without canaries would expose (all of it).
    ``--quick`` runs one scenario of 200 devices (stages 5/25/100 %), the full size
    ``--repeats`` scenarios of ``--devices`` (stages 1/10/50/100 %).
    """
    from simulations.data import load_fashion_mnist
    from simulations.rollout_scenario import RolloutScenario, run_rollout_scenario

    devices = 200 if args.quick else args.devices
    stages = (0.05, 0.25, 1.0) if args.quick else (0.01, 0.10, 0.50, 1.0)
    repeats = 1 if args.quick else args.repeats
    section: dict[str, Any] = {"devices": devices, "stages": list(stages), "runs": []}
    try:
        data = load_fashion_mnist()
        with _broker(args.broker, work) as broker:
            section["broker"] = broker.description
            for attempt in range(repeats):
                config = RolloutScenario(
                    devices=devices,
                    stages=stages,
                    broker_host=broker.host,
                    broker_port=broker.port,
                    seed=attempt,
                )
                result = run_rollout_scenario(config, work / f"scenario-{attempt}", data)
                section["runs"].append(result.to_json())
                bad = result.bad
                print(
                    f"  run {attempt + 1}: bad variant {bad.state} at "
                    f"{100 * bad.fraction_reached:g} %, {bad.seconds_to_rollback} s, "
                    f"{100 * bad.max_exposed_fraction:.1f} % exposed",
                    flush=True,
                )
    except Exception as exc:  # a benchmark records a failure instead of hiding it
        section.update(seconds_to_rollback=None, max_exposed_fraction=None, error=str(exc))
        return section
    runs = section["runs"]
    to_rollback = [r["bad"]["seconds_to_rollback"] for r in runs]
    exposed = [r["bad"]["max_exposed_fraction"] for r in runs]
    caught = all(r["bad"]["state"] == "rolled_back" for r in runs)
    promoted = all(r["good"]["state"] == "completed" for r in runs)
    section.update(
        seconds_to_rollback=None if None in to_rollback else statistics.median(to_rollback),
        min_seconds_to_rollback=None if None in to_rollback else min(to_rollback),
        max_seconds_to_rollback=None if None in to_rollback else max(to_rollback),
        max_exposed_fraction=max(exposed),
        good_promotion_s=statistics.median(r["good"]["seconds"] for r in runs),
        bad_caught_every_run=caught,
        good_promoted_every_run=promoted,
        events_lost=sum(r["events_published"] - r["events_stored"] for r in runs),
        exposure_vs_no_canary=max(exposed) / 1.0,
        error=None
        if caught and promoted
        else "a run did not catch the bad variant or promote the good one (see runs)",
    )
    return section


SECTIONS: dict[str, Callable[[argparse.Namespace, Path], dict[str, Any]]] = {
    "ingest": ingest_section,
    "rollback": rollback_section,
}


def _table(document: dict[str, Any]) -> str:
    lines = ["variant        events/s (median)   min       max       lost   error"]
    for name, variant in document["ingest"].get("variants", {}).items():
        lines.append(
            f"{name:<14} {variant['median_events_per_s']!s:<19} {variant['min_events_per_s']!s:<9} "
            f"{variant['max_events_per_s']!s:<9} {variant['lost']!s:<6} {variant['error'] or ''}"
        )
    ratio = document["ingest"].get("ratios", {}).get("fedge_ingest_over_raw_broker")
    lines.append(f"fedge_ingest / raw_broker: {ratio}")
    lines.append(
        f"device emit (sign + fsync): {document['ingest'].get('device_emit_per_s')} events/s"
    )
    lines.append(f"seconds_to_rollback: {document['seconds_to_rollback']}")
    lines.append(f"max_exposed_fraction: {document['max_exposed_fraction']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the sections and write their JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1_000, help="simulated devices")
    parser.add_argument(
        "--events-per-device", type=int, default=10, help="events each device publishes per run"
    )
    parser.add_argument(
        "--publishers", type=int, default=2, help="publisher processes (one MQTT connection each)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs per variant after a warm-up"
    )
    parser.add_argument(
        "--broker",
        default=None,
        help="HOST:PORT of a running broker [default: a private mosquitto]",
    )
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}"
    )
    parser.add_argument("--quick", action="store_true", help="3 events per device")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.events_per_device = min(args.events_per_device, 3)
    if min(args.devices, args.events_per_device, args.publishers, args.repeats) < 1:
        parser.error("--devices, --events-per-device, --publishers and --repeats must be >= 1")
    chosen = [name for name in args.sections.split(",") if name]
    if unknown := set(chosen) - set(SECTIONS):
        parser.error(f"unknown sections {sorted(unknown)}")
    document: dict[str, Any] = {
        "benchmark": "rollout",
        "machine": machine() | {"paho_mqtt": _version("paho-mqtt")},
        "parameters": {
            "devices": args.devices,
            "events_per_device": args.events_per_device,
            "publishers": args.publishers,
            "repeats": args.repeats,
            "broker": args.broker,
            "quick": args.quick,
        },
    }
    with tempfile.TemporaryDirectory(prefix="fedge-rollout-bench-") as tmp:
        for name, section in SECTIONS.items():
            if name in chosen:
                print(name, flush=True)
                document[name] = section(args, Path(tmp))
            else:
                document[name] = {"error": "skipped (--sections)"}
    document["events_per_s"] = document["ingest"].get("events_per_s")
    document["seconds_to_rollback"] = document["rollback"].get("seconds_to_rollback")
    document["max_exposed_fraction"] = document["rollback"].get("max_exposed_fraction")
    document["peak_rss_mb"] = round(peak_rss_mb(), 1)
    write(args.out or RESULTS / "rollout.json", document)
    print(_table(document))
    return document


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()

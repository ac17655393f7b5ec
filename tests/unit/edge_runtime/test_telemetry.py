"""The offline telemetry buffer and the edge filter that decides what goes upstream."""

from __future__ import annotations

import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_runtime.drift import DriftMethod, DriftReport, PsiLevel
from edge_runtime.edge_filter import EdgeFilter, EdgeFilterConfig, OutputKind, measure_egress
from edge_runtime.telemetry import DROPPED_EVENT_KIND, TelemetryBuffer, TelemetryOffline
from fedge.errors import ConfigError, StorageError

FIXED_TIME = datetime(2026, 1, 31, 12, 0, tzinfo=UTC)
Event = dict[str, Any]


def events(count: int, start: int = 0) -> list[Event]:
    return [{"kind": "test", "number": number} for number in range(start, start + count)]


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("segment-*.jsonl"))


class Recorder:
    """A ``send`` that records each batch, and fails on the calls listed in ``fail_on``."""

    def __init__(self, fail_on: tuple[int, ...] = ()) -> None:
        self.batches: list[list[Event]] = []
        self.calls = 0
        self.fail_on = fail_on

    def __call__(self, batch: list[Event]) -> None:
        self.calls += 1
        if self.calls in self.fail_on:
            raise ConnectionRefusedError("uplink down")
        self.batches.append(batch)

    @property
    def delivered(self) -> list[Event]:
        return [event for batch in self.batches for event in batch]


# --- TelemetryBuffer -------------------------------------------------------------------


def test_events_survive_a_restart_in_order(tmp_path: Path) -> None:
    buffer = TelemetryBuffer(tmp_path, segment_records=4)
    sequence_numbers = [buffer.append(event) for event in events(10)]

    reopened = TelemetryBuffer(tmp_path, segment_records=4)
    sender = Recorder()
    sent = reopened.flush(sender)

    assert sequence_numbers == list(range(10))
    assert sent == 10 and sender.delivered == events(10)
    assert len(segments(tmp_path)) == 0  # every segment was sent, so deleted
    assert TelemetryBuffer(tmp_path).append({"kind": "after"}) == 10  # numbering goes on


def test_a_full_buffer_drops_the_oldest_and_remembers_how_many(tmp_path: Path) -> None:
    buffer = TelemetryBuffer(tmp_path, max_records=5, segment_records=2)
    for event in events(12):
        buffer.append(event)

    reopened = TelemetryBuffer(tmp_path, max_records=5, segment_records=2)
    sender = Recorder()
    reopened.flush(sender)

    assert len(buffer) == 5 and buffer.dropped == 7
    assert len(segments(tmp_path)) == 0
    assert sender.delivered == [{"kind": DROPPED_EVENT_KIND, "count": 7}, *events(5, start=7)]
    assert reopened.dropped == 0 and TelemetryBuffer(tmp_path).dropped == 0


def test_disk_use_stays_bounded_by_whole_segments(tmp_path: Path) -> None:
    buffer = TelemetryBuffer(tmp_path, max_records=10, segment_records=4)
    for event in events(100):
        buffer.append(event)

    lines = sum(path.read_bytes().count(b"\n") for path in segments(tmp_path))

    assert len(buffer) == 10 and buffer.dropped == 90
    assert lines < 10 + 4  # the live events plus at most one partly sent segment


def test_reopening_with_a_smaller_bound_drops_at_once(tmp_path: Path) -> None:
    buffer = TelemetryBuffer(tmp_path)
    for event in events(6):
        buffer.append(event)

    smaller = TelemetryBuffer(tmp_path, max_records=4)

    assert len(smaller) == 4 and smaller.dropped == 2


@pytest.mark.parametrize(
    "tail", [b'{"event":{"kind":"test","num', b"\x00\x00\x00\x00\n"], ids=["partial", "zeroed"]
)
def test_a_torn_last_line_is_dropped_on_reopen(tmp_path: Path, tail: bytes) -> None:
    buffer = TelemetryBuffer(tmp_path)
    for event in events(3):
        buffer.append(event)
    with segments(tmp_path)[-1].open("ab") as handle:
        handle.write(tail)  # a crash in the middle of the fourth append

    reopened = TelemetryBuffer(tmp_path)
    reopened.append({"kind": "after"})
    sender = Recorder()
    TelemetryBuffer(tmp_path).flush(sender)

    assert len(reopened) == 4
    assert sender.delivered == [*events(3), {"kind": "after"}]


def test_a_corrupt_line_before_the_end_is_an_error(tmp_path: Path) -> None:
    buffer = TelemetryBuffer(tmp_path)
    for event in events(3):
        buffer.append(event)
    segment = segments(tmp_path)[0]
    lines = segment.read_bytes().split(b"\n")
    segment.write_bytes(b"\n".join([lines[0], b"garbage", *lines[2:]]))

    with pytest.raises(StorageError, match=r"segment-0+\.jsonl line 2 is corrupt"):
        TelemetryBuffer(tmp_path)


def test_a_corrupt_state_file_is_an_error(tmp_path: Path) -> None:
    TelemetryBuffer(tmp_path, max_records=1).append({"kind": "x"})
    TelemetryBuffer(tmp_path, max_records=1).append({"kind": "y"})  # writes state.json
    (tmp_path / "state.json").write_text('{"head": -1}')

    with pytest.raises(StorageError, match=r"state .* is corrupt"):
        TelemetryBuffer(tmp_path)


def test_flush_sends_oldest_first_in_batches(tmp_path: Path) -> None:
    buffer = TelemetryBuffer(tmp_path, segment_records=64)
    for event in events(250):
        buffer.append(event)
    sender = Recorder()

    sent = buffer.flush(sender, batch_size=100)

    assert sent == 250 and len(buffer) == 0
    assert [len(batch) for batch in sender.batches] == [100, 100, 50]
    assert sender.delivered == events(250)
    assert buffer.flush(sender) == 0 and sender.calls == 3  # nothing left, no empty send


def test_a_failing_send_loses_nothing_and_a_later_flush_delivers_once(tmp_path: Path) -> None:
    buffer = TelemetryBuffer(tmp_path, segment_records=64)
    for event in events(250):
        buffer.append(event)
    offline = Recorder(fail_on=(2,))

    with pytest.raises(TelemetryOffline, match="after 100 records; 150 stay buffered") as raised:
        buffer.flush(offline, batch_size=100)
    restarted = TelemetryBuffer(tmp_path, segment_records=64)  # e.g. the device rebooted
    online = Recorder()
    sent = restarted.flush(online, batch_size=100)

    assert raised.value.sent == 100 and raised.value.remaining == 150
    assert isinstance(raised.value.__cause__, ConnectionRefusedError)
    assert isinstance(raised.value, ConnectionError)
    assert sent == 150
    assert offline.delivered + online.delivered == events(250)  # each exactly once, in order


def test_the_dropped_count_survives_a_failed_send(tmp_path: Path) -> None:
    buffer = TelemetryBuffer(tmp_path, max_records=3)
    for event in events(5):
        buffer.append(event)

    with pytest.raises(TelemetryOffline):
        buffer.flush(Recorder(fail_on=(1,)))
    kept = buffer.dropped
    sender = Recorder()
    buffer.flush(sender, batch_size=2)

    assert kept == 2 and buffer.dropped == 0
    assert sender.batches == [
        [{"kind": DROPPED_EVENT_KIND, "count": 2}, events(1, start=2)[0]],
        events(2, start=3),
    ]


def test_a_batch_sent_but_not_recorded_is_sent_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    buffer = TelemetryBuffer(tmp_path)
    for event in events(3):
        buffer.append(event)

    def crash(self: TelemetryBuffer) -> None:
        raise OSError("power cut")

    with monkeypatch.context() as patch:
        patch.setattr(TelemetryBuffer, "_write_state", crash)
        with pytest.raises(StorageError, match="cannot record sent telemetry: power cut"):
            buffer.flush(Recorder())
    sender = Recorder()
    TelemetryBuffer(tmp_path).flush(sender)

    assert sender.delivered == events(3)  # at-least-once: delivered again after the crash


def test_segments_left_behind_after_a_flush_are_skipped_and_removed(tmp_path: Path) -> None:
    buffer = TelemetryBuffer(tmp_path, segment_records=2)
    for event in events(5):
        buffer.append(event)
    backup = tmp_path / "backup"
    backup.mkdir()
    for segment in segments(tmp_path):
        shutil.copy(segment, backup / segment.name)
    buffer.flush(Recorder())
    for segment in segments(backup):  # a crash between recording the head and unlinking
        shutil.copy(segment, tmp_path / segment.name)

    reopened = TelemetryBuffer(tmp_path, segment_records=2)

    assert len(reopened) == 0 and segments(tmp_path) == []


def test_a_failed_disk_write_buffers_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    buffer = TelemetryBuffer(tmp_path)
    buffer.append({"kind": "first"})
    before = segments(tmp_path)[0].read_bytes()

    def full_disk(descriptor: int) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", full_disk)
        with pytest.raises(StorageError, match="cannot append telemetry"):
            buffer.append({"kind": "second"})

    assert len(buffer) == 1 and segments(tmp_path)[0].read_bytes() == before
    assert buffer.append({"kind": "third"}) == 1


@pytest.mark.parametrize(
    ("event", "message"),
    [
        (["not", "a", "mapping"], "an event must be a mapping, got list"),
        ({"value": float("nan")}, "an event must be finite, plain JSON"),
        ({"value": object()}, "an event must be finite, plain JSON"),
        ({"pixels": [0.5] * 5000}, "an event must be at most 16384 bytes of JSON"),
    ],
)
def test_append_rejects_events_that_are_not_small_json(
    tmp_path: Path, event: Any, message: str
) -> None:
    buffer = TelemetryBuffer(tmp_path)

    with pytest.raises(ConfigError, match=message):
        buffer.append(event)
    assert len(buffer) == 0


def test_buffer_rejects_bad_sizes_and_paths(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")

    with pytest.raises(ConfigError, match="max_records must be an int >= 1, got 0"):
        TelemetryBuffer(tmp_path, max_records=0)
    with pytest.raises(ConfigError, match="segment_records must be an int >= 1, got 0"):
        TelemetryBuffer(tmp_path, segment_records=0)
    with pytest.raises(ConfigError, match="batch_size must be an int >= 1, got 0"):
        TelemetryBuffer(tmp_path).flush(Recorder(), batch_size=0)
    with pytest.raises(StorageError, match="cannot use telemetry buffer"):
        TelemetryBuffer(tmp_path / "file")


# --- EdgeFilter ------------------------------------------------------------------------


def confident_logits(rng: np.random.Generator, count: int, margin: float = 8.0) -> np.ndarray:
    logits = rng.normal(0, 1, (count, 10))
    logits[np.arange(count), rng.integers(0, 10, count)] += margin
    return logits.astype(np.float32)


def edge_filter(**config: Any) -> EdgeFilter:
    return EdgeFilter(EdgeFilterConfig(**config), clock=lambda: FIXED_TIME)


def test_forwards_low_confidence_inputs_as_anomalies_without_pixels() -> None:
    rng = np.random.default_rng(0)
    images = rng.random((20, 1, 28, 28), dtype=np.float32)
    logits = confident_logits(rng, 20)
    logits[[3, 11]] = 0.0  # uniform: confidence 0.1

    sent = edge_filter(period=1000).observe(images, logits)

    assert [event["index"] for event in sent] == [3, 11]
    assert all(event["reasons"] == ["low-confidence"] for event in sent)
    assert all(event["confidence"] == pytest.approx(0.1) for event in sent)
    assert set(sent[0]) == {
        "kind",
        "index",
        "reasons",
        "predicted",
        "confidence",
        "input_min",
        "input_max",
        "at",
    }


def test_flags_out_of_range_and_non_finite_values() -> None:
    rng = np.random.default_rng(1)
    images = rng.random((4, 1, 28, 28))
    images[1, 0, 0, 0] = 1.5
    images[2, 0, 3, 3] = np.nan
    logits = confident_logits(rng, 4).astype(np.float64)
    logits[3, 0] = np.inf

    sent = edge_filter().observe(images, logits)

    assert [(event["index"], event["reasons"]) for event in sent] == [
        (1, ["out-of-range"]),
        (2, ["out-of-range"]),
        (3, ["non-finite-output"]),
    ]
    assert sent[0]["input_max"] == 1.5 and sent[1]["input_max"] is None
    json.dumps(sent, allow_nan=False)  # NaN became null


def test_emits_an_aggregate_every_period() -> None:
    rng = np.random.default_rng(2)
    images = rng.random((250, 1, 28, 28), dtype=np.float32)
    probabilities = rng.dirichlet(np.full(10, 0.1), size=250)
    latencies = rng.gamma(2.0, 3.0, size=250)
    watcher = edge_filter(period=100, outputs=OutputKind.PROBABILITIES, confidence_threshold=0.01)

    sent: list[Event] = []
    for start in range(0, 250, 64):
        stop = start + 64
        sent += watcher.observe(
            images[start:stop], probabilities[start:stop], latencies_ms=latencies[start:stop]
        )
    tail = watcher.finish()

    stats = [event for event in sent if event["kind"] == "inference.stats"]
    assert [event["first_index"] for event in stats] == [0, 100]
    assert [event["count"] for event in stats] == [100, 100]
    first = stats[0]
    assert (
        first["class_histogram"]
        == np.bincount(probabilities[:100].argmax(axis=1), minlength=10).tolist()
    )
    assert first["confidence_min"] == pytest.approx(probabilities[:100].max(axis=1).min())
    assert first["confidence_mean"] == pytest.approx(probabilities[:100].max(axis=1).mean())
    assert first["latency_p95_ms"] == pytest.approx(np.percentile(latencies[:100], 95))
    assert first["at"] == "2026-01-31T12:00:00+00:00"
    assert [(event["first_index"], event["count"]) for event in tail] == [(200, 50)]
    assert watcher.finish() == []


def test_forwards_drift_reports_that_drifted_only() -> None:
    rng = np.random.default_rng(3)
    report = DriftReport(
        drifted=True,
        method=DriftMethod.KS,
        ks_max=0.4,
        min_p_value=1e-9,
        features_flagged=(2, 5),
        psi_max=0.3,
        psi_mean=0.1,
        psi_level=PsiLevel.MAJOR,
        window_size=500,
        at=FIXED_TIME,
    )
    quiet = DriftReport(**{**{s: getattr(report, s) for s in report.__slots__}, "drifted": False})
    watcher = edge_filter()
    images, logits = rng.random((2, 1, 28, 28)), confident_logits(rng, 2)

    loud_events = watcher.observe(images, logits, drift=report)
    quiet_events = watcher.observe(images, logits, drift=quiet)

    assert loud_events == [report.to_event()]
    assert quiet_events == []


def test_egress_on_a_stream_of_images_is_far_below_raw_streaming() -> None:
    rng = np.random.default_rng(4)
    images = rng.random((5000, 1, 28, 28), dtype=np.float32)
    logits = confident_logits(rng, 5000)
    unsure = rng.choice(5000, size=100, replace=False)  # a 2% anomaly rate
    logits[unsure] = rng.normal(0, 0.1, (100, 10))

    measured = measure_egress(images, logits, EdgeFilterConfig(period=1000))

    assert measured["raw_bytes"] == images.nbytes + logits.nbytes == 5000 * (3136 + 40)
    assert measured["anomalies_forwarded"] == 100
    assert measured["events"] == 100 + 5  # one aggregate per 1000 inputs
    # Measured: 20.0 kB of JSON against 15.9 MB of raw streaming, ratio 0.00126 (~790x
    # less); with no anomalies at all, 20 000 inputs cost 5.3 kB (ratio 8.3e-5).
    assert measured["ratio"] < 0.005
    assert measured["savings"] == pytest.approx(1 - measured["ratio"])


def test_egress_bytes_count_exactly_the_json_emitted() -> None:
    rng = np.random.default_rng(5)
    watcher = edge_filter(period=10)
    logits = confident_logits(rng, 25)
    logits[7] = 0.0

    sent = watcher.observe(rng.random((25, 1, 28, 28)), logits) + watcher.finish()
    encoded = [json.dumps(event, sort_keys=True, separators=(",", ":")).encode() for event in sent]

    assert watcher.egress_bytes == sum(map(len, encoded))
    assert watcher.raw_bytes == 25 * (784 * 8 + 40)
    assert watcher.savings() == pytest.approx(1 - watcher.egress_bytes / watcher.raw_bytes)
    assert EdgeFilter().savings() == 0.0


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"confidence_threshold": 0.0}, r"confidence_threshold must be in \(0, 1\]"),
        ({"confidence_threshold": 1.5}, r"confidence_threshold must be in \(0, 1\]"),
        ({"input_range": (1.0, 0.0)}, "input_range must be finite"),
        ({"input_range": (0.0, float("inf"))}, "input_range must be finite"),
        ({"period": 0}, "period must be an int >= 1"),
        ({"outputs": "logits"}, "outputs must be an OutputKind"),
    ],
)
def test_filter_config_rejects_bad_values(arguments: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EdgeFilterConfig(**arguments)


def test_observe_rejects_mismatched_batches() -> None:
    watcher = edge_filter()
    images = np.zeros((4, 1, 28, 28))
    watcher.observe(images, np.zeros((4, 10)))

    with pytest.raises(ConfigError, match="with N > 0"):
        watcher.observe(images[:0], np.zeros((0, 10)))
    with pytest.raises(ConfigError, match="with N > 0"):
        watcher.observe(images, np.zeros((3, 10)))
    with pytest.raises(ConfigError, match="with N > 0"):
        watcher.observe(images, np.zeros(4))
    with pytest.raises(ConfigError, match="expected 10 classes, got 3"):
        watcher.observe(images, np.zeros((4, 3)))
    with pytest.raises(ConfigError, match=r"latencies_ms must have shape \(4,\)"):
        watcher.observe(images, np.zeros((4, 10)), latencies_ms=np.zeros(3))
    with pytest.raises(ConfigError, match="config must be an EdgeFilterConfig"):
        EdgeFilter({"period": 10})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="batch_size must be an int >= 1"):
        measure_egress(images, np.zeros((4, 10)), batch_size=0)


def test_filter_needs_a_timezone_aware_clock() -> None:
    naive = EdgeFilter(EdgeFilterConfig(period=1), clock=lambda: datetime(2026, 1, 31, 12, 0))

    with pytest.raises(ConfigError, match="clock must return timezone-aware datetimes"):
        naive.observe(np.zeros((1, 1, 28, 28)), np.zeros((1, 10)))

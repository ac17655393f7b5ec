"""The in-process predictor: latency histogram, input checks, atomic swap, micro-batching."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edge_runtime.batching import MicroBatcher
from edge_runtime.latency import LatencyHistogram
from edge_runtime.predictor import Predictor
from edge_runtime.providers import ExecutionProvider
from fedge.errors import ConfigError, DataError, FedgeError
from tests.unit.edge_runtime.test_providers import SAMPLE_SHAPE, mlp_weights, write_mlp

CPU = ExecutionProvider.CPU


def reference_logits(inputs: np.ndarray, seed: int = 0) -> np.ndarray:
    weight, bias = mlp_weights(seed)
    return np.asarray(inputs.reshape(len(inputs), -1).astype(np.float64) @ weight + bias)


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    return write_mlp(tmp_path / "mlp.onnx", seed=0)


@pytest.fixture
def predictor(model_path: Path) -> Predictor:
    return Predictor(model_path, preference=(CPU,), intra_op_threads=1)


@pytest.fixture
def inputs() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((16, *SAMPLE_SHAPE)).astype(np.float32)


# --- latency histogram --------------------------------------------------------------


def test_histogram_quantiles_are_within_one_bucket_of_numpy() -> None:
    histogram = LatencyHistogram()
    samples = np.random.default_rng(3).lognormal(mean=np.log(2e-3), sigma=1.0, size=20_000)
    for value in samples:
        histogram.record(float(value))
    for q in (0.01, 0.5, 0.9, 0.95, 0.99):
        estimate, exact = histogram.quantile(q), float(np.quantile(samples, q))
        assert estimate is not None
        assert exact / histogram.relative_width <= estimate <= exact * histogram.relative_width


def test_histogram_snapshot_reports_exact_count_mean_and_max() -> None:
    histogram = LatencyHistogram()
    for value in (0.001, 0.002, 0.003, 0.010):
        histogram.record(value)
    snapshot = histogram.snapshot()
    assert snapshot["count"] == 4
    assert snapshot["mean_ms"] == pytest.approx(4.0)
    assert snapshot["max_ms"] == pytest.approx(10.0)
    p50 = snapshot["p50_ms"]
    assert p50 is not None and 2.0 / 1.13 <= p50 <= 3.0 * 1.13
    assert set(snapshot) == {"count", "p50_ms", "p95_ms", "p99_ms", "mean_ms", "max_ms"}


def test_empty_histogram_has_no_quantiles() -> None:
    histogram = LatencyHistogram()
    assert histogram.quantile(0.5) is None
    assert histogram.snapshot() == {
        "count": 0,
        "p50_ms": None,
        "p95_ms": None,
        "p99_ms": None,
        "mean_ms": None,
        "max_ms": None,
    }


def test_values_outside_the_buckets_are_clamped_to_the_exact_extremes() -> None:
    histogram = LatencyHistogram(lowest_s=1e-5, highest_s=10.0)
    for value in (0.0, 1e-7, 0.5, 100.0):
        histogram.record(value)
    assert histogram.quantile(0.0) == 0.0
    assert histogram.quantile(1.0) == 100.0


def test_histogram_counts_every_record_from_many_threads() -> None:
    histogram = LatencyHistogram()

    def record_many() -> None:
        for _ in range(5_000):
            histogram.record(1e-3)

    threads = [threading.Thread(target=record_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert histogram.count == 20_000
    assert histogram.snapshot()["count"] == 20_000


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lowest_s": 1.0, "highest_s": 1.0}, "need 0 < lowest_s < highest_s"),
        ({"lowest_s": 0.0}, "need 0 < lowest_s < highest_s"),
        ({"highest_s": float("inf")}, "need 0 < lowest_s < highest_s"),
        ({"buckets_per_decade": 0}, "buckets_per_decade must be at least 1"),
    ],
)
def test_histogram_checks_its_configuration(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LatencyHistogram(**kwargs)


@pytest.mark.parametrize("value", [-1e-3, float("nan"), float("inf")])
def test_histogram_rejects_impossible_latencies(value: float) -> None:
    with pytest.raises(ConfigError, match="a latency must be finite and non-negative"):
        LatencyHistogram().record(value)


@pytest.mark.parametrize("q", [-0.1, 1.5])
def test_histogram_rejects_quantiles_outside_0_1(q: float) -> None:
    with pytest.raises(ConfigError, match=r"q must be in \[0, 1\]"):
        LatencyHistogram().quantile(q)


# --- predictor ----------------------------------------------------------------------


def test_predictions_equal_a_direct_session_and_the_maths(
    predictor: Predictor, model_path: Path, inputs: np.ndarray
) -> None:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    direct = session.run(None, {"images": inputs})[0]
    logits = predictor.predict(inputs)
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, direct, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(logits, reference_logits(inputs), rtol=1e-4, atol=1e-4)


def test_predictor_reports_provider_label_shape_and_latency(predictor: Predictor) -> None:
    assert predictor.provider is CPU
    assert predictor.fallback_reason is None
    assert predictor.model_id == "mlp.onnx"
    assert predictor.sample_shape == SAMPLE_SHAPE
    predictor.predict(np.zeros((2, *SAMPLE_SHAPE)))
    predictor.predict(np.zeros((1, *SAMPLE_SHAPE), dtype=np.int64).tolist())
    assert predictor.latency.count == 2


def test_model_id_is_settable_and_checked(predictor: Predictor) -> None:
    predictor.model_id = "fashion-cnn@v7"
    assert predictor.model_id == "fashion-cnn@v7"
    with pytest.raises(ConfigError, match="model_id must be 1-128 characters"):
        predictor.model_id = "bad label\n"
    with pytest.raises(ConfigError, match="model_id must be 1-128 characters"):
        predictor.model_id = ""
    assert predictor.model_id == "fashion-cnn@v7"


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (np.zeros(SAMPLE_SHAPE, dtype=np.float32), r"must have shape \(N, 3, 4\) with N >= 1"),
        (np.zeros((2, 3, 5), dtype=np.float32), r"got \(2, 3, 5\)"),
        (np.zeros((0, *SAMPLE_SHAPE), dtype=np.float32), r"got \(0, 3, 4\)"),
        (np.full((1, *SAMPLE_SHAPE), np.nan, dtype=np.float32), "must be finite"),
        (np.full((1, *SAMPLE_SHAPE), -np.inf), "must be finite"),
        (np.full((1, *SAMPLE_SHAPE), 1e300), "must be finite"),
        (np.full((1, *SAMPLE_SHAPE), "1.0"), "convertible to float32, got dtype <U3"),
        (np.ones((1, *SAMPLE_SHAPE), dtype=bool), "convertible to float32, got dtype bool"),
        ([[[1.0, 2.0], [3.0]]], "not a rectangular numeric array"),
        ([[{"a": 1}]], "convertible to float32, got dtype object"),
    ],
)
def test_predict_rejects_inputs_that_do_not_fit(
    predictor: Predictor, batch: object, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        predictor.predict(batch)
    assert predictor.latency.count == 0


def write_variant(path: Path, kind: str) -> Path:
    if kind == "fixed-batch":
        return write_mlp(path, batch_dim=1)
    if kind == "int-input":
        return write_mlp(path, elem_type=TensorProto.INT64)
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["logits"])],
        "two_inputs",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", 4]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("fixed-batch", "batch\\) dimension must be dynamic"),
        ("int-input", "the input must be float32, got tensor\\(int64\\)"),
        ("two-inputs", "expected one model input, found 2"),
    ],
)
def test_predictor_refuses_models_it_cannot_serve(tmp_path: Path, kind: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Predictor(write_variant(tmp_path / f"{kind}.onnx", kind), preference=(CPU,))


def test_swap_serves_the_new_model(
    predictor: Predictor, tmp_path: Path, inputs: np.ndarray
) -> None:
    predictor.swap(write_mlp(tmp_path / "v2.onnx", seed=1), model_id="mlp@v2")
    assert predictor.model_id == "mlp@v2"
    np.testing.assert_allclose(
        predictor.predict(inputs), reference_logits(inputs, seed=1), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize(
    ("content", "error", "message"),
    [
        (None, DataError, "does not exist"),
        (b"\x00garbage", DataError, "ONNX Runtime cannot load"),
        ("other-shape", ConfigError, r"takes \(N, 2, 4\), the current one \(N, 3, 4\)"),
    ],
)
def test_failed_swap_keeps_the_old_model_serving(
    predictor: Predictor,
    tmp_path: Path,
    inputs: np.ndarray,
    content: bytes | str | None,
    error: type[Exception],
    message: str,
) -> None:
    before = predictor.predict(inputs)
    new_path = tmp_path / "new.onnx"
    if isinstance(content, bytes):
        new_path.write_bytes(content)
    elif content == "other-shape":
        write_mlp(new_path, seed=1, sample_shape=(2, 4))
    with pytest.raises(error, match=message):
        predictor.swap(new_path, model_id="mlp@v2")
    assert predictor.model_id == "mlp.onnx"
    np.testing.assert_array_equal(predictor.predict(inputs), before)


def test_swap_may_change_the_shape_when_allowed(predictor: Predictor, tmp_path: Path) -> None:
    predictor.swap(write_mlp(tmp_path / "wide.onnx", sample_shape=(2, 4)), allow_shape_change=True)
    assert predictor.sample_shape == (2, 4)
    assert predictor.predict(np.ones((3, 2, 4))).shape == (3, 5)


def test_every_call_during_swaps_sees_one_whole_model(
    predictor: Predictor, tmp_path: Path, inputs: np.ndarray
) -> None:
    paths = [tmp_path / "a.onnx", write_mlp(tmp_path / "b.onnx", seed=1)]
    write_mlp(paths[0], seed=0)
    expected = [reference_logits(inputs, seed=0), reference_logits(inputs, seed=1)]
    stop, mismatches = threading.Event(), []

    def serve() -> None:
        while not stop.is_set():
            logits = predictor.predict(inputs)
            if not any(np.allclose(logits, e, rtol=1e-4, atol=1e-4) for e in expected):
                mismatches.append(logits)

    readers = [threading.Thread(target=serve) for _ in range(2)]
    for reader in readers:
        reader.start()
    for index in range(6):
        predictor.swap(paths[index % 2])
    stop.set()
    for reader in readers:
        reader.join()
    assert mismatches == []
    assert predictor.latency.count > 0


# --- micro-batching -----------------------------------------------------------------


def test_concurrent_submits_get_their_own_rows_in_shared_batches(
    predictor: Predictor, inputs: np.ndarray
) -> None:
    rows_per_thread, num_threads = 40, 4
    samples = np.random.default_rng(11).standard_normal(
        (num_threads, rows_per_thread, *SAMPLE_SHAPE)
    )
    samples = samples.astype(np.float32)
    results: dict[int, list[Future[np.ndarray]]] = {}
    start = threading.Barrier(num_threads)

    with MicroBatcher(predictor, max_batch=8, max_delay_ms=5.0) as batcher:

        def client(index: int) -> None:
            start.wait()
            results[index] = [batcher.submit(sample) for sample in samples[index]]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(num_threads)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for index in range(num_threads):
            got = np.stack([future.result(timeout=10) for future in results[index]])
            np.testing.assert_allclose(got, predictor.predict(samples[index]), rtol=1e-5, atol=1e-5)
        stats = batcher.stats()
    assert stats["requests"] == num_threads * rows_per_thread
    assert isinstance(stats["largest_batch"], int) and 1 < stats["largest_batch"] <= 8
    assert isinstance(stats["batches"], int) and stats["batches"] < num_threads * rows_per_thread


def test_queued_requests_are_split_into_batches_of_at_most_max_batch(
    predictor: Predictor, inputs: np.ndarray
) -> None:
    with MicroBatcher(predictor, max_batch=4, max_delay_ms=200.0) as batcher:
        futures = [batcher.submit(sample) for sample in inputs[:10]]
        got = np.stack([future.result(timeout=10) for future in futures])
    np.testing.assert_allclose(got, reference_logits(inputs[:10]), rtol=1e-4, atol=1e-4)
    assert batcher.stats()["sizes"] == {"2": 1, "4": 2}


def test_a_bad_sample_is_refused_at_submit_without_failing_others(predictor: Predictor) -> None:
    with MicroBatcher(predictor, max_delay_ms=50.0) as batcher:
        good = batcher.submit(np.zeros(SAMPLE_SHAPE))
        with pytest.raises(ConfigError, match=r"got \(1, 4, 3\)"):
            batcher.submit(np.zeros((4, 3)))
        with pytest.raises(ConfigError, match="must be finite"):
            batcher.submit(np.full(SAMPLE_SHAPE, np.nan))
        assert good.result(timeout=10).shape == (5,)


def test_a_failing_batch_fails_its_futures_and_the_worker_goes_on(
    predictor: Predictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    failure = FedgeError("inference failed on model mlp.onnx: device lost")
    real_predict = predictor.predict

    def failing(batch: object) -> np.ndarray:
        raise failure

    with MicroBatcher(predictor, max_delay_ms=50.0) as batcher:
        monkeypatch.setattr(predictor, "predict", failing)
        futures = [batcher.submit(np.zeros(SAMPLE_SHAPE)) for _ in range(3)]
        assert all(future.exception(timeout=10) is failure for future in futures)
        monkeypatch.setattr(predictor, "predict", real_predict)
        assert batcher.submit(np.zeros(SAMPLE_SHAPE)).result(timeout=10).shape == (5,)
        assert batcher.stats()["failed_batches"] == 1


def test_close_drains_queued_requests_then_refuses_new_ones(
    predictor: Predictor, inputs: np.ndarray
) -> None:
    batcher = MicroBatcher(predictor, max_batch=2, max_delay_ms=0.0)
    futures = [batcher.submit(sample) for sample in inputs]
    batcher.close()
    batcher.close()  # idempotent
    assert all(future.done() and future.exception() is None for future in futures)
    with pytest.raises(FedgeError, match="the micro-batcher is closed"):
        batcher.submit(inputs[0])


def test_a_full_queue_is_refused(predictor: Predictor, monkeypatch: pytest.MonkeyPatch) -> None:
    entered, release = threading.Event(), threading.Event()
    real_predict = predictor.predict

    def slow(batch: object) -> np.ndarray:
        entered.set()
        release.wait(10)
        return real_predict(batch)

    monkeypatch.setattr(predictor, "predict", slow)
    with MicroBatcher(predictor, max_batch=1, max_delay_ms=0.0, max_queue=1) as batcher:
        first = batcher.submit(np.zeros(SAMPLE_SHAPE))
        assert entered.wait(10)
        second = batcher.submit(np.zeros(SAMPLE_SHAPE))
        with pytest.raises(FedgeError, match="queue is full"):
            batcher.submit(np.zeros(SAMPLE_SHAPE))
        release.set()
        assert first.result(timeout=10).shape == second.result(timeout=10).shape == (5,)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch": 0}, "max_batch must be at least 1"),
        ({"max_delay_ms": -1.0}, r"max_delay_ms must be in \[0, 1000\]"),
        ({"max_delay_ms": float("nan")}, r"max_delay_ms must be in \[0, 1000\]"),
        ({"max_delay_ms": 5000.0}, r"max_delay_ms must be in \[0, 1000\]"),
        ({"max_batch": 8, "max_queue": 4}, r"max_queue must be at least max_batch \(8\)"),
    ],
)
def test_micro_batcher_checks_its_configuration(
    predictor: Predictor, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        MicroBatcher(predictor, **kwargs)

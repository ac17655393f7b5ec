"""The local inference server: endpoints, every refusal, and the TLS rule for non-loopback."""

from __future__ import annotations

import http.client
import json
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_runtime.predictor import Predictor
from edge_runtime.providers import ExecutionProvider
from edge_runtime.server import InferenceServer, tls_context
from fedge.errors import ConfigError, FedgeError
from tests.helpers import self_signed_certificate
from tests.unit.edge_runtime.test_providers import SAMPLE_SHAPE, write_mlp

MAX_BODY = 4096
MAX_INSTANCES = 4


@pytest.fixture
def predictor(tmp_path: Path) -> Predictor:
    return Predictor(
        write_mlp(tmp_path / "mlp.onnx"),
        model_id="mlp@v1",
        preference=(ExecutionProvider.CPU,),
        intra_op_threads=1,
    )


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def server(predictor: Predictor, clock: Clock) -> Iterator[InferenceServer]:
    with InferenceServer(
        predictor,
        max_body_bytes=MAX_BODY,
        max_instances=MAX_INSTANCES,
        max_delay_ms=20.0,
        clock=clock,
    ) as running:
        yield running


def call(
    server: InferenceServer,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any], http.client.HTTPResponse]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        raw = response.read()
    finally:
        connection.close()
    assert b"\n" not in raw  # one line
    return response.status, json.loads(raw), response


def post(server: InferenceServer, document: object) -> tuple[int, dict[str, Any]]:
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    status, answer, _ = call(server, "POST", "/v1/predict", body)
    return status, answer


def raw_exchange(server: InferenceServer, request: bytes, *, half_close: bool = False) -> bytes:
    """Send raw bytes and read until the server closes; a reset reads as what came before."""
    chunks = []
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as connection:
        connection.sendall(request)
        if half_close:
            connection.shutdown(socket.SHUT_WR)
        try:
            while chunk := connection.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    return b"".join(chunks)


def instances(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, *SAMPLE_SHAPE)).astype(np.float32)


# --- endpoints ----------------------------------------------------------------------


def test_predict_answers_outputs_classes_model_and_provider(
    server: InferenceServer, predictor: Predictor
) -> None:
    batch = instances(3)
    status, answer = post(server, {"instances": batch.tolist()})
    assert status == 200
    expected = predictor.predict(batch)
    np.testing.assert_allclose(answer["outputs"], expected, rtol=1e-5, atol=1e-5)
    assert answer["classes"] == expected.argmax(axis=1).tolist()
    assert answer["model"] == "mlp@v1"
    assert answer["provider"] == "CPUExecutionProvider"


def test_predict_follows_a_swap_of_the_predictor(
    server: InferenceServer, predictor: Predictor, tmp_path: Path
) -> None:
    batch = instances(2).tolist()
    _, before = post(server, {"instances": batch})
    predictor.swap(write_mlp(tmp_path / "v2.onnx", seed=1), model_id="mlp@v2")
    status, after = post(server, {"instances": batch})
    assert status == 200
    assert after["model"] == "mlp@v2"
    assert not np.allclose(after["outputs"], before["outputs"])


def test_health_reports_model_provider_and_uptime(server: InferenceServer, clock: Clock) -> None:
    clock.now += 12.5
    status, answer, _ = call(server, "GET", "/v1/health")
    assert status == 200
    assert answer == {
        "status": "ok",
        "model": "mlp@v1",
        "provider": "CPUExecutionProvider",
        "provider_fallback": None,
        "uptime_s": 12.5,
    }


def test_metrics_count_requests_errors_latency_and_batches(server: InferenceServer) -> None:
    assert post(server, {"instances": instances(3).tolist()})[0] == 200
    assert post(server, {"instances": instances(1).tolist()})[0] == 200
    assert post(server, b"{not json")[0] == 400
    status, metrics, _ = call(server, "GET", "/v1/metrics")
    assert status == 200
    assert metrics["requests"] == {
        "total": 3,
        "errors": 1,
        "instances": 4,
        "by_status": {"200": 2, "400": 1},
    }
    assert metrics["batching"]["requests"] == 4
    assert metrics["model_latency"]["count"] == metrics["batching"]["batches"] >= 2
    assert metrics["request_latency"]["count"] == 3
    assert metrics["request_latency"]["p50_ms"] > 0


def test_concurrent_clients_each_get_their_own_outputs(
    server: InferenceServer, predictor: Predictor
) -> None:
    batch = instances(8, seed=5)
    answers: dict[int, dict[str, Any]] = {}
    start = threading.Barrier(len(batch))

    def client(index: int) -> None:
        start.wait()
        answers[index] = post(server, {"instances": [batch[index].tolist()]})[1]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(batch))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    got = np.array([answers[i]["outputs"][0] for i in range(len(batch))])
    np.testing.assert_allclose(got, predictor.predict(batch), rtol=1e-5, atol=1e-5)


# --- refusals -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "the body is not JSON"),
        (b"\xff\xfe", "the body is not JSON"),
        (b'{"instances": [[[NaN, 1, 2, 3]]]}', "NaN is not allowed"),
        (b'{"rows": []}', 'expected {"instances": \\[...\\]}'),
        (b'{"instances": 3}', 'expected {"instances": \\[...\\]}'),
        (b"[1, 2]", 'expected {"instances": \\[...\\]}'),
        (b'{"instances": []}', "send 1 to 4 instances, got 0"),
        (json.dumps({"instances": instances(5).tolist()}).encode(), "send 1 to 4 instances, got 5"),
        (b'{"instances": [[1, 2, 3]]}', r"must have shape \(N, 3, 4\)"),
        (json.dumps({"instances": [np.full((3, 4), 1e999).tolist()]}).encode(), "Infinity is not"),
        (b'{"instances": [[[1e999, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]]}', "must be finite"),
        (json.dumps({"instances": [[["a"] * 4] * 3]}).encode(), "convertible to float32"),
        (b'{"instances": [[[1, 2], [3]]]}', "not a rectangular numeric array"),
    ],
)
def test_malformed_requests_get_400_with_a_one_line_error(
    server: InferenceServer, body: bytes, message: str
) -> None:
    status, answer = post(server, body)
    assert status == 400
    assert set(answer) == {"error"}
    assert re.search(message, answer["error"])
    assert call(server, "GET", "/v1/health")[0] == 200  # still serving


def test_unknown_path_is_404(server: InferenceServer) -> None:
    status, answer, _ = call(server, "GET", "/v1/predict/../admin")
    assert (status, answer) == (404, {"error": "no endpoint '/v1/predict/../admin'"})
    assert call(server, "POST", "/", b"{}")[0] == 404


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/v1/predict", "POST"),
        ("POST", "/v1/health", "GET"),
        ("DELETE", "/v1/metrics", "GET"),
        ("PUT", "/v1/predict", "POST"),
    ],
)
def test_wrong_method_is_405_with_allow(
    server: InferenceServer, method: str, path: str, allowed: str
) -> None:
    status, answer, response = call(server, method, path, b"{}" if method != "GET" else None)
    assert status == 405
    assert response.getheader("Allow") == allowed
    assert answer == {"error": f"{path} accepts {allowed} only"}


def test_a_body_over_the_limit_is_413_and_never_read(server: InferenceServer) -> None:
    status, answer = post(server, b"x" * (MAX_BODY + 1))
    assert (status, answer) == (413, {"error": f"the body exceeds {MAX_BODY} bytes"})
    reply = raw_exchange(
        server,
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n",
    )
    assert reply.startswith(b"HTTP/1.1 413 ")


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (b"", b"411"),
        (b"Transfer-Encoding: chunked\r\n", b"411"),
        (b"Content-Length: -5\r\n", b"400"),
        (b"Content-Length: ten\r\n", b"400"),
        (b"Content-Length: \xb2\r\n", b"400"),
        (b"Content-Length: 2\r\nContent-Length: 5\r\n", b"400"),
    ],
)
def test_bodies_without_a_usable_length_are_refused(
    server: InferenceServer, headers: bytes, status: bytes
) -> None:
    reply = raw_exchange(
        server, b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n0\r\n\r\n"
    )
    assert reply.startswith(b"HTTP/1.1 " + status + b" ")
    assert b'{"error":' in reply


def test_a_short_body_is_400(server: InferenceServer) -> None:
    reply = raw_exchange(
        server,
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{}",
        half_close=True,
    )
    assert reply.startswith(b"HTTP/1.1 400 ")
    assert b"shorter than its length" in reply


def test_a_stalled_body_is_408(predictor: Predictor) -> None:
    with InferenceServer(predictor, socket_timeout_s=0.3) as server:
        reply = raw_exchange(
            server, b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"
        )
        assert reply.startswith(b"HTTP/1.1 408 ")
        assert call(server, "GET", "/v1/health")[0] == 200


def test_a_slow_model_is_503_not_a_hang(
    predictor: Predictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    real_predict = predictor.predict

    def slow(batch: object) -> np.ndarray:
        release.wait(10)
        return real_predict(batch)

    monkeypatch.setattr(predictor, "predict", slow)
    with InferenceServer(predictor, request_timeout_s=0.2) as server:
        status, answer = post(server, {"instances": instances(1).tolist()})
        release.set()
    assert (status, answer) == (503, {"error": "the model did not answer in time"})


def test_an_unexpected_failure_is_500_and_the_server_lives_on(
    predictor: Predictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(batch: object) -> np.ndarray:
        raise FedgeError("inference failed on model mlp@v1: CUDA error 700")

    monkeypatch.setattr(predictor, "predict", broken)
    with InferenceServer(predictor) as server:
        status, answer = post(server, {"instances": instances(1).tolist()})
        assert (status, answer) == (500, {"error": "internal error"})
        assert call(server, "GET", "/v1/health")[0] == 200


# --- binding and TLS ----------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "edge-device.example", ""])
def test_non_loopback_without_tls_is_refused(predictor: Predictor, host: str) -> None:
    with pytest.raises(ConfigError, match="only loopback addresses may be bound without TLS"):
        InferenceServer(predictor, host=host)


def test_localhost_by_name_is_loopback(predictor: Predictor) -> None:
    server = InferenceServer(predictor, host="localhost")
    try:
        assert server.url == f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()


def test_a_port_in_use_is_a_config_error(predictor: Predictor, server: InferenceServer) -> None:
    with pytest.raises(ConfigError, match=f"cannot listen on '127.0.0.1' port {server.port}"):
        InferenceServer(predictor, port=server.port)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_body_bytes": 0}, "max_body_bytes must be positive, got 0"),
        ({"max_instances": -1}, "max_instances must be positive, got -1"),
        ({"request_timeout_s": 0.0}, "request_timeout_s must be positive"),
        ({"socket_timeout_s": float("nan")}, "socket_timeout_s must be positive"),
    ],
)
def test_limits_must_be_positive(
    predictor: Predictor, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        InferenceServer(predictor, **kwargs)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed_certificate(tmp_path_factory.mktemp("tls"), host="127.0.0.1")


def test_tls_server_answers_https_and_refuses_plain_http(
    predictor: Predictor, certificate: tuple[Path, Path]
) -> None:
    cert_path, key_path = certificate
    client = ssl.create_default_context(cafile=str(cert_path))
    with InferenceServer(predictor, tls=tls_context(cert_path, key_path)) as server:
        assert server.url.startswith("https://127.0.0.1:")
        plain = raw_exchange(server, b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert not plain.startswith(b"HTTP/")
        connection = http.client.HTTPSConnection(
            "127.0.0.1", server.port, context=client, timeout=10
        )
        try:
            connection.request("GET", "/v1/health")
            response = connection.getresponse()
            assert response.status == 200
            assert json.loads(response.read())["model"] == "mlp@v1"
            assert connection.sock is not None
            assert connection.sock.version() in {"TLSv1.2", "TLSv1.3"}
        finally:
            connection.close()


def test_non_loopback_with_tls_is_allowed(
    predictor: Predictor, certificate: tuple[Path, Path]
) -> None:
    server = InferenceServer(predictor, host="0.0.0.0", tls=tls_context(*certificate))
    server.stop()  # bound but never started: nothing was served


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_below_1_2_is_refused(predictor: Predictor, certificate: tuple[Path, Path]) -> None:
    context = tls_context(*certificate)
    context.minimum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(
        ConfigError, match=r"tls must require TLS 1\.2 or later, its minimum is TLSv1_1"
    ):
        InferenceServer(predictor, tls=context)


def test_tls_context_with_unreadable_files_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match="cannot load the TLS certificate or key"):
        tls_context(tmp_path / "cert.pem", tmp_path / "missing.pem")


def test_stop_is_prompt(predictor: Predictor) -> None:
    server = InferenceServer(predictor)
    server.start()
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 5

"""The store server's unsigned health probe, its access log and its download audit events."""

from __future__ import annotations

import http.client
import json
import logging
import re
import socket
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from fedge.errors import StorageError
from fl_server.audit import AuditEventKind
from tests.unit.fl_server._serving import Served

DATA = bytes(range(256)) * 64
# time, client, device, method, path, status, bytes, milliseconds
LINE = re.compile(r"^(\S+) (\S+) (\S+) ([A-Z]+|-) (\S+) (\d{3}) (\d+) (\d+\.\d)$")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    created = Served(tmp_path, DATA, access_log=tmp_path / "logs" / "access.log")
    with created.server:
        yield created
    created.close()


def _log_lines(served: Served) -> list[str]:
    return (served.tmp_path / "logs" / "access.log").read_text().splitlines()


def _downloads(served: Served) -> list[dict[str, object]]:
    return [
        dict(event.payload)
        for event in served.audit.iter()
        if event.kind is AuditEventKind.MODEL_DOWNLOADED
    ]


def test_the_health_probe_needs_no_signature(served: Served) -> None:
    status, headers, body = served.request("/v1/health", signed=False)
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    assert served.request("/v1/health?from=lb", signed=False)[0] == 200

    # HEAD: the same headers and no body, so the next request on the connection parses.
    connection = http.client.HTTPSConnection(
        "localhost", served.server.port, context=served.client_tls, timeout=10
    )
    connection.request("HEAD", "/v1/health")
    head = connection.getresponse()
    assert head.status == 200 and head.read() == b""
    assert head.getheader("Content-Length") == headers["Content-Length"]
    connection.request("GET", "/v1/health")
    assert connection.getresponse().read() == body
    connection.close()


def test_everything_else_still_needs_a_signature(served: Served) -> None:
    for target in ("/v1/models/cnn/manifest", f"/v1/objects/{served.digest}", "/v1/healthz"):
        assert served.request(target, signed=False)[0] == 401
        assert served.request(target, method="HEAD", signed=False)[0] == 401
    status, headers, _ = served.request(f"/v1/objects/{served.digest}", method="HEAD")
    assert status == 405 and headers["Allow"] == "GET"


def test_each_request_writes_one_well_formed_line_without_secrets(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    target = f"/v1/objects/{served.digest}?note=query-secret"
    authorization = served.authorization("GET", target)
    with caplog.at_level(logging.INFO, logger="fedge.store.access"):
        connection = http.client.HTTPSConnection(
            "localhost", served.server.port, context=served.client_tls, timeout=10
        )
        connection.request("GET", target, headers={"Authorization": authorization})
        response = connection.getresponse()
        body = response.read()
        connection.close()
        served.request("/v1/health", signed=False)

    assert response.status == 200 and body == DATA
    lines = _log_lines(served)
    assert [r.getMessage() for r in caplog.records if r.name == "fedge.store.access"] == lines
    assert len(lines) == 2
    fields = LINE.match(lines[0])
    assert fields is not None, lines[0]
    moment, client, device, method, path, status, sent, elapsed = fields.groups()
    assert datetime.fromisoformat(moment).utcoffset() is not None
    assert (client, device, method, path) == (
        "127.0.0.1",
        "device-1",
        "GET",
        f"/v1/objects/{served.digest}",
    )
    assert (int(status), int(sent)) == (200, len(DATA)) and float(elapsed) >= 0
    assert LINE.match(lines[1]) is not None and " - GET /v1/health 200 " in lines[1]
    text = "\n".join(lines)
    signature = authorization.rsplit("sig=", 1)[1]
    for secret in ("query-secret", "Fedge-Device", "sig=", signature, "Authorization"):
        assert secret not in text


def test_a_crafted_path_cannot_forge_a_line(served: Served) -> None:
    raw = socket.create_connection(("localhost", served.server.port), timeout=10)
    with served.client_tls.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"GET /v1/\x1b[31m\xff\r HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        while tls.recv(65536):  # the server closes once the response and its line are out
            pass

    (line,) = _log_lines(served)
    assert LINE.match(line) is not None, line
    assert " - GET /v1/%1B[31m%FF 401 " in line


def test_concurrent_requests_append_whole_lines(served: Served) -> None:
    def probe() -> None:
        for _ in range(5):
            served.request("/v1/health", signed=False)

    threads = [threading.Thread(target=probe) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    lines = _log_lines(served)
    assert len(lines) == 40
    assert all(LINE.match(line) for line in lines)


def test_completed_downloads_are_audited_once_each(tmp_path: Path) -> None:
    served = Served(tmp_path, DATA)
    target = f"/v1/objects/{served.digest}"
    with served.server:
        assert served.request(target)[0] == 200
        assert served.request(target, headers={"Range": "bytes=0-99"})[0] == 206  # not the end
        assert served.request(target, headers={"Range": "bytes=100-"})[0] == 206  # resumed
        assert served.request(target, headers={"Range": "bytes=-1"})[0] == 206
        assert served.request(target, headers={"If-None-Match": f'"{served.digest}"'})[0] == 304
        assert served.request(target, headers={"Range": "bytes=999999-"})[0] == 416
        assert served.request("/v1/models/cnn/manifest")[0] == 200
    downloads = _downloads(served)
    served.close()

    assert downloads == [
        {"device": "device-1", "digest": served.digest, "bytes": len(DATA), "range": False},
        {"device": "device-1", "digest": served.digest, "bytes": len(DATA) - 100, "range": True},
        {"device": "device-1", "digest": served.digest, "bytes": 1, "range": True},
    ]


def test_a_failing_audit_never_breaks_a_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    served = Served(tmp_path, DATA)

    def refuse(device: str, digest: str, size: int, *, ranged: bool) -> None:
        raise StorageError("the database is gone")

    monkeypatch.setattr(served.store, "record_download", refuse)
    with caplog.at_level(logging.ERROR, logger="fl_server.store"), served.server:
        status, _, body = served.request(f"/v1/objects/{served.digest}")
    served.close()

    assert (status, body) == (200, DATA)
    assert any("cannot record the download" in r.getMessage() for r in caplog.records)


def test_record_download_without_an_audit_log_does_nothing(tmp_path: Path) -> None:
    from fl_server.store.store import ModelStore

    served = Served(tmp_path, DATA)
    bare = ModelStore(served.engine, served.blobs, served.store._key)
    bare.record_download("device-1", served.digest, 10, ranged=False)
    served.store.record_download("device-1", served.digest, 10, ranged=True)

    assert _downloads(served) == [
        {"device": "device-1", "digest": served.digest, "bytes": 10, "range": True}
    ]
    served.close()

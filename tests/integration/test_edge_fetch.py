"""A device fetching models from a real ``fedge store serve`` over TLS into its model cache."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from edge_runtime.cache import ModelCache, ModelRejected
from edge_runtime.fetch import FetchError, FetchNotFound, FetchUnauthorized, StoreClient
from edge_runtime.manifest import ArtefactEntry, ArtefactFormat, Manifest, Precision
from fedge.errors import ConfigError
from fl_server.db import open_database
from fl_server.store import serve
from fl_server.store.blobs import FileBlobStore
from fl_server.store.keys import StoreKey
from fl_server.store.serve import StoreServer, tls_context
from fl_server.store.store import ModelStore, NewArtefact
from secure_agg.identity import EnrolmentAuthority
from secure_agg.randomness import DeterministicRandom
from tests.helpers import self_signed_certificate

INT8, FP32 = "model-int8-static.onnx", "model-fp32.onnx"


def blob(label: str, size: int = 64 << 10) -> bytes:
    seed = hashlib.sha256(label.encode()).digest()
    return (seed * (size // 32 + 1))[:size]


class Fleet:
    """A store served over TLS, one enrolled device, its cache and its client."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp_path = tmp_path
        self.authority = EnrolmentAuthority.generate(DeterministicRandom(1))
        self.device = self.authority.enrol("device-1", DeterministicRandom(2))
        self.engine = open_database(f"sqlite:///{tmp_path / 'fedge.db'}")
        self.store = ModelStore(
            self.engine, FileBlobStore(tmp_path / "store", durable=False), StoreKey.generate()
        )
        self.cert, key = self_signed_certificate(tmp_path)
        self.server = StoreServer(
            self.store,
            authority_public_key=self.authority.public_key,
            tls=tls_context(self.cert, key),
        )
        self.cache = ModelCache(tmp_path / "device", trusted_key=self.store.public_key)
        self.requests: list[tuple[str, str | None]] = []  # (path, Range) as the server saw them
        original = serve._Handler.do_GET

        def recording(handler: serve._Handler) -> None:
            self.requests.append((handler.path, handler.headers.get("Range")))
            original(handler)

        monkeypatch.setattr(serve._Handler, "do_GET", recording)

    def client(self, **kwargs: Any) -> StoreClient:
        options: dict[str, Any] = {"identity": self.device, "ca_file": self.cert, "timeout_s": 10}
        options["sleep"] = lambda seconds: None
        return StoreClient(f"https://localhost:{self.server.port}", **{**options, **kwargs})

    def publish(self, artefacts: dict[str, bytes], rejected: frozenset[str] = frozenset()) -> int:
        version = self.store.publish(
            "cnn",
            [
                NewArtefact(
                    name=name,
                    data=data,
                    format=ArtefactFormat.ONNX,
                    precision=Precision.INT8 if "int8" in name else Precision.FP32,
                    rejected=name in rejected,
                )
                for name, data in artefacts.items()
            ],
        )
        return version.manifest.version

    def digest(self, version: int, name: str) -> str:
        manifest = self.store.get("cnn", version).manifest
        return next(a.digest for a in manifest.artefacts if a.name == name)

    def object_requests(self) -> list[str | None]:
        return [rng for path, rng in self.requests if path.startswith("/v1/objects/")]


@pytest.fixture
def fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fleet]:
    created = Fleet(tmp_path, monkeypatch)
    with created.server:
        yield created
    created.engine.dispose()


def test_sync_installs_the_preferred_offered_variant(fleet: Fleet) -> None:
    fleet.publish({INT8: blob("1-int8"), FP32: blob("1-fp32")}, rejected=frozenset({INT8}))
    client = fleet.client()

    installed = client.sync(fleet.cache, "cnn").install.current

    assert (installed.version, installed.artefact) == (1, FP32)  # the rejected INT8 is skipped
    assert installed.path.read_bytes() == blob("1-fp32")
    assert fleet.cache.current("cnn") == installed
    assert fleet.object_requests() == [None]

    fleet.publish({INT8: blob("2-int8"), FP32: blob("2-fp32")})
    assert (
        client.sync(fleet.cache, "cnn").install.current.artefact == INT8
    )  # now offered: preferred
    assert (
        client.sync(fleet.cache, "cnn").install.current.version == 2
    )  # installed already: no download
    assert len(fleet.object_requests()) == 2
    assert (
        client.sync(
            fleet.cache, "cnn", ref="1", prefer=[FP32], allow_downgrade=True
        ).install.current.version
        == 1
    )
    assert len(fleet.object_requests()) == 2  # version 1 was still in the cache
    assert list((fleet.tmp_path / "device" / "downloads").iterdir()) == []


def test_a_partial_download_resumes_with_a_range(fleet: Fleet) -> None:
    data = blob("big", 3 << 20)
    fleet.publish({FP32: data})
    digest = fleet.digest(1, FP32)
    partial = fleet.cache.download_path(digest).with_name(digest + ".partial")
    half = len(data) // 2
    partial.write_bytes(data[:half])

    installed = fleet.client().sync(fleet.cache, "cnn").install.current

    assert fleet.object_requests() == [f"bytes={half}-"]  # only the second half was sent
    assert installed.path.read_bytes() == data
    assert not partial.exists()


def test_a_resumed_download_that_does_not_verify_is_fetched_whole(fleet: Fleet) -> None:
    data = blob("big", 1 << 20)
    fleet.publish({FP32: data})
    digest = fleet.digest(1, FP32)
    partial = fleet.cache.download_path(digest).with_name(digest + ".partial")
    partial.write_bytes(b"\0" * 1000)  # not a prefix of the object

    installed = fleet.client().sync(fleet.cache, "cnn").install.current

    assert fleet.object_requests() == ["bytes=1000-", None]
    assert installed.path.read_bytes() == data


def test_a_corrupt_object_on_the_server_keeps_the_previous_model(fleet: Fleet) -> None:
    fleet.publish({FP32: blob("1")})
    client = fleet.client(retries=2)
    client.sync(fleet.cache, "cnn")
    fleet.publish({FP32: blob("2")})
    digest = fleet.digest(2, FP32)
    path = fleet.tmp_path / "store" / "objects" / digest[:2] / digest
    path.chmod(0o644)
    path.write_bytes(b"x" * len(blob("2")))

    with pytest.raises(FetchError, match=r"after 3 attempts: .*500.*failed verification"):
        client.sync(fleet.cache, "cnn")

    current = fleet.cache.current("cnn")
    assert current is not None and current.version == 1
    assert len(fleet.object_requests()) == 1 + 3  # version 1, then three tries of version 2


def test_a_manifest_signed_by_another_key_is_refused_before_any_download(
    fleet: Fleet, tmp_path: Path
) -> None:
    fleet.publish({FP32: blob("1")})
    stranger = StoreKey.generate().public_key_bytes()
    cache = ModelCache(tmp_path / "other-device", trusted_key=stranger)

    with pytest.raises(ModelRejected, match=r"manifest of cnn@latest is refused: .*signed by key"):
        fleet.client().sync(cache, "cnn")

    assert fleet.object_requests() == []
    assert cache.current("cnn") is None
    assert list((tmp_path / "other-device" / "downloads").iterdir()) == []


def test_no_preferred_variant_offered_is_refused(fleet: Fleet) -> None:
    fleet.publish({"weights.npz": blob("w")})
    with pytest.raises(ModelRejected, match=r"offers none of .* \(offered: \['weights.npz'\]\)"):
        fleet.client().sync(fleet.cache, "cnn")
    with pytest.raises(ConfigError, match="prefer must be a non-empty sequence"):
        fleet.client().sync(fleet.cache, "cnn", prefer=FP32)


def test_an_unenrolled_device_gets_a_clear_401(fleet: Fleet) -> None:
    fleet.publish({FP32: blob("1")})
    stranger = EnrolmentAuthority.generate(DeterministicRandom(9)).enrol(
        "x", DeterministicRandom(3)
    )

    with pytest.raises(FetchUnauthorized, match=r"refused this device's request .* \(401\)"):
        fleet.client(identity=stranger).sync(fleet.cache, "cnn")
    assert len(fleet.requests) == 1  # not retried


def test_unknown_models_and_objects_are_404(fleet: Fleet) -> None:
    fleet.publish({FP32: blob("1")})
    client = fleet.client()
    with pytest.raises(FetchNotFound, match="no manifest of nope@latest"):
        client.manifest("nope")
    with pytest.raises(FetchNotFound, match="is not offered"):
        client.download("a" * 64, fleet.tmp_path / "x", expected_size=1)
    assert len(fleet.requests) == 2  # not retried


def test_bad_client_settings_are_refused(fleet: Fleet) -> None:
    with pytest.raises(ConfigError, match="must start with https://"):
        StoreClient("http://localhost:1", identity=fleet.device, ca_file=fleet.cert)
    with pytest.raises(ConfigError, match="carry no credentials, query or fragment"):
        StoreClient("https://u:p@localhost/", identity=fleet.device, ca_file=fleet.cert)
    with pytest.raises(ConfigError, match="invalid port"):
        StoreClient("https://localhost:99999", identity=fleet.device, ca_file=fleet.cert)
    with pytest.raises(ConfigError, match="cannot load the CA file"):
        StoreClient("https://localhost", identity=fleet.device, ca_file=fleet.tmp_path / "no")
    with pytest.raises(ConfigError, match="timeout_s must be a finite number > 0"):
        fleet.client(timeout_s=0)
    with pytest.raises(ConfigError, match="retries must be an int >= 0"):
        fleet.client(retries=-1)
    with pytest.raises(ConfigError, match="backoff_s must be a finite number >= 0"):
        fleet.client(backoff_s=float("nan"))
    with pytest.raises(ConfigError, match="identity must be"):
        fleet.client(identity="device-1")
    with pytest.raises(ConfigError, match="ref must be a number, an alias or 'latest'"):
        fleet.client().manifest("cnn", ref="../1")
    with pytest.raises(ConfigError, match="model must match"):
        fleet.client().manifest("a/b")
    with pytest.raises(ConfigError, match="expected_size must be an int >= 0"):
        fleet.client().download("a" * 64, fleet.tmp_path / "x", expected_size=-1)


def test_a_server_with_another_certificate_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    other_cert, _ = self_signed_certificate(tmp_path / "other")

    with pytest.raises(FetchError, match="TLS certificate does not verify"):
        fleet.client(ca_file=other_cert).manifest("cnn")
    assert fleet.requests == []


# --- range edge cases against a scripted server --------------------------------------------

DATA = blob("scripted", 200_000)
DIGEST = hashlib.sha256(DATA).hexdigest()
Reply = Callable[[BaseHTTPRequestHandler], None]


def _whole(handler: BaseHTTPRequestHandler, *, cut: int | None = None) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(DATA)))
    handler.end_headers()
    handler.wfile.write(DATA[:cut])
    if cut is not None:
        handler.close_connection = True


def _ranged(handler: BaseHTTPRequestHandler) -> None:
    start = int(handler.headers["Range"].removeprefix("bytes=").rstrip("-"))
    handler.send_response(206)
    handler.send_header("Content-Range", f"bytes {start}-{len(DATA) - 1}/{len(DATA)}")
    handler.send_header("Content-Length", str(len(DATA) - start))
    handler.end_headers()
    handler.wfile.write(DATA[start:])


def _status(code: int) -> Reply:
    def reply(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(code)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return reply


class Scripted:
    """A TLS server answering each request with the next reply of ``script``."""

    def __init__(self, tmp_path: Path) -> None:
        self.script: list[Reply] = []
        self.seen: list[str | None] = []  # the Range header of each request
        script, seen = self.script, self.seen

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                seen.append(self.headers.get("Range"))
                script.pop(0)(self)

        self.cert, key = self_signed_certificate(tmp_path)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = tls_context(self.cert, key).wrap_socket(
            self.server.socket, server_side=True
        )
        self.device = EnrolmentAuthority.generate(DeterministicRandom(1)).enrol(
            "d", DeterministicRandom(2)
        )

    def client(self, sleep: Callable[[float], None] = lambda seconds: None) -> StoreClient:
        return StoreClient(
            f"https://localhost:{self.server.server_address[1]}",
            identity=self.device,
            ca_file=self.cert,
            timeout_s=10,
            retries=2,
            sleep=sleep,
        )


@pytest.fixture
def scripted(tmp_path: Path) -> Iterator[Scripted]:
    created = Scripted(tmp_path)
    thread = threading.Thread(target=created.server.serve_forever, daemon=True)
    thread.start()
    yield created
    created.server.shutdown()
    created.server.server_close()


def test_a_broken_connection_is_resumed_with_a_range(scripted: Scripted, tmp_path: Path) -> None:
    scripted.script.extend([lambda h: _whole(h, cut=70_000), _ranged])

    scripted.client().download(DIGEST, tmp_path / "object", expected_size=len(DATA))

    assert scripted.seen == [None, "bytes=70000-"]
    assert (tmp_path / "object").read_bytes() == DATA


@pytest.mark.parametrize(
    ("reply", "requested"),
    [(_whole, [f"bytes={len(DATA) // 2}-"]), (_status(416), [f"bytes={len(DATA) // 2}-", None])],
    ids=["200-to-a-range", "416"],
)
def test_a_range_the_server_ignores_or_refuses_restarts_from_zero(
    scripted: Scripted, tmp_path: Path, reply: Reply, requested: list[str | None]
) -> None:
    scripted.script.extend([reply, _whole])
    (tmp_path / "object.partial").write_bytes(DATA[: len(DATA) // 2])

    scripted.client().download(DIGEST, tmp_path / "object", expected_size=len(DATA))

    assert scripted.seen == requested
    assert (tmp_path / "object").read_bytes() == DATA


def test_server_errors_are_retried_with_backoff_then_reported(
    scripted: Scripted, tmp_path: Path
) -> None:
    scripted.script.extend([_status(503), _status(502), _whole])
    scripted.client().download(DIGEST, tmp_path / "object", expected_size=len(DATA))
    assert (tmp_path / "object").read_bytes() == DATA

    waits: list[float] = []
    scripted.script.extend([_status(503)] * 3)
    with pytest.raises(FetchError, match="after 3 attempts: the store answered 503"):
        scripted.client(sleep=waits.append).download(
            DIGEST, tmp_path / "again", expected_size=len(DATA)
        )
    assert waits == [0.5, 1.0]  # exponential backoff
    assert len(scripted.seen) == 6
    assert not (tmp_path / "again").exists()


def test_bytes_that_do_not_match_the_manifest_are_rejected(
    scripted: Scripted, tmp_path: Path
) -> None:
    scripted.script.append(_whole)

    with pytest.raises(ModelRejected, match="the signed manifest says 7 bytes"):
        scripted.client().download(DIGEST, tmp_path / "object", expected_size=7)
    assert not (tmp_path / "object").exists()
    assert not (tmp_path / "object.partial").exists()


def _manifest_reply(document: object) -> Reply:
    body = json.dumps(document).encode() if not isinstance(document, bytes) else document

    def reply(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return reply


def test_malformed_manifests_are_refused(scripted: Scripted) -> None:
    entry = ArtefactEntry(
        name=FP32,
        digest=DIGEST,
        size=len(DATA),
        format=ArtefactFormat.ONNX,
        precision=Precision.FP32,
    )

    def signed(model: str, offered: list[str]) -> dict[str, Any]:
        manifest = Manifest(
            model=model,
            version=1,
            parent=None,
            artefacts=(entry,),
            metadata={},
            created_at="2026-01-31T12:00:00Z",
        )
        return {**StoreKey.generate().sign(manifest).to_json(), "offered": offered}

    scripted.script.extend(
        [
            _manifest_reply(b"not json"),
            _manifest_reply({**signed("cnn", [FP32]), "extra": 1}),
            _manifest_reply(signed("cnn", "model-fp32.onnx")),  # type: ignore[arg-type]
            _manifest_reply(signed("other", [FP32])),
            _manifest_reply(signed("cnn", [FP32, INT8])),
            _manifest_reply(signed("cnn", [FP32])),
        ]
    )
    client = scripted.client()
    for match in (
        "malformed manifest of cnn@latest: Expecting value",
        "malformed manifest of cnn@latest: a signed manifest must have exactly the keys",
        "malformed manifest of cnn@latest: 'offered' must be a list",
        "answered the manifest of other v1 for cnn@latest",
        "offers artefacts it does not list",
    ):
        with pytest.raises(FetchError, match=match):
            client.manifest("cnn")
    with pytest.raises(FetchError, match="answered the manifest of cnn v1 for cnn@2"):
        client.manifest("cnn", ref="2")

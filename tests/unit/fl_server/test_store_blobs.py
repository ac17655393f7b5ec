from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import BinaryIO

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_runtime.manifest import check_digest
from fedge.errors import ConfigError, StorageError
from fl_server.store import blobs
from fl_server.store.blobs import (
    BlobCorrupt,
    BlobMissing,
    BlobRef,
    BlobStore,
    FileBlobStore,
)

PAYLOAD = b"global weights, round 7" * 100
# Large enough to take the threaded, chunked paths (more than one 1 MiB chunk).
LARGE = os.urandom(3 * (1 << 20) + 12345)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def object_files(store: FileBlobStore) -> list[Path]:
    return sorted(path for path in (store.root / "objects").rglob("*") if path.is_file())


def flip_byte(path: Path, offset: int) -> None:
    path.chmod(0o644)
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.fixture
def store(tmp_path: Path) -> FileBlobStore:
    return FileBlobStore(tmp_path / "blobs")


def test_file_blob_store_satisfies_the_protocol(store: FileBlobStore) -> None:
    protocol: BlobStore = store

    assert protocol.exists(sha256(b"")) is False


@pytest.mark.parametrize("data", [b"", PAYLOAD, LARGE], ids=["empty", "small", "large"])
def test_put_then_get_round_trips(store: FileBlobStore, data: bytes) -> None:
    ref = store.put(data)

    assert ref == BlobRef(digest=sha256(data), size=len(data))
    assert store.get(ref.digest) == data
    assert store.exists(ref.digest)
    assert store.size(ref.digest) == len(data)
    path = store.root / "objects" / ref.digest[:2] / ref.digest
    assert stat.S_IMODE(path.stat().st_mode) == 0o444


def test_equal_bytes_are_stored_once(store: FileBlobStore) -> None:
    first = store.put(PAYLOAD)
    second = store.put(bytes(PAYLOAD))

    assert first == second
    assert len(object_files(store)) == 1
    assert list((store.root / "tmp").iterdir()) == []


@pytest.mark.parametrize("data", [PAYLOAD, LARGE], ids=["small", "large"])
def test_put_file_matches_put(store: FileBlobStore, tmp_path: Path, data: bytes) -> None:
    source = tmp_path / "model.onnx"
    source.write_bytes(data)

    ref = store.put_file(source)

    assert ref == store.put(data)
    assert store.get(ref.digest) == data
    assert len(object_files(store)) == 1


class SpyFile:
    """Wraps a real file and records the size of every read."""

    def __init__(self, handle: BinaryIO, reads: list[int]) -> None:
        self._handle = handle
        self._reads = reads

    def __enter__(self) -> SpyFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()

    def fileno(self) -> int:
        return self._handle.fileno()

    def read(self, size: int = -1) -> bytes:
        self._reads.append(size)
        return self._handle.read(size)


def test_put_file_streams_in_chunks(
    store: FileBlobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "model.npz"
    source.write_bytes(LARGE)
    reads: list[int] = []

    def spying_open(path: Path, mode: str, buffering: int = -1) -> SpyFile:
        assert mode == "rb"
        return SpyFile(open(path, "rb", buffering=buffering), reads)

    monkeypatch.setattr(blobs, "open", spying_open, raising=False)
    ref = store.put_file(source)
    monkeypatch.undo()

    assert reads and all(0 < size <= 1 << 20 for size in reads)
    assert store.get(ref.digest) == LARGE


def test_put_file_of_a_missing_source_is_a_storage_error(
    store: FileBlobStore, tmp_path: Path
) -> None:
    with pytest.raises(StorageError, match="cannot read"):
        store.put_file(tmp_path / "absent.onnx")


@pytest.mark.parametrize("offset", [0, 1000, -1])
@pytest.mark.parametrize("data", [PAYLOAD, LARGE], ids=["small", "large"])
def test_a_flipped_byte_is_detected_and_never_returned(
    store: FileBlobStore, data: bytes, offset: int
) -> None:
    ref = store.put(data)
    flip_byte(store.root / "objects" / ref.digest[:2] / ref.digest, offset)

    with pytest.raises(BlobCorrupt, match=f"blob {ref.digest} is corrupt"):
        store.get(ref.digest)
    with pytest.raises(BlobCorrupt, match=ref.digest):
        store.verify(ref.digest)


def test_a_corrupt_object_is_replaced_by_a_good_put(store: FileBlobStore) -> None:
    ref = store.put(PAYLOAD)
    flip_byte(store.root / "objects" / ref.digest[:2] / ref.digest, 5)

    assert store.put(PAYLOAD) == ref

    assert store.get(ref.digest) == PAYLOAD
    store.verify(ref.digest)


def test_a_missing_blob_is_reported(store: FileBlobStore) -> None:
    digest = sha256(b"never stored")

    for read in (store.get, store.verify, store.size):
        with pytest.raises(BlobMissing, match=f"blob {digest} is not in the store"):
            read(digest)
    assert store.exists(digest) is False
    assert isinstance(BlobMissing("x"), StorageError)


BAD_DIGESTS = [
    "../x",
    "/etc/passwd",
    "../../" + "a" * 58,
    "A" * 64,
    "a" * 63,
    "a" * 65,
    "",
    "g" * 64,
    "a" * 64 + "\n",
    "a" * 62 + "/x",
]


@pytest.mark.parametrize("digest", BAD_DIGESTS)
def test_malformed_digests_are_refused_everywhere(
    store: FileBlobStore, tmp_path: Path, digest: str
) -> None:
    with pytest.raises(ConfigError, match="64 lowercase hex characters"):
        check_digest(digest)
    for operation in (store.get, store.exists, store.size, store.delete, store.verify):
        with pytest.raises(ConfigError, match="64 lowercase hex characters"):
            operation(digest)
    with pytest.raises(ConfigError, match="64 lowercase hex characters"):
        store.export(digest, tmp_path / "out")
    with pytest.raises(ConfigError, match="64 lowercase hex characters"):
        BlobRef(digest=digest, size=1)


def test_check_digest_accepts_a_sha256() -> None:
    digest = sha256(b"x")

    assert check_digest(digest) == digest


def test_blob_ref_rejects_a_negative_size() -> None:
    with pytest.raises(ConfigError, match="blob size must be an int >= 0"):
        BlobRef(digest=sha256(b""), size=-1)


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_a_crash_mid_write_leaves_no_object(
    store: FileBlobStore, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    def crash(*args: object) -> None:
        raise OSError(5, "simulated crash")

    if failing == "replace":
        monkeypatch.setattr(Path, "replace", crash)
    else:
        monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(StorageError, match="simulated crash"):
        store.put(PAYLOAD)
    monkeypatch.undo()

    assert object_files(store) == []
    assert list((store.root / "tmp").iterdir()) == []
    assert not store.exists(sha256(PAYLOAD))
    assert store.get(store.put(PAYLOAD).digest) == PAYLOAD


def test_leftover_temporary_files_are_ignored_then_cleaned(store: FileBlobStore) -> None:
    leftover = store.root / "tmp" / "123-deadbeef.tmp"
    leftover.write_bytes(PAYLOAD[:10])
    os.utime(leftover, (1_000, 1_000))
    fresh = store.root / "tmp" / "456-cafe.tmp"
    fresh.write_bytes(b"in progress")
    ref = store.put(PAYLOAD)

    assert list(store.digests()) == [ref.digest]
    assert store.get(ref.digest) == PAYLOAD
    now = fresh.stat().st_mtime + 10
    assert store.remove_stale_temporaries(3600, dry_run=True, now=now) == 1
    assert leftover.exists()
    assert store.remove_stale_temporaries(3600, now=now) == 1
    assert sorted(path.name for path in (store.root / "tmp").iterdir()) == ["456-cafe.tmp"]


def test_remove_stale_temporaries_rejects_a_negative_age(store: FileBlobStore) -> None:
    with pytest.raises(ConfigError, match="min_age_s must be >= 0"):
        store.remove_stale_temporaries(-1)


@pytest.mark.parametrize("data", [PAYLOAD, LARGE], ids=["small", "large"])
def test_export_copies_verified_bytes(store: FileBlobStore, tmp_path: Path, data: bytes) -> None:
    ref = store.put(data)
    destination = tmp_path / "out" / "model.onnx"
    destination.parent.mkdir()
    destination.write_bytes(b"old version")

    store.export(ref.digest, destination)

    assert destination.read_bytes() == data
    assert sorted(path.name for path in destination.parent.iterdir()) == ["model.onnx"]


def test_export_of_a_corrupt_blob_leaves_the_destination_alone(
    store: FileBlobStore, tmp_path: Path
) -> None:
    ref = store.put(LARGE)
    flip_byte(store.root / "objects" / ref.digest[:2] / ref.digest, len(LARGE) - 1)
    destination = tmp_path / "model.onnx"
    destination.write_bytes(b"old version")

    with pytest.raises(BlobCorrupt, match=ref.digest):
        store.export(ref.digest, destination)

    assert destination.read_bytes() == b"old version"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["blobs", "model.onnx"]


def test_export_of_a_missing_blob_writes_nothing(store: FileBlobStore, tmp_path: Path) -> None:
    with pytest.raises(BlobMissing):
        store.export(sha256(b"absent"), tmp_path / "model.onnx")

    assert sorted(path.name for path in tmp_path.iterdir()) == ["blobs"]


def test_delete_and_digests(store: FileBlobStore) -> None:
    refs = [store.put(bytes([index]) * 10) for index in range(5)]

    assert list(store.digests()) == sorted(ref.digest for ref in refs)
    assert store.delete(refs[0].digest) is True
    assert store.delete(refs[0].digest) is False
    assert not store.exists(refs[0].digest)
    assert list(store.digests()) == sorted(ref.digest for ref in refs[1:])


def test_digests_skips_stray_files(store: FileBlobStore) -> None:
    ref = store.put(PAYLOAD)
    (store.root / "objects" / "zz").mkdir()
    (store.root / "objects" / "zz" / "notes.txt").write_text("x")
    (store.root / "objects" / ref.digest[:2] / ("0" * 64)).write_text("misfiled")

    assert list(store.digests()) == [ref.digest]


def test_a_store_reopens_with_its_blobs(tmp_path: Path) -> None:
    ref = FileBlobStore(tmp_path / "blobs").put(PAYLOAD)

    reopened = FileBlobStore(tmp_path / "blobs", durable=False)

    assert reopened.get(ref.digest) == PAYLOAD


def test_an_unusable_root_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")

    with pytest.raises(StorageError, match="cannot create the blob store"):
        FileBlobStore(tmp_path / "file")


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=4096))
def test_any_bytes_round_trip(tmp_path: Path, data: bytes) -> None:
    store = FileBlobStore(tmp_path / "property", durable=False)

    ref = store.put(data)

    assert ref.digest == sha256(data)
    assert store.get(ref.digest) == data
    assert store.put(data) == ref

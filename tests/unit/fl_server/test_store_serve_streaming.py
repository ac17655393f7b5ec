"""Objects are verified in full, then streamed by range: never held whole, never served corrupt."""

from __future__ import annotations

import os
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedge.errors import ConfigError, StorageError
from fl_server.store import blobs
from fl_server.store.blobs import BlobCorrupt, BlobMissing, FileBlobStore
from tests.unit.fl_server._serving import Served

MIB = 1 << 20
# More than three 1 MiB chunks, and not a multiple of one.
LARGE = os.urandom(3 * MIB + 4321)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    created = Served(tmp_path, LARGE)
    with created.server:
        yield created
    created.close()


def _flip_in_place(path: Path, offset: int) -> None:
    """Flip one byte of ``path`` in the same inode, then put its modification time back."""
    before = path.stat()
    path.chmod(0o644)
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x01]))
    path.chmod(0o444)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_every_range_gets_exactly_its_bytes(served: Served) -> None:
    target = f"/v1/objects/{served.digest}"
    size = len(LARGE)
    cases = {
        "bytes=0-0": (0, 0),
        f"bytes={MIB - 5}-{MIB + 5}": (MIB - 5, MIB + 5),  # across a chunk boundary
        f"bytes={MIB}-": (MIB, size - 1),
        "bytes=-10": (size - 10, size - 1),
        "bytes=5-999999999": (5, size - 1),  # clipped to the object
        f"bytes=0-{size - 1}": (0, size - 1),
    }
    for header, (start, end) in cases.items():
        status, headers, body = served.request(target, headers={"Range": header})
        assert status == 206, header
        assert body == LARGE[start : end + 1], header
        assert headers["Content-Range"] == f"bytes {start}-{end}/{size}"
        assert headers["Content-Length"] == str(end - start + 1)

    status, headers, body = served.request(target)
    assert (status, body) == (200, LARGE)
    assert headers["ETag"] == f'"{served.digest}"' and headers["Accept-Ranges"] == "bytes"


def test_a_range_of_a_large_object_never_holds_it_in_memory(tmp_path: Path) -> None:
    data = os.urandom(32 * MIB)
    created = Served(tmp_path, data)
    with created.server:
        tracemalloc.start()
        try:
            status, _, body = created.request(
                f"/v1/objects/{created.digest}", headers={"Range": "bytes=100-100"}
            )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    created.close()

    assert (status, body) == (206, data[100:101])
    # Hashed in 1 MiB chunks (a few in flight to the hashing thread), one byte sent;
    # before, the whole 32 MiB object was read into one buffer.
    assert peak < 12 * MIB


def test_a_warm_range_request_reads_only_its_range(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[str] = []
    read: list[int] = []
    original_chunks, original_pread = blobs._chunks_checked, os.pread

    def counting_chunks(source: object, digest: str) -> Iterator[bytes]:
        hashed.append(digest)
        yield from original_chunks(source, digest)  # type: ignore[arg-type]

    def counting_pread(fd: int, length: int, offset: int) -> bytes:
        chunk = original_pread(fd, length, offset)
        read.append(len(chunk))
        return chunk

    monkeypatch.setattr(blobs, "_chunks_checked", counting_chunks)
    monkeypatch.setattr(os, "pread", counting_pread)
    for _ in range(3):
        status, _, body = served.request(
            f"/v1/objects/{served.digest}", headers={"Range": "bytes=10-19"}
        )
        assert (status, body) == (206, LARGE[10:20])

    assert hashed == [served.digest]  # one full hash, then the memo of the unchanged file
    assert read == [10, 10, 10]  # only the range, never the object


def test_an_object_corrupted_after_it_was_served_is_never_served_again(served: Served) -> None:
    target = f"/v1/objects/{served.digest}"
    assert served.request(target)[0] == 200  # verified and remembered

    _flip_in_place(served.object_path, len(LARGE) - 1)  # same inode, same size, same mtime

    status, _, body = served.request(target, headers={"Range": "bytes=0-9"})
    assert status == 500 and b"failed verification" in body
    assert LARGE[:10] not in body


def test_a_burst_for_a_corrupt_object_is_refused_after_one_hash(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    _flip_in_place(served.object_path, 0)
    hashed: list[str] = []
    original = blobs._chunks_checked

    def counting(source: object, digest: str) -> Iterator[bytes]:
        hashed.append(digest)
        yield from original(source, digest)  # type: ignore[arg-type]

    monkeypatch.setattr(blobs, "_chunks_checked", counting)
    statuses: list[int] = []

    def fetch() -> None:
        statuses.append(served.request(f"/v1/objects/{served.digest}")[0])

    threads = [threading.Thread(target=fetch) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert statuses == [500] * 8
    assert hashed == [served.digest]


def test_a_missing_object_is_404(served: Served) -> None:
    served.object_path.unlink()

    status, _, body = served.request(f"/v1/objects/{served.digest}")

    assert status == 404 and b"missing" in body


def test_open_verified_hashes_once_per_stamp_until_the_memo_expires(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [0.0]
    store = FileBlobStore(tmp_path, durable=False, verification_ttl_s=30, clock=lambda: now[0])
    ref = store.put(LARGE)
    hashed: list[str] = []
    original = blobs._chunks_checked

    def counting(source: object, digest: str) -> Iterator[bytes]:
        hashed.append(digest)
        yield from original(source, digest)  # type: ignore[arg-type]

    monkeypatch.setattr(blobs, "_chunks_checked", counting)
    for _ in range(3):
        with store.open_verified(ref.digest) as blob:
            assert blob.size == len(LARGE)
            assert blob.file.read(5) == LARGE[:5]  # positioned at byte 0
    now[0] = 31.0
    with store.open_verified(ref.digest):
        pass

    assert len(hashed) == 2


def test_a_zero_ttl_hashes_on_every_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = FileBlobStore(tmp_path, durable=False, verification_ttl_s=0)
    ref = store.put(b"small")
    calls: list[str] = []
    original = blobs._chunks_checked

    def counting(source: object, digest: str) -> Iterator[bytes]:
        calls.append(digest)
        yield from original(source, digest)  # type: ignore[arg-type]

    monkeypatch.setattr(blobs, "_chunks_checked", counting)
    for _ in range(3):
        with store.open_verified(ref.digest) as blob:
            assert b"".join(blob.read_range(0, 4)) == b"small"

    assert len(calls) == 3


def test_concurrent_opens_of_a_new_object_share_one_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileBlobStore(tmp_path, durable=False)
    ref = store.put(LARGE)
    calls: list[str] = []
    original = blobs._chunks_checked

    def slow(source: object, digest: str) -> Iterator[bytes]:
        calls.append(digest)
        time.sleep(0.2)  # every other opener arrives while this hash runs
        yield from original(source, digest)  # type: ignore[arg-type]

    monkeypatch.setattr(blobs, "_chunks_checked", slow)
    sizes: list[int] = []

    def open_it() -> None:
        with store.open_verified(ref.digest) as blob:
            sizes.append(blob.size)

    threads = [threading.Thread(target=open_it) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sizes == [len(LARGE)] * 8
    assert calls == [ref.digest]


def test_open_verified_refuses_missing_and_corrupt_objects(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path, durable=False)
    ref = store.put(LARGE)
    with pytest.raises(BlobMissing):
        store.open_verified("a" * 64).__enter__()
    with pytest.raises(ConfigError):
        store.open_verified("../etc/passwd").__enter__()
    path = tmp_path / "objects" / ref.digest[:2] / ref.digest
    _flip_in_place(path, MIB)
    with pytest.raises(BlobCorrupt), store.open_verified(ref.digest):
        pytest.fail("a corrupt object was handed out")


def test_read_range_checks_its_bounds_and_a_file_that_shrank(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path, durable=False)
    ref = store.put(LARGE)
    path = tmp_path / "objects" / ref.digest[:2] / ref.digest
    with store.open_verified(ref.digest) as blob:
        with pytest.raises(ConfigError, match="outside a blob"):
            next(blob.read_range(0, len(LARGE)))
        with pytest.raises(ConfigError, match="outside a blob"):
            next(blob.read_range(5, 4))
        with pytest.raises(ConfigError, match="chunk_size must be >= 1"):
            next(blob.read_range(0, 1, chunk_size=0))
        assert [len(c) for c in blob.read_range(0, MIB + 1, chunk_size=MIB)] == [MIB, 2]
        path.chmod(0o644)
        os.truncate(path, 100)  # the same inode shrinks under the reader
        with pytest.raises(StorageError, match="ended at byte 100"):
            list(blob.read_range(0, 200))


def test_a_negative_verification_ttl_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="verification_ttl_s must be >= 0"):
        FileBlobStore(tmp_path, verification_ttl_s=-1)

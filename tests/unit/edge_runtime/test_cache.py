"""The device model cache: verified installs, rejection, rollback, pruning, rot and SIGKILL."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_runtime.cache import InstalledModel, ModelCache, ModelCorrupt, ModelRejected
from edge_runtime.manifest import (
    SIGNING_CONTEXT,
    ArtefactEntry,
    ArtefactFormat,
    Manifest,
    Precision,
    SignedManifest,
    key_id_for,
)
from fedge.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]
STORE_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
TRUSTED = STORE_KEY.public_key().public_bytes_raw()
INT8, FP32 = "model-int8-static.onnx", "model-fp32.onnx"


def payload(version: int, name: str = FP32, size: int = 4096) -> bytes:
    seed = hashlib.sha256(f"{version}/{name}".encode()).digest()
    return (seed * (size // 32 + 1))[:size]


def sign(
    version: int,
    artefacts: dict[str, bytes],
    *,
    key: Ed25519PrivateKey = STORE_KEY,
    model: str = "cnn",
) -> SignedManifest:
    manifest = Manifest(
        model=model,
        version=version,
        parent=version - 1 if version > 1 else None,
        artefacts=tuple(
            ArtefactEntry(
                name=name,
                digest=hashlib.sha256(data).hexdigest(),
                size=len(data),
                format=ArtefactFormat.ONNX,
                precision=Precision.INT8 if "int8" in name else Precision.FP32,
            )
            for name, data in artefacts.items()
        ),
        metadata={"round": version},
        created_at="2026-01-31T12:00:00Z",
    )
    signature = key.sign(SIGNING_CONTEXT + manifest.canonical_bytes())
    return SignedManifest(manifest, signature, key_id_for(key.public_key().public_bytes_raw()))


def source(tmp_path: Path, data: bytes, label: str = "src") -> Path:
    path = tmp_path / "downloads-here" / f"{label}-{hashlib.sha256(data).hexdigest()[:8]}"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return path


def install(
    cache: ModelCache, tmp_path: Path, version: int, *, allow_downgrade: bool = False
) -> InstalledModel:
    data = payload(version)
    signed = sign(version, {FP32: data})
    return cache.install(
        signed, FP32, source(tmp_path, data), allow_downgrade=allow_downgrade
    ).current


@pytest.fixture
def cache(tmp_path: Path) -> ModelCache:
    return ModelCache(tmp_path / "cache", trusted_key=TRUSTED)


def test_an_installed_model_is_current_and_verified(cache: ModelCache, tmp_path: Path) -> None:
    installed = install(cache, tmp_path, 1)

    current = cache.current("cnn")
    assert current == installed
    assert current.version == 1 and current.artefact == FP32
    assert current.path.read_bytes() == payload(1)
    assert current.digest == hashlib.sha256(payload(1)).hexdigest()
    assert current.entry.precision is Precision.FP32
    assert current.path.stat().st_mode & 0o777 == 0o444
    assert cache.versions("cnn") == [1] and cache.current("other") is None
    pointer = json.loads((tmp_path / "cache" / "current" / "cnn.json").read_text())
    assert pointer == {"version": 1, "artefact": FP32, "digest": current.digest, "previous": []}
    assert install(cache, tmp_path, 1) == installed  # installing it again changes nothing


def _forged(version: int, data: bytes) -> SignedManifest:
    genuine = sign(version, {FP32: data})
    return SignedManifest(genuine.manifest, bytes(64), genuine.key_id)


def _swapped(version: int, data: bytes) -> SignedManifest:
    # The signature of version 2 on the manifest of version 3.
    return SignedManifest(
        sign(version + 1, {FP32: data}).manifest,
        sign(version, {FP32: data}).signature,
        key_id_for(TRUSTED),
    )


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda d: (_forged(2, d), FP32, d), "signature does not verify"),
        (lambda d: (_swapped(2, d), FP32, d), "signature does not verify"),
        (lambda d: (sign(2, {FP32: d}, key=OTHER_KEY), FP32, d), "signed by key"),
        (lambda d: (sign(2, {FP32: d}), FP32, d[:-1] + b"!"), "hashes to"),
        (lambda d: (sign(2, {FP32: d}), FP32, d + b"!"), "more than 4096 bytes"),
        (lambda d: (sign(2, {FP32: d}), FP32, d[:100]), "has 100 bytes"),
        (lambda d: (sign(2, {FP32: d}), INT8, d), "is not in the manifest"),
    ],
    ids=["forged", "swapped", "other-key", "digest", "longer", "shorter", "not-listed"],
)
def test_a_rejected_install_keeps_the_previous_model(
    cache: ModelCache,
    tmp_path: Path,
    make: Callable[[bytes], tuple[SignedManifest, str, bytes]],
    match: str,
) -> None:
    install(cache, tmp_path, 1)
    signed, name, data = make(payload(2))

    with pytest.raises(ModelRejected, match=match):
        cache.install(signed, name, source(tmp_path, data, "bad"))

    current = cache.current("cnn")
    assert current is not None and current.version == 1
    assert cache.versions("cnn") == [1]
    assert list((tmp_path / "cache" / "staging").iterdir()) == []


def test_an_unreadable_source_is_a_storage_error(cache: ModelCache, tmp_path: Path) -> None:
    with pytest.raises(OSError, match="cannot read"):
        cache.install(sign(1, {FP32: b"x"}), FP32, tmp_path / "missing")
    assert cache.current("cnn") is None


def test_rollback_walks_back_and_jumps_to_a_version(cache: ModelCache, tmp_path: Path) -> None:
    for version in (1, 2, 3):
        install(cache, tmp_path, version)

    assert cache.rollback("cnn").version == 2
    assert cache.current("cnn").version == 2  # type: ignore[union-attr]
    assert cache.rollback("cnn").version == 1
    with pytest.raises(ConfigError, match="no previous version"):
        cache.rollback("cnn")
    assert cache.rollback("cnn", to=3).version == 3  # any installed version
    assert cache.rollback("cnn").version == 1  # it came from 1
    assert cache.rollback("cnn", to=2).version == 2
    assert cache.current("cnn").path.read_bytes() == payload(2)  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="already current"):
        cache.rollback("cnn", to=2)
    with pytest.raises(ConfigError, match=r"version 9 is not installed: \[1, 2, 3\]"):
        cache.rollback("cnn", to=9)
    with pytest.raises(ConfigError, match="to must be a version number"):
        cache.rollback("cnn", to=0)


def test_the_newest_the_current_and_the_previous_versions_are_kept(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path / "cache", trusted_key=TRUSTED, keep=2)
    install(cache, tmp_path, 2)
    install(cache, tmp_path, 3)
    install(cache, tmp_path, 1, allow_downgrade=True)  # current, though not among the newest 2

    assert cache.versions("cnn") == [1, 2, 3]
    assert cache.current("cnn").version == 1  # type: ignore[union-attr]
    install(cache, tmp_path, 4)
    assert cache.versions("cnn") == [1, 3, 4]  # 1 was current: kept for an instant rollback
    pointer = json.loads((tmp_path / "cache" / "current" / "cnn.json").read_text())
    assert [entry["version"] for entry in pointer["previous"]] == [1, 3]  # 2 is gone
    assert cache.rollback("cnn").version == 1
    assert cache.versions("cnn") == [1, 3, 4]
    assert cache.rollback("cnn").version == 3
    with pytest.raises(ConfigError, match="no previous version"):
        cache.rollback("cnn")


def test_a_model_that_rots_on_disk_is_never_served(cache: ModelCache, tmp_path: Path) -> None:
    install(cache, tmp_path, 1)
    path = install(cache, tmp_path, 2).path
    path.chmod(0o644)
    path.write_bytes(b"X" + payload(2)[1:])

    with pytest.raises(ModelCorrupt, match=r"cnn version 2 \(model-fp32.onnx\) is corrupt on disk"):
        cache.current("cnn")
    assert cache.rollback("cnn").version == 1
    assert cache.current("cnn").version == 1  # type: ignore[union-attr]
    with pytest.raises(ModelCorrupt, match="corrupt on disk"):
        cache.rollback("cnn", to=2)  # never switched to
    assert cache.current("cnn").version == 1  # type: ignore[union-attr]
    assert install(cache, tmp_path, 2).path.read_bytes() == payload(2)  # a reinstall repairs it


def test_a_rotten_manifest_or_pointer_is_reported(cache: ModelCache, tmp_path: Path) -> None:
    installed = install(cache, tmp_path, 1)
    manifest = installed.path.parent / "manifest.json"
    manifest.chmod(0o644)
    manifest.write_text(manifest.read_text().replace('"round": 1', '"round": 7'))
    with pytest.raises(ModelCorrupt, match="installed manifest does not verify"):
        cache.current("cnn")

    pointer = tmp_path / "cache" / "current" / "cnn.json"
    pointer.write_text("{not json")
    with pytest.raises(ModelCorrupt, match=r"pointer .* is unreadable"):
        cache.current("cnn")
    assert install(cache, tmp_path, 2).version == 2  # an install replaces both
    assert cache.current("cnn").version == 2  # type: ignore[union-attr]


def test_a_downgrade_is_refused_unless_allowed(cache: ModelCache, tmp_path: Path) -> None:
    install(cache, tmp_path, 2)

    with pytest.raises(ModelRejected, match="version 1 is older than the current version 2"):
        install(cache, tmp_path, 1)
    assert cache.current("cnn").version == 2  # type: ignore[union-attr]
    assert install(cache, tmp_path, 1, allow_downgrade=True).version == 1


def test_variants_of_one_version_live_side_by_side(cache: ModelCache, tmp_path: Path) -> None:
    data = {INT8: payload(1, INT8), FP32: payload(1, FP32)}
    signed = sign(1, data)
    cache.install(signed, INT8, source(tmp_path, data[INT8]))
    cache.install(signed, FP32, source(tmp_path, data[FP32]))

    assert cache.has("cnn", 1, INT8) and cache.has("cnn", 1, FP32)
    assert cache.current("cnn").artefact == FP32  # type: ignore[union-attr]
    assert cache.activate(signed, INT8).current.artefact == INT8  # no bytes needed
    assert cache.rollback("cnn").artefact == FP32
    with pytest.raises(ModelRejected, match="is absent"):
        cache.activate(sign(2, {FP32: b"x"}), FP32)


def test_a_companion_is_installed_verified_with_its_model(
    cache: ModelCache, tmp_path: Path
) -> None:
    reference = b'{"format": "fedge/drift-reference/v1"}'
    data = {FP32: payload(1), "drift-reference.json": reference}
    signed = sign(1, data)
    model = source(tmp_path, data[FP32])
    with pytest.raises(ModelRejected, match="hashes to"):
        bad = source(tmp_path, reference[:-1] + b"]")
        cache.install(signed, FP32, model, companions={"drift-reference.json": bad})
    assert cache.current("cnn") is None and cache.versions("cnn") == []  # nothing half-done

    companions = {"drift-reference.json": source(tmp_path, reference)}
    installed = cache.install(signed, FP32, model, companions=companions).current

    companion = cache.companion(installed, "drift-reference.json")
    assert companion is not None and companion.read_bytes() == reference
    assert cache.companion(installed, "absent.json") is None
    companion.chmod(0o644)
    companion.write_bytes(reference.replace(b"v1", b"v2"))
    with pytest.raises(ModelCorrupt, match=r"drift-reference\.json is corrupt"):
        cache.companion(installed, "drift-reference.json")


def test_opening_removes_what_a_crash_left_behind(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    cache = ModelCache(root, trusted_key=TRUSTED)
    install(cache, tmp_path, 1)
    (root / "staging" / "install-x").mkdir()
    (root / "staging" / "install-x" / FP32).write_bytes(b"half")
    (root / "current" / ".cnn.json.0123.tmp").write_text("{")
    fresh, stale = root / "downloads" / ("a" * 64 + ".partial"), root / "downloads" / ("b" * 64)
    fresh.write_bytes(b"resume me")
    stale.write_bytes(b"old")
    os.utime(stale, (time.time() - 30 * 86400, time.time() - 30 * 86400))

    reopened = ModelCache(root, trusted_key=TRUSTED)

    assert list((root / "staging").iterdir()) == []
    assert [p.name for p in (root / "current").iterdir()] == ["cnn.json"]
    assert fresh.exists() and not stale.exists()
    assert reopened.current("cnn").version == 1  # type: ignore[union-attr]
    assert reopened.download_path("c" * 64) == root / "downloads" / ("c" * 64)


def test_bad_arguments_are_refused(tmp_path: Path, cache: ModelCache) -> None:
    with pytest.raises(ConfigError, match="trusted_key must be the store's raw 32-byte"):
        ModelCache(tmp_path / "c", trusted_key=b"short")
    with pytest.raises(ConfigError, match="keep must be an int >= 1, got 0"):
        ModelCache(tmp_path / "c", trusted_key=TRUSTED, keep=0)
    with pytest.raises(ConfigError, match="model name must match"):
        cache.current("../etc")
    with pytest.raises(ConfigError, match="blob digest is 64 lowercase hex"):
        cache.download_path("../x")


# --- SIGKILL at every step of a swap --------------------------------------------------------

# edge_runtime/__init__ imports torch (seconds); the child needs only the cache, so it
# registers the package without running its __init__.
_CHILD = """
import sys, time, types
from pathlib import Path
package = types.ModuleType("edge_runtime")
package.__path__ = [sys.argv[1] + "/edge_runtime"]
sys.modules["edge_runtime"] = package
from edge_runtime.cache import ModelCache
from edge_runtime.manifest import SignedManifest
import json
root, trusted, step, marker, manifest, source = sys.argv[2:8]

def hook(name):
    if name == step:
        Path(marker).write_text(name)
        time.sleep(120)

cache = ModelCache(Path(root), trusted_key=bytes.fromhex(trusted), keep=1, _step_hook=hook)
signed = SignedManifest.from_json(json.loads(Path(manifest).read_text()))
cache.install(signed, "model-fp32.onnx", Path(source))
"""
# step -> (the current version afterwards, the versions installed afterwards)
_STEPS = {
    "copying": (1, [1]),
    "staged": (1, [1]),
    "renamed": (1, [1, 2]),
    "pointer-temp": (1, [1, 2]),
    "pointer-written": (2, [1, 2]),
    "pruned": (2, [1, 2]),  # the previous version stays cached: blue-green
}


@pytest.mark.parametrize(("step", "after"), list(_STEPS.items()))
def test_a_swap_killed_at_any_step_leaves_the_old_or_the_new_model(
    tmp_path: Path, step: str, after: tuple[int, list[int]]
) -> None:
    expected, installed = after
    root = tmp_path / "cache"
    install(ModelCache(root, trusted_key=TRUSTED), tmp_path, 1)
    new = payload(2, size=3 << 20)  # several chunks: "copying" is mid-copy
    signed = sign(2, {FP32: new})
    (tmp_path / "v2.json").write_text(json.dumps(signed.to_json()))
    marker = tmp_path / "marker"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(_CHILD),
            str(ROOT),
            str(root),
            TRUSTED.hex(),
            step,
            str(marker),
            str(tmp_path / "v2.json"),
            str(source(tmp_path, new)),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert child.poll() is None, child.communicate()[1]
        assert time.monotonic() < deadline, "the child never reached the step"
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)

    cache = ModelCache(root, trusted_key=TRUSTED, keep=1)

    current = cache.current("cnn")  # re-hashes: never a half-written model
    assert current is not None and current.version == expected
    assert current.path.read_bytes() == (payload(1) if expected == 1 else new)
    assert list((root / "staging").iterdir()) == []
    assert sorted(p.name for p in (root / "current").iterdir()) == ["cnn.json"]
    assert cache.versions("cnn") == installed


def test_models_lists_those_with_a_current_version(cache: ModelCache, tmp_path: Path) -> None:
    assert cache.models() == []
    install(cache, tmp_path, 1)
    data = payload(1)
    cache.install(sign(1, {FP32: data}, model="mlp"), FP32, source(tmp_path, data, "mlp"))

    assert cache.models() == ["cnn", "mlp"]

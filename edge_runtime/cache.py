"""A device's local model cache: verified installs, atomic swaps and instant rollback.

Layout under the cache root::

    versions/<model>/<version>/manifest.json   the signed manifest, as the store sent it
    versions/<model>/<version>/<artefact>      installed artefacts (mode 0o444)
    current/<model>.json                       the pointer: the version and artefact to serve
    staging/                                   installs in progress (removed on open)
    downloads/<sha256>[.partial]               fetches in progress (kept, so a restart resumes)
    lock                                       one writer at a time (``flock``)

The pointer is ``{"version": N, "artefact": NAME, "digest": SHA256, "previous":
[{"version": ..., "artefact": ..., "digest": ...}, ...]}``, newest previous first.

Notes
-----
Crash safety rests on two atomic renames. An install copies the artefact into a
fresh staging directory while hashing it, compares size and SHA-256 with the
signed manifest, fsyncs, and only then renames it to ``versions/<model>/<version>``
(or renames the one file into a version directory already present): a version
directory never holds unverified bytes. Then the pointer is replaced (temporary
file, fsync, ``os.replace``, directory fsync). A SIGKILL or power cut at any
point leaves the pointer naming the old or the new version, both complete.

Nothing from the network is trusted: every manifest must verify against the
store's public key given at construction (provisioned with the device), and
:meth:`ModelCache.current` re-hashes the artefact before handing it out (40-50 ms
for 40 MiB, measured on a 2-core host), so a model that rotted on disk is
reported, never served.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from edge_runtime.cache_records import (
    InstalledModel,
    ModelCorrupt,
    ModelRejected,
    PointerEntry,
    check_name,
)
from edge_runtime.durable import (
    TEMPORARY_SUFFIX,
    create_synced,
    fsync_directory,
    hash_file,
    write_all,
    write_atomically,
)
from edge_runtime.manifest import (
    ArtefactEntry,
    Manifest,
    ManifestInvalid,
    SignedManifest,
    check_digest,
    key_id_for,
    verify_manifest,
)
from fedge.errors import ConfigError, StorageError

__all__ = ["InstalledModel", "ModelCache", "ModelCorrupt", "ModelRejected"]

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
_MANIFEST_FILE = "manifest.json"
_STALE_DOWNLOAD_S = 7 * 24 * 3600.0


class ModelCache:
    """Installed model versions on a device, one of them current per model.

    Parameters
    ----------
    root
        The cache directory; created if missing. Leftovers of a crashed install
        are removed here.
    trusted_key
        The store's raw 32-byte Ed25519 public key; every manifest must verify with it.
    keep
        How many of the newest versions of each model stay installed (the current
        one is always kept as well).
    _step_hook
        Tests only: called with the name of each step of a swap (``"copying"``,
        ``"staged"``, ``"renamed"``, ``"pointer-temp"``, ``"pointer-written"``,
        ``"pruned"``) so a crash can be injected between them.

    Raises
    ------
    ConfigError
        If ``trusted_key`` or ``keep`` is invalid.
    StorageError
        If the cache directory cannot be created or cleaned.
    """

    def __init__(
        self,
        root: Path,
        *,
        trusted_key: bytes,
        keep: int = 3,
        _step_hook: Callable[[str], None] | None = None,
    ) -> None:
        if not isinstance(trusted_key, bytes) or len(trusted_key) != 32:
            raise ConfigError("trusted_key must be the store's raw 32-byte Ed25519 public key")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ConfigError(f"keep must be an int >= 1, got {keep!r:.40}")
        self._root, self._key, self._keep = root, trusted_key, keep
        self._hook = _step_hook or (lambda step: None)
        self._versions, self._current = root / "versions", root / "current"
        self._staging, self._downloads = root / "staging", root / "downloads"
        try:
            for directory in (self._versions, self._current, self._staging, self._downloads):
                directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the model cache at {root}: {exc}") from exc
        with self._locked():
            self._recover()
        logger.debug("model cache at %s trusts store key %s", root, key_id_for(trusted_key))

    @property
    def trusted_key(self) -> bytes:
        """The store public key manifests must verify with."""
        return self._key

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the cache's writer lock; turn a stray ``OSError`` into :class:`StorageError`."""
        try:
            fd = os.open(self._root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel if the process dies
                yield
            finally:
                os.close(fd)
        except StorageError:
            raise
        except OSError as exc:
            raise StorageError(f"cannot update the model cache at {self._root}: {exc}") from exc

    def _recover(self) -> None:
        removed = 0
        for entry in self._staging.iterdir():
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed += 1
        for entry in self._current.glob(f"*{TEMPORARY_SUFFIX}"):
            entry.unlink()
            removed += 1
        cutoff = time.time() - _STALE_DOWNLOAD_S
        for entry in self._downloads.iterdir():
            if entry.stat().st_mtime < cutoff:
                entry.unlink()
                removed += 1
        if removed:
            logger.info("model cache: removed %d leftovers of interrupted installs", removed)

    def _directory(self, model: str, version: int) -> Path:
        return self._versions / check_name("model name", model) / str(version)

    def download_path(self, digest: str) -> Path:
        """Return where a fetch of the object ``digest`` should write (kept across restarts)."""
        return self._downloads / check_digest(digest)

    def models(self) -> list[str]:
        """Return the models that have a current version, sorted by name."""
        return sorted(path.stem for path in self._current.glob("*.json"))

    def versions(self, model: str) -> list[int]:
        """Return the installed versions of ``model``, oldest first."""
        directory = self._versions / check_name("model name", model)
        if not directory.is_dir():
            return []
        return sorted(
            int(entry.name)
            for entry in directory.iterdir()
            if entry.name.isdigit() and (entry / _MANIFEST_FILE).is_file()
        )

    def has(self, model: str, version: int, artefact: str) -> bool:
        """Say whether an artefact is installed (present; :meth:`activate` verifies it)."""
        return (self._directory(model, version) / check_name("artefact name", artefact)).is_file()

    def current(self, model: str) -> InstalledModel | None:
        """Return the current model of ``model`` after re-hashing it, or ``None`` if none.

        Raises
        ------
        ModelCorrupt
            If the pointer, the manifest or the artefact does not verify on disk
            (:meth:`rollback` still switches to an intact version).
        """
        pointer = self._read_pointer(model, strict=True)
        return None if pointer is None else self._load(model, pointer[0])

    def check_upgrade(self, manifest: Manifest, *, allow_downgrade: bool = False) -> None:
        """Raise :class:`ModelRejected` if ``manifest`` is older than the current version."""
        pointer = self._read_pointer(manifest.model, strict=False)
        if pointer is not None and manifest.version < pointer[0].version and not allow_downgrade:
            raise ModelRejected(
                f"{manifest.model} version {manifest.version} is older than the current version "
                f"{pointer[0].version}: use rollback() or allow_downgrade=True"
            )

    def install(
        self,
        signed: SignedManifest,
        artefact_name: str,
        source: Path,
        *,
        allow_downgrade: bool = False,
    ) -> InstalledModel:
        """Verify ``source`` against ``signed``, install it and make it current.

        Parameters
        ----------
        signed
            The version's signed manifest; it must verify with the trusted key.
        artefact_name
            Which of the manifest's artefacts ``source`` holds.
        source
            The artefact's bytes (copied; the file is left as it is).
        allow_downgrade
            Accept a version older than the current one.

        Returns
        -------
        InstalledModel
            The new current model.

        Raises
        ------
        ModelRejected
            If the signature, the size or the SHA-256 does not match, the artefact
            is not in the manifest or the version is an unallowed downgrade; the
            previous model stays current.
        StorageError
            If ``source`` cannot be read or the cache cannot be written.
        """
        manifest, entry = self._verified(signed, artefact_name)
        with self._locked():
            self.check_upgrade(manifest, allow_downgrade=allow_downgrade)
            directory = self._directory(manifest.model, manifest.version)
            if not self._intact(directory, signed, entry):
                self._stage(directory, signed, entry, source)
            return self._switch(manifest, entry)

    def stage(self, signed: SignedManifest, artefact_name: str, source: Path) -> None:
        """Verify and store one artefact of a version *without* making anything current.

        For the companions of a model (``drift-reference.json``): stage them first,
        then :meth:`install` the model, so the version is complete when it switches.

        Raises
        ------
        ModelRejected, StorageError
            As :meth:`install`; nothing is stored.
        """
        manifest, entry = self._verified(signed, artefact_name)
        with self._locked():
            directory = self._directory(manifest.model, manifest.version)
            if not self._intact(directory, signed, entry):
                self._stage(directory, signed, entry, source)

    def companion(self, installed: InstalledModel, artefact_name: str) -> Path | None:
        """Return a verified companion artefact of an installed version, or None if absent.

        Raises
        ------
        ModelCorrupt
            If the companion is present but does not match the signed manifest.
        """
        entry = next((a for a in installed.manifest.artefacts if a.name == artefact_name), None)
        path = self._directory(installed.model, installed.version) / artefact_name
        if entry is None or not path.is_file():
            return None
        if hash_file(path) != (entry.size, entry.digest):
            raise ModelCorrupt(f"{installed.model} v{installed.version} {artefact_name} is corrupt")
        return path

    def activate(
        self, signed: SignedManifest, artefact_name: str, *, allow_downgrade: bool = False
    ) -> InstalledModel:
        """Make an already installed artefact current, after verifying it.

        Raises
        ------
        ModelRejected
            As :meth:`install`, or if the artefact is not installed.
        ModelCorrupt
            If the installed copy no longer verifies.
        """
        manifest, entry = self._verified(signed, artefact_name)
        with self._locked():
            self.check_upgrade(manifest, allow_downgrade=allow_downgrade)
            directory = self._directory(manifest.model, manifest.version)
            if not (directory / entry.name).is_file():
                raise ModelRejected(f"{manifest.model} v{manifest.version} {entry.name} is absent")
            if not self._intact(directory, signed, entry):
                raise ModelCorrupt(f"{manifest.model} v{manifest.version} is corrupt on disk")
            return self._switch(manifest, entry)

    def rollback(self, model: str, to: int | None = None) -> InstalledModel:
        """Switch back to the previous version (or to version ``to``), a pointer swap.

        The target is re-hashed first, so a version that rotted is never made
        current. Rolling back drops the abandoned version from the history: two
        rollbacks go two versions back. ``to`` may name any installed version.

        Raises
        ------
        ConfigError
            If there is no previous version, or ``to`` is current or not installed.
        ModelCorrupt
            If the target does not verify (the pointer is left unchanged).
        """
        if to is not None and (isinstance(to, bool) or not isinstance(to, int) or to < 1):
            raise ConfigError(f"to must be a version number >= 1 or None, got {to!r:.40}")
        with self._locked():
            pointer = self._read_pointer(model, strict=to is None)
            current, previous = pointer if pointer is not None else (None, ())
            if to is None:
                if not previous:
                    raise ConfigError(f"{model} has no previous version to roll back to")
                target, history = previous[0], list(previous[1:])
            elif current is not None and to == current.version:
                raise ConfigError(f"{model} version {to} is already current")
            elif (index := next((i for i, e in enumerate(previous) if e.version == to), -1)) >= 0:
                target, history = previous[index], list(previous[index + 1 :])
            elif to in self.versions(model):
                signed = self._read_signed(self._directory(model, to))
                found = [a for a in signed.manifest.artefacts if self.has(model, to, a.name)]
                if not found:
                    raise ModelCorrupt(f"{model} version {to} has no installed artefact")
                target = PointerEntry(to, found[0].name, found[0].digest)
                history = [e for e in (current, *previous) if e is not None and e.version != to]
            else:
                raise ConfigError(f"{model} version {to} is not installed: {self.versions(model)}")
            installed = self._load(model, target)
            self._write_pointer(model, target, history)
            logger.info("model cache: %s rolled back to version %d", model, target.version)
            return installed

    def _verified(self, signed: SignedManifest, name: str) -> tuple[Manifest, ArtefactEntry]:
        try:
            manifest = verify_manifest(signed, self._key)
        except ManifestInvalid as exc:
            raise ModelRejected(f"refusing {signed.manifest.model}: {exc}") from exc
        entry = next((a for a in manifest.artefacts if a.name == name), None)
        if entry is None:
            names = sorted(a.name for a in manifest.artefacts)
            raise ModelRejected(f"{name!r:.80} is not in the manifest (artefacts: {names})")
        return manifest, entry

    def _intact(self, directory: Path, signed: SignedManifest, entry: ArtefactEntry) -> bool:
        """Say whether ``directory`` holds this manifest and a verified copy of ``entry``."""
        path = directory / entry.name
        if not path.is_file():
            return False
        expected = (entry.size, entry.digest)
        if self._same_manifest(directory, signed) and hash_file(path) == expected:
            return True
        logger.warning("model cache: %s is corrupt on disk", path)
        return False

    def _stage(
        self, directory: Path, signed: SignedManifest, entry: ArtefactEntry, source: Path
    ) -> None:
        staging = Path(tempfile.mkdtemp(prefix="install-", dir=self._staging))
        try:
            staging.chmod(0o755)  # artefacts are not secret: a runtime user may read them
            document = json.dumps(signed.to_json(), sort_keys=True, indent=2).encode()
            create_synced(staging / _MANIFEST_FILE, document, 0o444)
            self._copy_verified(source, staging / entry.name, entry)
            fsync_directory(staging)
            self._hook("staged")
            if directory.is_dir() and not self._same_manifest(directory, signed):
                logger.warning("model cache: %s conflicts with the new manifest", directory)
                self._discard(directory)
            if directory.is_dir():  # another artefact of this version: move the one file in
                (staging / entry.name).replace(directory / entry.name)
                fsync_directory(directory)
            else:
                directory.parent.mkdir(parents=True, exist_ok=True)
                staging.rename(directory)
                fsync_directory(directory.parent)
            self._hook("renamed")
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _same_manifest(self, directory: Path, signed: SignedManifest) -> bool:
        try:
            return self._read_signed(directory) == signed
        except ModelCorrupt:
            return False

    def _copy_verified(self, source: Path, destination: Path, entry: ArtefactEntry) -> None:
        hasher, size = hashlib.sha256(), 0
        try:
            reader = open(source, "rb", buffering=0)  # noqa: SIM115 - closed by the with below
        except OSError as exc:
            raise StorageError(f"cannot read {source}: {exc}") from exc
        with reader:
            fd = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
            try:
                while (chunk := reader.read(_CHUNK)) and size <= entry.size:
                    hasher.update(chunk)
                    write_all(fd, chunk)
                    size += len(chunk)
                    self._hook("copying")
                os.fsync(fd)
            finally:
                os.close(fd)
        if size != entry.size:
            found = f"more than {entry.size}" if size > entry.size else str(size)
            raise ModelRejected(
                f"{entry.name} has {found} bytes, the signed manifest says {entry.size}"
            )
        if hasher.hexdigest() != entry.digest:
            raise ModelRejected(
                f"{entry.name} hashes to {hasher.hexdigest()}, "
                f"the signed manifest says {entry.digest}"
            )

    def _switch(self, manifest: Manifest, entry: ArtefactEntry) -> InstalledModel:
        model = manifest.model
        new = PointerEntry(manifest.version, entry.name, entry.digest)
        pointer = self._read_pointer(model, strict=False)
        history = [] if pointer is None else [pointer[0], *pointer[1]]
        if pointer is None or pointer[0] != new:
            self._write_pointer(model, new, [e for e in history if e != new])
            logger.info(
                "model cache: %s version %d (%s) is current", model, new.version, new.artefact
            )
        return InstalledModel(
            model=model,
            version=manifest.version,
            artefact=entry.name,
            path=self._directory(model, manifest.version) / entry.name,
            digest=entry.digest,
            size=entry.size,
            manifest=manifest,
        )

    def _write_pointer(
        self, model: str, current: PointerEntry, history: list[PointerEntry]
    ) -> None:
        """Replace the pointer atomically, then prune versions beyond the newest ``keep``."""
        kept = set(self.versions(model)[-self._keep :]) | {current.version}
        candidates = dict.fromkeys(e for e in history if e != current and e.version in kept)
        previous = [e for e in candidates if self.has(model, e.version, e.artefact)]
        document = {**current.to_json(), "previous": [e.to_json() for e in previous]}
        data = json.dumps(document, sort_keys=True, indent=2).encode()
        write_atomically(self._current / f"{model}.json", data, self._hook)
        self._hook("pointer-written")
        for version in self.versions(model):
            if version not in kept:
                try:
                    self._discard(self._directory(model, version))
                except OSError as exc:  # the switch has happened; pruning is retried next time
                    logger.warning("model cache: cannot prune %s v%d: %s", model, version, exc)
        self._hook("pruned")

    def _discard(self, directory: Path) -> None:
        """Remove a version directory: renamed into staging first, so it vanishes at once."""
        trash = self._staging / f"discard-{secrets.token_hex(8)}"
        directory.rename(trash)
        fsync_directory(directory.parent)
        shutil.rmtree(trash, ignore_errors=True)

    def _read_pointer(
        self, model: str, *, strict: bool
    ) -> tuple[PointerEntry, tuple[PointerEntry, ...]] | None:
        path = self._current / f"{check_name('model name', model)}.json"
        try:
            raw = json.loads(path.read_bytes())
            if not isinstance(raw, dict) or not isinstance(raw.get("previous"), list):
                raise ConfigError("the pointer must be an object with a 'previous' list")
            return PointerEntry.from_json(raw), tuple(
                PointerEntry.from_json(e) for e in raw["previous"]
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # ConfigError and JSONDecodeError are ValueErrors
            if strict:
                raise ModelCorrupt(f"the pointer {path} is unreadable: {exc}") from exc
            logger.warning("model cache: ignoring the unreadable pointer %s: %s", path, exc)
            return None

    def _read_signed(self, directory: Path) -> SignedManifest:
        try:
            return SignedManifest.from_json(json.loads((directory / _MANIFEST_FILE).read_bytes()))
        except (OSError, ValueError) as exc:
            raise ModelCorrupt(f"the manifest in {directory} is unreadable: {exc}") from exc

    def _load(self, model: str, entry: PointerEntry) -> InstalledModel:
        """Return ``entry`` as an installed model after re-verifying everything on disk."""
        directory = self._directory(model, entry.version)
        where = f"{model} version {entry.version} ({entry.artefact})"
        try:
            manifest = verify_manifest(self._read_signed(directory), self._key)
        except ManifestInvalid as exc:
            raise ModelCorrupt(f"{where}: the installed manifest does not verify: {exc}") from exc
        artefact = next((a for a in manifest.artefacts if a.name == entry.artefact), None)
        if (manifest.model, manifest.version) != (model, entry.version) or artefact is None:
            raise ModelCorrupt(f"{where}: the installed manifest describes another model")
        if artefact.digest != entry.digest:
            raise ModelCorrupt(f"{where}: the pointer and the manifest disagree on the digest")
        path = directory / artefact.name
        try:
            size, digest = hash_file(path)
        except OSError as exc:
            raise ModelCorrupt(f"{where} cannot be read: {exc}") from exc
        if (size, digest) != (artefact.size, artefact.digest):
            raise ModelCorrupt(
                f"{where} is corrupt on disk: {size} bytes hashing to {digest}, expected "
                f"{artefact.size} bytes hashing to {artefact.digest}; roll back or reinstall"
            )
        return InstalledModel(
            model=model,
            version=entry.version,
            artefact=artefact.name,
            path=path,
            digest=digest,
            size=size,
            manifest=manifest,
        )

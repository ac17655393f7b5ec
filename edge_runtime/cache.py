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
An install is one transaction. Every byte it is given is read and checked
against the signed manifest first, including the bytes of a version that is
already installed (a bundle is never taken on trust because its version is
present); what is new is copied into a fresh staging directory while it is
hashed, fsynced, and only then renamed to ``versions/<model>/<version>`` (or
moved file by file into the version directory already there): a version
directory never holds unverified bytes, nor a companion without its model.
Then the pointer is replaced (temporary file, fsync, ``os.replace``, directory
fsync). An exception at any step (a digest that does not match, a full disk, a
``KeyboardInterrupt``) undoes the steps already taken, so the cache is as it was;
a SIGKILL or power cut leaves the pointer naming the old or the new version,
both complete, and the next open removes the staging leftovers.

Blue-green: the version an install or rollback switches away from is never
pruned, whatever ``keep`` says, so a rollback after an upgrade is a pointer swap
that needs no network.

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
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path

from edge_runtime.cache_records import (
    InstalledModel,
    InstallOutcome,
    InstallReport,
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
    ArtefactFormat,
    Manifest,
    ManifestInvalid,
    SignedManifest,
    check_digest,
    key_id_for,
    verify_manifest,
)
from fedge.errors import ConfigError, StorageError

__all__ = [
    "InstallOutcome",
    "InstallReport",
    "InstalledModel",
    "ModelCache",
    "ModelCorrupt",
    "ModelRejected",
    "PointerEntry",
]

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
        (staging directories, pointer temporaries, stale downloads, version
        directories with no model in them) are removed here.
    trusted_key
        The store's raw 32-byte Ed25519 public key; every manifest must verify with it.
    keep
        How many of the newest versions of each model stay installed (the current
        one, and the one a rollback would switch to, are always kept as well).
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
        for directory in self._partial_versions():
            logger.warning("model cache: removing %s, which holds no model", directory)
            shutil.rmtree(directory)
            removed += 1
        if removed:
            logger.info("model cache: removed %d leftovers of interrupted installs", removed)

    def _partial_versions(self) -> list[Path]:
        """Return version directories no pointer names that hold no model to serve.

        Older fedge versions staged a companion (``drift-reference.json``) into its
        version directory before the model was verified; a failed install left that
        directory behind, listed as installed.
        """
        partial = []
        for model_directory in self._versions.iterdir():
            try:
                pointer = self._read_pointer(model_directory.name, strict=False)
            except ConfigError:  # not a model name: not ours to remove
                continue
            named = set() if pointer is None else {e.version for e in (pointer[0], *pointer[1])}
            for directory in model_directory.iterdir() if model_directory.is_dir() else ():
                unnamed = directory.name.isdigit() and int(directory.name) not in named
                if unnamed and not self._servable(directory):
                    partial.append(directory)
        return partial

    def _servable(self, directory: Path) -> bool:
        try:
            manifest = self._read_signed(directory).manifest
        except ModelCorrupt:
            return False
        return any(
            a.format is not ArtefactFormat.JSON and (directory / a.name).is_file()
            for a in manifest.artefacts
        )

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
        source: Path | None,
        *,
        companions: Mapping[str, Path | None] | None = None,
        allow_downgrade: bool = False,
    ) -> InstallReport:
        """Verify an artefact (and its companions) against ``signed``, install it, make it current.

        Parameters
        ----------
        signed
            The version's signed manifest; it must verify with the trusted key.
        artefact_name
            Which of the manifest's artefacts is the model to serve.
        source
            The artefact's bytes (read and verified, even when this version is
            installed already; copied only if the cache lacks a verified copy), or
            ``None`` to use the copy in the cache (re-hashed first).
        companions
            Other artefacts of the version to install with it (name -> source, or
            ``None`` for the copy in the cache), such as ``drift-reference.json``.
        allow_downgrade
            Accept a version older than the current one.

        Returns
        -------
        InstallReport
            What was done: installed, re-activated or already current; the bytes
            verified and written; the version kept for rollback.

        Raises
        ------
        ModelRejected
            If the signature, a size or a SHA-256 does not match, an artefact is not
            in the manifest, the model is a JSON document, a ``None`` source has no
            copy in the cache, or the version is an unallowed downgrade.
        ModelCorrupt
            If a ``None`` source's copy in the cache no longer verifies.
        ConfigError
            If the model is also named among its companions.
        StorageError
            If a source cannot be read or the cache cannot be written.

        Notes
        -----
        Whatever fails, even a ``KeyboardInterrupt``, the cache is left as it was:
        the previous model stays current and nothing new stays on disk. Once the
        pointer names the new version the install has happened; pruning old
        versions comes after, and one it cannot remove is retried next time.
        """
        manifest = self._verified(signed)
        entry = self._entry(manifest, artefact_name)
        if entry.format is ArtefactFormat.JSON:
            raise ModelRejected(f"{entry.name} is a json document, not a model to serve")
        parts: dict[str, tuple[ArtefactEntry, Path | None]] = {entry.name: (entry, source)}
        for name, path in (companions or {}).items():
            if name in parts:
                raise ConfigError(f"{name} is the model; it cannot be its own companion")
            parts[name] = (self._entry(manifest, name), path)
        with self._locked():
            self.check_upgrade(manifest, allow_downgrade=allow_downgrade)
            return self._transact(signed, entry, parts)

    def activate(
        self,
        signed: SignedManifest,
        artefact_name: str,
        *,
        companions: tuple[str, ...] = (),
        allow_downgrade: bool = False,
    ) -> InstallReport:
        """Make an already installed artefact current, after re-verifying it: a pointer swap.

        Raises
        ------
        ModelRejected
            As :meth:`install`, or if the artefact is not installed.
        ModelCorrupt
            If the installed copy no longer verifies.
        """
        return self.install(
            signed,
            artefact_name,
            None,
            companions=dict.fromkeys(companions),
            allow_downgrade=allow_downgrade,
        )

    def missing(self, signed: SignedManifest, names: list[str]) -> list[str]:
        """Return those of ``names`` the cache holds no verified copy of (under this manifest)."""
        manifest = self._verified(signed)
        directory = self._directory(manifest.model, manifest.version)
        same = directory.is_dir() and self._same_manifest(directory, signed)
        return [
            name
            for name in names
            if not (same and self._hashes_to(directory / name, self._entry(manifest, name)))
        ]

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
                found = [
                    a
                    for a in signed.manifest.artefacts
                    if a.format is not ArtefactFormat.JSON and self.has(model, to, a.name)
                ]
                if not found:
                    raise ModelCorrupt(f"{model} version {to} has no installed artefact")
                target = PointerEntry(to, found[0].name, found[0].digest)
                history = [e for e in (current, *previous) if e is not None and e.version != to]
            else:
                raise ConfigError(f"{model} version {to} is not installed: {self.versions(model)}")
            installed = self._load(model, target)
            kept, _ = self._write_pointer(model, target, history)
            self._prune(model, kept)
            logger.info("model cache: %s rolled back to version %d", model, target.version)
            return installed

    def _verified(self, signed: SignedManifest) -> Manifest:
        try:
            return verify_manifest(signed, self._key)
        except ManifestInvalid as exc:
            raise ModelRejected(f"refusing {signed.manifest.model}: {exc}") from exc

    @staticmethod
    def _entry(manifest: Manifest, name: str) -> ArtefactEntry:
        entry = next((a for a in manifest.artefacts if a.name == name), None)
        if entry is None:
            names = sorted(a.name for a in manifest.artefacts)
            raise ModelRejected(f"{name!r:.80} is not in the manifest (artefacts: {names})")
        return entry

    @staticmethod
    def _hashes_to(path: Path, entry: ArtefactEntry) -> bool:
        try:
            return path.is_file() and hash_file(path) == (entry.size, entry.digest)
        except OSError:
            return False

    def _transact(
        self,
        signed: SignedManifest,
        entry: ArtefactEntry,
        parts: dict[str, tuple[ArtefactEntry, Path | None]],
    ) -> InstallReport:
        """Verify every part, put what is new in place, switch; undo all of it on any failure."""
        manifest = signed.manifest
        model, directory = manifest.model, self._directory(manifest.model, manifest.version)
        same = directory.is_dir() and self._same_manifest(directory, signed)
        before = self._read_pointer(model, strict=False)
        new = PointerEntry(manifest.version, entry.name, entry.digest)
        switch = before is None or before[0] != new
        transaction = Path(tempfile.mkdtemp(prefix="install-", dir=self._staging))
        undo: list[Callable[[], object]] = []
        try:
            document = json.dumps(signed.to_json(), sort_keys=True, indent=2).encode()
            fresh = self._check_parts(transaction / "version", directory, same, parts, document)
            self._hook("staged")
            if fresh:
                self._place(transaction, directory, same, fresh, undo)
            self._hook("renamed")
            if switch:
                history = [] if before is None else [before[0], *before[1]]
                kept, previous = self._write_pointer(model, new, history, undo)
                logger.info(
                    "model cache: %s version %d (%s) is current", model, new.version, new.artefact
                )
            else:
                kept, previous = set(), [] if before is None else list(before[1])
        except BaseException:
            for step in reversed(undo):
                try:
                    step()
                except OSError as exc:  # pragma: no cover - a second failure while undoing
                    logger.error("model cache: cannot undo a step of a failed install: %s", exc)
            raise
        finally:
            shutil.rmtree(transaction, ignore_errors=True)
        if switch:
            self._prune(model, kept)
        return InstallReport(
            outcome=InstallOutcome.INSTALLED
            if entry.name in fresh
            else InstallOutcome.REACTIVATED
            if switch
            else InstallOutcome.ALREADY_CURRENT,
            current=InstalledModel(
                model=model,
                version=manifest.version,
                artefact=entry.name,
                path=directory / entry.name,
                digest=entry.digest,
                size=entry.size,
                manifest=manifest,
            ),
            replaced=before[0] if switch and before is not None else None,
            rollback=previous[0] if previous else None,
            verified_bytes=sum(part.size for part, _ in parts.values()),
            written_bytes=sum(parts[name][0].size for name in fresh),
            companions=tuple(name for name in parts if name != entry.name),
        )

    def _check_parts(
        self,
        staged: Path,
        directory: Path,
        same: bool,
        parts: dict[str, tuple[ArtefactEntry, Path | None]],
        document: bytes,
    ) -> list[str]:
        """Verify every part; copy what the cache lacks into ``staged``; return those names."""
        fresh: list[str] = []
        for name, (entry, source) in parts.items():
            installed = directory / name
            where = f"{directory.parent.name} v{directory.name} {name}"
            if source is None:
                if not (same and installed.is_file()):
                    raise ModelRejected(f"{where} is absent")
                if not self._hashes_to(installed, entry):
                    raise ModelCorrupt(f"{where} is corrupt on disk")
                continue
            if same and installed.is_file():
                self._copy_verified(source, None, entry)  # never take a source on trust
                if self._hashes_to(installed, entry):
                    continue
                logger.warning("model cache: %s is corrupt on disk; replacing it", installed)
            if not fresh:
                staged.mkdir()
                staged.chmod(0o755)  # artefacts are not secret: a runtime user may read them
                create_synced(staged / _MANIFEST_FILE, document, 0o444)
            self._copy_verified(source, staged / name, entry)
            fresh.append(name)
        if fresh:
            fsync_directory(staged)
        return fresh

    def _place(
        self,
        transaction: Path,
        directory: Path,
        same: bool,
        fresh: list[str],
        undo: list[Callable[[], object]],
    ) -> None:
        """Move the staged files into place, recording how to move each back."""
        staged = transaction / "version"
        if not same:
            if directory.exists():  # another manifest of this version: set aside until done
                logger.warning("model cache: %s conflicts with the new manifest", directory)
                directory.rename(transaction / "displaced")
                undo.append(partial((transaction / "displaced").rename, directory))
            if not directory.parent.is_dir():
                directory.parent.mkdir()
                undo.append(directory.parent.rmdir)
            staged.rename(directory)
            undo.append(partial(directory.rename, staged))
            fsync_directory(directory.parent)
            return
        for name in fresh:  # another artefact of a version already here: move files in
            target = directory / name
            if target.exists():  # a corrupt copy: set aside until done
                target.rename(transaction / f"aside-{name}")
                undo.append(partial((transaction / f"aside-{name}").rename, target))
            (staged / name).rename(target)
            undo.append(partial(target.rename, staged / name))
        fsync_directory(directory)

    def _same_manifest(self, directory: Path, signed: SignedManifest) -> bool:
        try:
            return self._read_signed(directory) == signed
        except ModelCorrupt:
            return False

    def _copy_verified(self, source: Path, destination: Path | None, entry: ArtefactEntry) -> None:
        """Hash ``source`` (copied to ``destination`` if given); check it against ``entry``."""
        hasher, size = hashlib.sha256(), 0
        try:
            reader = open(source, "rb", buffering=0)  # noqa: SIM115 - closed by the with below
        except OSError as exc:
            raise StorageError(f"cannot read {source}: {exc}") from exc
        with reader:
            fd = None
            if destination is not None:
                fd = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
            try:
                while (chunk := reader.read(_CHUNK)) and size <= entry.size:
                    hasher.update(chunk)
                    if fd is not None:
                        write_all(fd, chunk)
                    size += len(chunk)
                    self._hook("copying")
                if fd is not None:
                    os.fsync(fd)
            finally:
                if fd is not None:
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

    def _write_pointer(
        self,
        model: str,
        current: PointerEntry,
        history: list[PointerEntry],
        undo: list[Callable[[], object]] | None = None,
    ) -> tuple[set[int], list[PointerEntry]]:
        """Replace the pointer atomically; return the versions to keep and the new history.

        The newest ``keep`` versions are kept, and the current one, and the first
        entry of the history (what :meth:`rollback` switches to): blue-green.
        """
        candidates = [
            e
            for e in dict.fromkeys(history)
            if e != current and self.has(model, e.version, e.artefact)
        ]
        kept = set(self.versions(model)[-self._keep :]) | {current.version}
        kept |= {e.version for e in candidates[:1]}
        previous = [e for e in candidates if e.version in kept]
        document = {**current.to_json(), "previous": [e.to_json() for e in previous]}
        path = self._current / f"{model}.json"
        if undo is not None:
            try:
                old: bytes | None = path.read_bytes()
            except FileNotFoundError:
                old = None
            undo.append(partial(self._restore_pointer, path, old))
        data = json.dumps(document, sort_keys=True, indent=2).encode()
        write_atomically(path, data, self._hook)
        self._hook("pointer-written")
        return kept, previous

    def _restore_pointer(self, path: Path, old: bytes | None) -> None:
        """Put back the pointer an install replaced (undo; a no-op if it never was)."""
        if old is None:
            path.unlink(missing_ok=True)
        elif not path.is_file() or path.read_bytes() != old:
            write_atomically(path, old)

    def _prune(self, model: str, kept: set[int]) -> None:
        """Remove the versions of ``model`` not in ``kept``; a failure is retried next time."""
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

"""The model store: immutable, signed versions of global models with lineage, aliases and GC.

A version is published in two steps, so a crash at any point never shows a
partial version: (1) every artefact is written to the content-addressed blob
store (an interrupted write leaves at most an unreferenced object, which
:meth:`ModelStore.gc` removes); (2) one database transaction picks the next
version number, signs the manifest (the digests of every artefact, the
lineage, the metadata) with the store's Ed25519 key and inserts the version
and its artefacts. Two publishers racing for a number collide on the
``(model, version)`` unique constraint; the loser retries with the next one,
so numbers are never duplicated or skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, delete, func, select
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from edge_runtime.manifest import (
    OFFER_KEY,
    ArtefactEntry,
    Manifest,
    ManifestInvalid,
    SignedManifest,
    offer_of,
    verify_manifest,
)
from edge_runtime.release import ReleaseDirective, SignedDirective
from fedge.errors import ConfigError, StorageError
from fedge.version import code_version
from fl_server.audit import AuditEventKind, AuditLog
from fl_server.db.schema import AliasRow, ArtefactRow, ModelVersionRow
from fl_server.store.blobs import BlobCorrupt, BlobMissing, BlobStore
from fl_server.store.keys import StoreKey
from fl_server.store.records import (
    ArtefactStatus,
    ModelVersion,
    NewArtefact,
    VerifyReport,
    VersionInfo,
)

__all__ = [
    "ArtefactStatus",
    "ModelStore",
    "ModelVersion",
    "NewArtefact",
    "StoreTampered",
    "VerifyReport",
    "VersionInfo",
]

logger = logging.getLogger(__name__)

_VERIFIED_CACHE = 256  # versions whose stored form already verified (a small LRU-ish memo)
_ALIAS = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_PUBLISH_ATTEMPTS = 60
_BACKOFF_CAP_S = 0.25


def _plain(value: object) -> Any:
    """Turn the manifest's frozen mappings and tuples back into JSON values."""
    return json.loads(json.dumps(value, default=_unfreeze))


def _unfreeze(value: object) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON: {type(value).__name__}")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _finite_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if not math.isfinite(float(value)):
            raise ConfigError(f"metric {key!r} is not a finite number")
        out[str(key)] = float(value)
    return out


class StoreTampered(StorageError):  # noqa: N818 - reads as what happened
    """A stored version does not match its signed manifest (or the signature fails)."""

    def __init__(self, message: str, *, signature_ok: bool = True) -> None:
        super().__init__(message)
        self.signature_ok = signature_ok


_ROW_COLUMNS = ("run_id", "server_round", "dp_epsilon", "dp_delta", "participants")


def _checked_version(
    signed: SignedManifest, row: ModelVersionRow, rows: Sequence[ArtefactRow]
) -> ModelVersion:
    """Return the version with the signed statuses, refusing an index that disagrees.

    Every searchable column of the version row and every artefact row must say what
    the signed manifest says; a missing artefact row is damage, not a crash.
    """
    manifest = signed.manifest
    where = f"{row.model} v{row.version}"
    for column in _ROW_COLUMNS:
        stored, signed_value = getattr(row, column), manifest.metadata.get(column)
        if stored != signed_value:
            raise StoreTampered(
                f"{where}: the database says {column}={stored!r} but the signed manifest says "
                f"{signed_value!r}: the store's index was tampered with"
            )
    by_name = {a.name: a for a in rows}
    names = [a.name for a in manifest.artefacts]
    if sorted(by_name) != sorted(names):
        missing = sorted(set(names) - set(by_name))
        extra = sorted(set(by_name) - set(names))
        raise StoreTampered(
            f"{where}: the database's artefact rows do not match the signed manifest "
            f"(missing {missing}, not in the manifest {extra}): the store's index was "
            "tampered with"
        )
    for entry in manifest.artefacts:
        stored_row = by_name[entry.name]
        if (stored_row.digest, stored_row.size, stored_row.format, stored_row.precision) != (
            entry.digest,
            entry.size,
            entry.format.value,
            entry.precision.value,
        ):
            raise StoreTampered(
                f"{where}: the database's row of {entry.name} differs from the signed "
                "manifest: the store's index was tampered with"
            )
    offers = offer_of(manifest)
    if offers is None:  # signed before statuses were signed: the database is all there is
        return ModelVersion(
            signed=signed,
            statuses={a.name: a.status for a in rows},
            quality={a.name: json.loads(a.quality) for a in rows},
            statuses_signed=False,
        )
    for name, offer in offers.items():
        stored_row = by_name[name]
        try:
            quality = json.loads(stored_row.quality)
        except ValueError:
            quality = None
        if stored_row.status != offer.status.value or quality != dict(offer.quality):
            raise StoreTampered(
                f"{where}: the database's status or quality of {name} differs from the signed "
                "manifest: the store's index was tampered with"
            )
    return ModelVersion(
        signed=signed,
        statuses={name: offer.status.value for name, offer in offers.items()},
        quality={name: dict(offer.quality) for name, offer in offers.items()},
    )


class ModelStore:
    """Versions of global models in SQL, their artefacts in a :class:`BlobStore`.

    Parameters
    ----------
    engine
        The fedge database (SQLite or PostgreSQL), already migrated.
    blobs
        Where artefact bytes live (content-addressed).
    key
        The store's signing key.
    audit
        Publishes, alias moves and garbage collections are appended here.
    """

    def __init__(
        self, engine: Engine, blobs: BlobStore, key: StoreKey, *, audit: AuditLog | None = None
    ) -> None:
        if audit is not None and audit.engine is not engine:
            raise ConfigError("the store's audit log must live in the store's own database")
        self._engine = engine
        self.blobs = blobs
        self._key = key
        self._audit = audit
        self._verified: dict[bytes, ModelVersion] = {}
        self._verified_lock = threading.Lock()

    def _event(
        self,
        session: Session,
        kind: AuditEventKind,
        payload: dict[str, Any],
        run_id: str | None,
    ) -> None:
        """Record ``kind`` in the caller's transaction: the change and its event commit together."""
        if self._audit is not None:
            self._audit.append_in(session, kind, payload, run_id=run_id)

    @property
    def engine(self) -> Engine:
        """The database the store (and its audit log) lives in."""
        return self._engine

    @property
    def public_key(self) -> bytes:
        """The store's Ed25519 public key (what devices verify manifests with)."""
        return self._key.public_key_bytes()

    def sign_directive(self, directive: ReleaseDirective) -> SignedDirective:
        """Sign a release directive with the store's key (what devices pinned)."""
        return self._key.sign_directive(directive)

    def publish(
        self,
        model: str,
        artefacts: Sequence[NewArtefact],
        *,
        parent: int | None = None,
        info: VersionInfo | None = None,
    ) -> ModelVersion:
        """Store ``artefacts`` as the next version of ``model``.

        Raises
        ------
        ConfigError
            If a name, the parent or the metadata is invalid.
        StorageError
            If the blobs or the database cannot be written.
        """
        if not artefacts:
            raise ConfigError("a version needs at least one artefact")
        info = info or VersionInfo()
        metadata = {**info.to_json(), "code_version": code_version()}
        metadata["metrics"] = _finite_metrics(info.metrics)
        artefacts = [replace(a, quality=_finite_metrics(a.quality)) for a in artefacts]
        # Status and measured quality are signed with the version: a database edit can
        # then neither withdraw a variant from devices nor dress up its accuracy.
        metadata[OFFER_KEY] = {
            a.name: {"status": a.status, "quality": dict(a.quality)} for a in artefacts
        }
        # Validate every name and the metadata before writing a single byte.
        Manifest(
            model=model,
            version=1,
            parent=None,
            artefacts=tuple(a.entry(digest="0" * 64, size=0) for a in artefacts),
            metadata=metadata,
            created_at=_now(),
        )
        entries: list[ArtefactEntry] = []
        for artefact in artefacts:
            ref = (
                self.blobs.put_file(artefact.data)
                if isinstance(artefact.data, Path)
                else self.blobs.put(artefact.data)
            )
            entries.append(artefact.entry(digest=ref.digest, size=ref.size))
        for attempt in range(_PUBLISH_ATTEMPTS):
            try:
                return self._insert(
                    model, entries, artefacts, parent=parent, info=info, metadata=metadata
                )
            except (IntegrityError, OperationalError):
                # Another publisher took the number (or the audit head; SQLite
                # may also just be busy): retry on a fresh transaction.
                logger.info("store: %s raced with another writer; retrying", model)
                # Jittered exponential backoff: eight publishers that collided once must
                # not collide again in lock-step (a loaded PostgreSQL ran out of a fixed,
                # linear budget of 20 attempts with 8 concurrent publishers).
                ceiling = min(_BACKOFF_CAP_S, 0.005 * 2 ** min(attempt, 8))
                time.sleep(ceiling * (0.5 + secrets.randbelow(1_000) / 2_000))
            except SQLAlchemyError as exc:
                raise StorageError(f"cannot publish {model}: {exc}") from exc
        raise StorageError(f"cannot publish {model}: too many concurrent publishers")

    def _insert(
        self,
        model: str,
        entries: list[ArtefactEntry],
        artefacts: Sequence[NewArtefact],
        *,
        parent: int | None,
        info: VersionInfo,
        metadata: dict[str, Any],
    ) -> ModelVersion:
        with Session(self._engine) as session, session.begin():
            latest = session.scalar(
                select(func.max(ModelVersionRow.version)).where(ModelVersionRow.model == model)
            )
            version = (latest or 0) + 1
            if parent is not None and not 1 <= parent < version:
                raise ConfigError(f"parent version {parent} of {model} does not exist")
            if parent is not None and self._row(session, model, parent) is None:
                raise ConfigError(f"parent version {parent} of {model} does not exist")
            manifest = Manifest(
                model=model,
                version=version,
                parent=parent,
                artefacts=tuple(entries),
                metadata=metadata,
                created_at=_now(),
            )
            signed = self._key.sign(manifest)
            row = ModelVersionRow(
                model=model,
                version=version,
                parent_version=parent,
                run_id=info.run_id,
                server_round=info.server_round,
                dp_epsilon=info.dp_epsilon,
                dp_delta=info.dp_delta,
                participants=info.participants,
                code_version=str(metadata["code_version"])[:64],
                created_at=manifest.created_at,
                manifest=json.dumps(signed.to_json(), sort_keys=True),
                signature=signed.signature.hex(),
                key_id=signed.key_id,
            )
            session.add(row)
            session.flush()
            for entry, artefact in zip(entries, artefacts, strict=True):
                session.add(
                    ArtefactRow(
                        version_id=row.id,
                        name=entry.name,
                        digest=entry.digest,
                        size=entry.size,
                        format=entry.format.value,
                        precision=entry.precision.value,
                        status=artefact.status,
                        quality=json.dumps(dict(artefact.quality), sort_keys=True),
                    )
                )
            session.flush()
            self._event(
                session,
                AuditEventKind.MODEL_PUBLISHED,
                {
                    "model": model,
                    "version": version,
                    "parent": parent,
                    "key_id": signed.key_id,
                    "artefacts": {a.name: a.digest for a in entries},
                    "rejected": [a.name for a in artefacts if a.rejected],
                },
                info.run_id,
            )
        return self._version(signed, artefacts)

    @staticmethod
    def _version(signed: SignedManifest, artefacts: Sequence[NewArtefact]) -> ModelVersion:
        return ModelVersion(
            signed=signed,
            statuses={a.name: a.status for a in artefacts},
            quality={a.name: dict(a.quality) for a in artefacts},
        )

    @staticmethod
    def _row(session: Session, model: str, version: int) -> ModelVersionRow | None:
        return session.scalars(
            select(ModelVersionRow).where(
                ModelVersionRow.model == model, ModelVersionRow.version == version
            )
        ).first()

    def _load(self, session: Session, row: ModelVersionRow) -> ModelVersion:
        rows = session.scalars(select(ArtefactRow).where(ArtefactRow.version_id == row.id)).all()
        # Everything the checks below read, as stored now: the same inputs that passed
        # before pass again, so a hit skips the parse and the signature check (the object
        # route asks this for every request of a fleet); any edit changes the key.
        key = hashlib.sha256(
            json.dumps(
                [
                    row.model,
                    row.version,
                    row.manifest,
                    [getattr(row, column) for column in _ROW_COLUMNS],
                    sorted(
                        (a.name, a.digest, a.size, a.format, a.precision, a.status, a.quality)
                        for a in rows
                    ),
                ],
                default=str,
            ).encode()
        ).digest()
        with self._verified_lock:
            cached = self._verified.get(key)
        if cached is not None:
            return cached
        version = self._verified_load(row, rows)
        with self._verified_lock:
            if len(self._verified) >= _VERIFIED_CACHE:
                self._verified.pop(next(iter(self._verified)))
            self._verified[key] = version
        return version

    def _verified_load(self, row: ModelVersionRow, rows: Sequence[ArtefactRow]) -> ModelVersion:
        try:
            signed = SignedManifest.from_json(json.loads(row.manifest))
        except (ValueError, ConfigError, ManifestInvalid) as exc:
            raise StoreTampered(
                f"{row.model} v{row.version}: stored manifest unreadable: {exc}",
                signature_ok=False,
            ) from exc
        signed_as = (signed.manifest.model, signed.manifest.version)
        if signed_as != (row.model, row.version):
            # Another version's (validly signed) manifest moved into this row: serving it
            # would freeze or roll back `latest` while every signature still verifies.
            raise StoreTampered(
                f"{row.model} v{row.version} holds the signed manifest of "
                f"{signed_as[0]} v{signed_as[1]}: the store's index was tampered with"
            )
        try:
            verify_manifest(signed, self.public_key)
        except ManifestInvalid as exc:
            raise StoreTampered(
                f"{row.model} v{row.version}: the stored manifest is refused: {exc}",
                signature_ok=False,
            ) from exc
        return _checked_version(signed, row, rows)

    def resolve(self, model: str, ref: int | str) -> int:
        """Return the version number ``ref`` names: a number, an alias, or ``latest``.

        Raises
        ------
        ConfigError
            If nothing of that name exists.
        """
        try:
            with Session(self._engine) as session:
                if isinstance(ref, int) or str(ref).isdigit():
                    version = int(ref)
                    if self._row(session, model, version) is None:
                        raise ConfigError(f"{model} has no version {version}")
                    return version
                if ref == "latest":
                    latest = session.scalar(
                        select(func.max(ModelVersionRow.version)).where(
                            ModelVersionRow.model == model
                        )
                    )
                    if latest is None:
                        raise ConfigError(f"no versions of {model}")
                    return int(latest)
                alias = session.get(AliasRow, (model, ref))
                if alias is None:
                    raise ConfigError(f"{model} has no alias {ref!r}")
                return alias.version
        except SQLAlchemyError as exc:
            raise StorageError(f"cannot read the model store: {exc}") from exc

    def get(self, model: str, ref: int | str = "latest") -> ModelVersion:
        """Return one version (by number, alias or ``latest``)."""
        version = self.resolve(model, ref)
        with Session(self._engine) as session:
            row = self._row(session, model, version)
            assert row is not None
            return self._load(session, row)

    def versions(self, model: str | None = None) -> list[ModelVersion]:
        """Return every version (of one model), oldest first."""
        query = select(ModelVersionRow).order_by(ModelVersionRow.model, ModelVersionRow.version)
        if model is not None:
            query = query.where(ModelVersionRow.model == model)
        try:
            with Session(self._engine) as session:
                return [self._load(session, row) for row in session.scalars(query).all()]
        except SQLAlchemyError as exc:
            raise StorageError(f"cannot read the model store: {exc}") from exc

    def is_offered(self, digest: str) -> bool:
        """Say whether some version's signed manifest offers an artefact with this digest.

        The database only narrows the search: a row flipped to ``offered`` by hand does
        not make a rejected variant fetchable, since the signed status decides.
        """
        query = (
            select(ModelVersionRow)
            .join(ArtefactRow, ArtefactRow.version_id == ModelVersionRow.id)
            .where(ArtefactRow.digest == digest)
            .distinct()
        )
        try:
            with Session(self._engine) as session:
                for row in session.scalars(query).all():
                    try:
                        version = self._load(session, row)
                    except StorageError as exc:
                        logger.error("store: %s", exc)
                        continue
                    if any(a.digest == digest for a in version.offered()):
                        return True
                return False
        except SQLAlchemyError as exc:
            raise StorageError(f"cannot read the model store: {exc}") from exc

    def aliases(self, model: str) -> dict[str, int]:
        """Return the model's aliases and the versions they point at."""
        with Session(self._engine) as session:
            rows = session.scalars(select(AliasRow).where(AliasRow.model == model)).all()
            return {row.alias: row.version for row in rows}

    def tag(
        self,
        model: str,
        alias: str,
        version: int,
        *,
        override: str | None = None,
        overridden: Sequence[str] = (),
    ) -> int | None:
        """Point ``alias`` at ``version`` in one transaction; return the version it left.

        Parameters
        ----------
        model, alias, version
            The move.
        override
            A release manager's reason for moving a protected alias the release
            policy refused (:func:`fl_server.store.release_policy.release`); recorded
            as ``override`` in the ``store.alias_moved`` event, with the refusals it
            overrode as ``overridden``.
        overridden
            Those refusals (only with ``override``).

        Raises
        ------
        ConfigError
            If the alias name is invalid, the version does not exist, or the
            override is empty, longer than 1,000 characters or missing its reason.
        """
        if not _ALIAS.fullmatch(alias) or alias == "latest":
            raise ConfigError(f"alias {alias!r}: lowercase letters, digits, - and _, not 'latest'")
        if override is not None and not 0 < len(override.strip()) <= 1000:
            raise ConfigError("an override needs a reason of 1 to 1,000 characters")
        if overridden and override is None:
            raise ConfigError("refusals can only be overridden with a reason (override)")
        payload: dict[str, Any] = {"model": model, "alias": alias, "version": version}
        if override is not None:
            payload |= {"override": override.strip(), "overridden": list(overridden)}
        with Session(self._engine) as session, session.begin():
            if self._row(session, model, version) is None:
                raise ConfigError(f"{model} has no version {version}")
            row = session.get(AliasRow, (model, alias), with_for_update=True)
            previous = None if row is None else row.version
            if row is None:
                session.add(AliasRow(model=model, alias=alias, version=version, updated_at=_now()))
            else:
                row.version, row.updated_at = version, _now()
            session.flush()
            self._event(
                session, AuditEventKind.ALIAS_MOVED, {**payload, "previous": previous}, None
            )
        return previous

    def ancestors(self, model: str, version: int) -> list[int]:
        """Return the lineage of ``version``: its parent, the parent's parent, ..."""
        chain: list[int] = []
        with Session(self._engine) as session:
            row = self._row(session, model, version)
            if row is None:
                raise ConfigError(f"{model} has no version {version}")
            while row is not None and row.parent_version is not None:
                chain.append(row.parent_version)
                row = self._row(session, model, row.parent_version)
        return chain

    def diff(self, model: str, a: int | str, b: int | str) -> dict[str, Any]:
        """Return what differs between two versions: metadata values and artefact digests.

        ``{"metadata": {key: [a's, b's]}, "artefacts": {name: [a's digest, b's digest]}}``
        (None where one side lacks the key or the artefact).
        """
        left, right = self.get(model, a).manifest, self.get(model, b).manifest
        # The signed offer is per artefact: its differences are not version metadata.
        keys = (set(left.metadata) | set(right.metadata)) - {OFFER_KEY}
        metadata = {
            key: [_plain(left.metadata.get(key)), _plain(right.metadata.get(key))]
            for key in sorted(keys)
            if _plain(left.metadata.get(key)) != _plain(right.metadata.get(key))
        }
        digests_a = {x.name: x.digest for x in left.artefacts}
        digests_b = {x.name: x.digest for x in right.artefacts}
        artefacts = {
            name: [digests_a.get(name), digests_b.get(name)]
            for name in sorted(set(digests_a) | set(digests_b))
            if digests_a.get(name) != digests_b.get(name)
        }
        return {"metadata": metadata, "artefacts": artefacts}

    def verify(self, model: str, ref: int | str = "latest") -> VerifyReport:
        """Check the manifest's signature with the store's key and re-hash every artefact."""
        try:
            stored = self.get(model, ref)
        except StoreTampered as exc:
            return VerifyReport(
                model=model,
                version=self.resolve(model, ref),
                signature_ok=exc.signature_ok,
                artefacts={},
                problem=str(exc),
            )
        signature_ok = True
        results: dict[str, str] = {}
        for entry in stored.manifest.artefacts:
            try:
                self.blobs.verify(entry.digest)
                results[entry.name] = "ok"
            except BlobMissing:
                results[entry.name] = "missing"
            except BlobCorrupt:
                results[entry.name] = "corrupt"
        return VerifyReport(
            model=model,
            version=stored.manifest.version,
            signature_ok=signature_ok,
            artefacts=results,
        )

    def record_download(self, device: str, digest: str, size: int, *, ranged: bool) -> None:
        """Append a ``store.downloaded`` event: ``device`` has received all of object ``digest``.

        Parameters
        ----------
        device
            The enrolled device's id (verified from its signed request).
        digest
            The object's SHA-256.
        size
            The bytes sent in the response that completed it (the whole object, or the
            tail a resumed download asked for).
        ranged
            Whether that response was a range (a resumed download).

        Raises
        ------
        ConfigError, StorageError
            If the event is malformed or cannot be written (nothing without an audit log).
        """
        if self._audit is not None:
            self._audit.append(
                AuditEventKind.MODEL_DOWNLOADED,
                {"device": device, "digest": digest, "bytes": size, "range": ranged},
            )

    def gc(
        self, *, keep_last: int, dry_run: bool = False, min_age_s: float = 3600.0
    ) -> dict[str, int]:
        """Delete old versions, then the objects no version references.

        Versions beyond the newest ``keep_last`` of each model go, unless an alias
        names them. An unreferenced object younger than ``min_age_s`` stays: it
        may belong to a publish whose transaction has not committed yet. The blob
        store's temporary files untouched for ``min_age_s`` (writes a killed
        publisher abandoned) go too.

        Returns counts: ``versions_deleted``, ``objects_deleted``,
        ``temporaries_deleted`` (what would go, with ``dry_run``); the audit event
        carries them.
        """
        if keep_last < 1:
            raise ConfigError(f"keep_last must be >= 1, got {keep_last}")
        doomed: list[int] = []
        cutoff = time.time() - min_age_s
        # No row ever names a temporary file, so they go first, outside the transaction,
        # and the count is exactly what was removed.
        temporaries = self.blobs.remove_stale_temporaries(min_age_s, dry_run=dry_run)
        # Objects are listed and stat'ed before the transaction, so the database is
        # not held (on SQLite: write-locked against publishers) during the walk.
        aged = [digest for digest in self.blobs.digests() if self._older_than(digest, cutoff)]
        with Session(self._engine) as session, session.begin():
            aliased = {(a.model, a.version) for a in session.scalars(select(AliasRow))}
            rows = session.scalars(
                select(ModelVersionRow).order_by(
                    ModelVersionRow.model, ModelVersionRow.version.desc()
                )
            ).all()
            seen: dict[str, int] = {}
            for row in rows:
                seen[row.model] = seen.get(row.model, 0) + 1
                if seen[row.model] > keep_last and (row.model, row.version) not in aliased:
                    doomed.append(row.id)
            if doomed and not dry_run:
                session.execute(delete(ArtefactRow).where(ArtefactRow.version_id.in_(doomed)))
                session.execute(delete(ModelVersionRow).where(ModelVersionRow.id.in_(doomed)))
            referenced = set(session.scalars(select(ArtefactRow.digest)))
            unreferenced = [digest for digest in aged if digest not in referenced]
            counts = {
                "versions_deleted": len(doomed),
                "objects_deleted": len(unreferenced),
                "temporaries_deleted": temporaries,
            }
            if not dry_run:
                self._event(
                    session, AuditEventKind.STORE_GC, {"keep_last": keep_last, **counts}, None
                )
        if not dry_run:
            # After the commit: a crash here leaves unreferenced objects, which the
            # next collection removes; a referenced object is never deleted.
            for digest in unreferenced:
                # Checked again: a publish may have stored these bytes anew since the walk.
                if self._older_than(digest, cutoff):
                    self.blobs.delete(digest)
        return counts

    def _older_than(self, digest: str, cutoff: float) -> bool:
        try:
            return self.blobs.stored_at(digest) <= cutoff
        except BlobMissing:  # removed meanwhile (another collection)
            return False

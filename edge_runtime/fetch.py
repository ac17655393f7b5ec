"""Fetch signed models from ``fedge store serve`` over HTTPS into the device's model cache.

Every request is signed with the device's enrolment identity
(:mod:`secure_agg.request_auth`) and goes over TLS to a server whose certificate
must chain to the CA file the device was provisioned with; there is no plain-HTTP
mode. Nothing the server says is trusted: :meth:`StoreClient.sync` verifies the
manifest's signature with the store key the cache trusts before it downloads a
byte, chooses only among the artefacts the *signed* manifest offers (the
server's own ``offered`` list is an unsigned database column, used only for a
manifest signed before fedge signed the offer), checks every download against
the signed size and SHA-256, and the cache re-verifies everything on install.

Notes
-----
Downloads stream into ``<destination>.partial``; when one exists (an earlier
attempt, or a process that was killed) the client asks for the rest with
``Range: bytes=N-`` and hashes the bytes it already has first, so one pass over
the data verifies the whole object. A server that ignores the range (200) or
refuses it (416) makes the client start again from byte 0; a resumed download
that does not verify is discarded and fetched whole once more. Connection errors
and 5xx answers are retried with exponential backoff; 401 and 404 are not.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import math
import os
import re
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edge_runtime.cache import InstallReport, ModelCache, ModelCorrupt, ModelRejected
from edge_runtime.drift_reference import REFERENCE_ARTEFACT_NAME
from edge_runtime.manifest import (
    ManifestInvalid,
    SignedManifest,
    check_digest,
    offered_names,
    verify_manifest,
)
from fedge.errors import ConfigError, FedgeError, StorageError
from secure_agg.identity import NodeIdentity
from secure_agg.request_auth import authorization_header

__all__ = [
    "COMPANIONS",
    "DEFAULT_PREFER",
    "FetchError",
    "FetchNotFound",
    "FetchUnauthorized",
    "StoreClient",
    "SyncReport",
]

logger = logging.getLogger(__name__)

DEFAULT_PREFER = ("model-int8-static.onnx", "model-fp32.onnx")
# Artefacts installed beside the model when offered: the drift reference (fedge client infer).
COMPANIONS = (REFERENCE_ARTEFACT_NAME,)

_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_REF = re.compile(r"[A-Za-z0-9_\-]{1,64}")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
_CHUNK = 1 << 20
_MAX_DOCUMENT = 1 << 20  # a manifest or an error body; anything larger is refused


class FetchError(FedgeError, OSError):
    """The store could not be reached, or answered with an error or a malformed document."""


class FetchUnauthorized(FetchError):  # noqa: N818 - reads as what happened
    """The store refused the device's signed request (401)."""


class FetchNotFound(FetchError):  # noqa: N818 - reads as what happened
    """The store has no such model, version or offered object (404)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncReport:
    """What :meth:`StoreClient.sync` did.

    Attributes
    ----------
    install
        What the cache did (installed, re-activated, already current; the version
        kept for rollback; the bytes verified and written).
    ref
        The reference asked for (a number, an alias or ``latest``).
    offered
        The artefacts the choice was made among.
    offer_signed
        True if ``offered`` came from the signed manifest; False for a manifest
        signed before fedge signed the offer (the store's unsigned list was used).
    downloaded_bytes
        The bytes fetched from the store (0 when the cache already held them).
    """

    install: InstallReport
    ref: str
    offered: tuple[str, ...]
    offer_signed: bool
    downloaded_bytes: int

    def to_json(self) -> dict[str, Any]:
        """Return the report as JSON values."""
        return {
            **self.install.to_json(),
            "ref": self.ref,
            "offered": list(self.offered),
            "offer_signed": self.offer_signed,
            "downloaded_bytes": self.downloaded_bytes,
        }


class _Retry(Exception):  # noqa: N818 - control flow inside this module only
    """A failure worth another attempt (connection error, 5xx, a range to restart)."""


def _error_text(response: http.client.HTTPResponse) -> str:
    try:
        body = response.read(_MAX_DOCUMENT)
    except (OSError, http.client.HTTPException):
        return "(no readable body)"
    try:
        message = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        message = body[:200].decode("utf-8", "replace")
    return str(message)[:200]


class StoreClient:
    """A device's HTTPS client of one model store.

    Parameters
    ----------
    base_url
        ``https://host[:port][/prefix]`` of ``fedge store serve``.
    identity
        The device's enrolment identity; it signs every request.
    ca_file
        PEM certificates the server's TLS certificate must chain to.
    timeout_s
        Socket timeout of each connection attempt and read.
    retries
        How many times a connection error or 5xx answer is retried.
    backoff_s
        The first retry waits this long, each later one twice as long as the last.
    clock, sleep
        The time source (request timestamps) and the wait between retries.

    Raises
    ------
    ConfigError
        If the URL is not ``https://``, a number is out of range or the CA file
        cannot be loaded.
    """

    def __init__(
        self,
        base_url: str,
        *,
        identity: NodeIdentity,
        ca_file: Path,
        timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "https":
            raise ConfigError(
                f"the store URL must start with https:// (models are never fetched in the "
                f"clear), got {base_url!r:.80}"
            )
        try:
            port = parts.port or 443
        except ValueError:
            raise ConfigError(f"the store URL has an invalid port: {base_url!r:.80}") from None
        if not parts.hostname or parts.username or parts.password or parts.query or parts.fragment:
            raise ConfigError(
                "the store URL must name a host and carry no credentials, query or fragment, "
                f"got {base_url!r:.80}"
            )
        if not (isinstance(timeout_s, int | float) and math.isfinite(timeout_s) and timeout_s > 0):
            raise ConfigError(f"timeout_s must be a finite number > 0, got {timeout_s!r:.40}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ConfigError(f"retries must be an int >= 0, got {retries!r:.40}")
        if not (isinstance(backoff_s, int | float) and math.isfinite(backoff_s) and backoff_s >= 0):
            raise ConfigError(f"backoff_s must be a finite number >= 0, got {backoff_s!r:.40}")
        if not isinstance(identity, NodeIdentity):
            raise ConfigError("identity must be a secure_agg.identity.NodeIdentity")
        try:
            self._tls = ssl.create_default_context(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the CA file {ca_file}: {exc}") from exc
        self._tls.minimum_version = ssl.TLSVersion.TLSv1_2
        self._host, self._port, self._prefix = parts.hostname, port, parts.path.rstrip("/")
        self._identity, self._timeout_s = identity, float(timeout_s)
        self._retries, self._backoff_s = retries, float(backoff_s)
        self._clock, self._sleep = clock, sleep

    def _attempts(self, what: str) -> Iterator[int]:
        for attempt in range(self._retries + 1):
            if attempt:
                delay = self._backoff_s * 2 ** (attempt - 1)
                logger.info("store client: retrying %s in %.2f s", what, delay)
                self._sleep(delay)
            yield attempt

    def _request(
        self, target: str, headers: dict[str, str]
    ) -> tuple[http.client.HTTPSConnection, http.client.HTTPResponse]:
        """Send one signed GET; raise :class:`_Retry` if the connection fails."""
        connection = http.client.HTTPSConnection(
            self._host, self._port, context=self._tls, timeout=self._timeout_s
        )
        signature = authorization_header(
            self._identity, method="GET", target=target, timestamp=int(self._clock())
        )
        try:
            connection.request("GET", target, headers={**headers, "Authorization": signature})
            return connection, connection.getresponse()
        except ssl.SSLCertVerificationError as exc:
            connection.close()
            raise FetchError(f"the store's TLS certificate does not verify: {exc}") from exc
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise _Retry(f"cannot reach {self._host}:{self._port}: {exc}") from exc

    def _refuse(self, status: int, response: http.client.HTTPResponse, what: str) -> None:
        """Raise the error an unexpected status calls for (:class:`_Retry` for 5xx)."""
        message = _error_text(response)
        if status == 401:
            raise FetchUnauthorized(
                f"the store refused this device's request for {what} (401): is the device "
                "enrolled with the authority the store trusts, and its clock within 5 minutes?"
            )
        if status == 404:
            raise FetchNotFound(f"the store has no {what} (404: {message})")
        if status >= 500:
            raise _Retry(f"the store answered {status} for {what}: {message}")
        raise FetchError(f"the store answered {status} for {what}: {message}")

    def manifest(self, model: str, ref: str = "latest") -> tuple[SignedManifest, list[str]]:
        """Return a version's signed manifest (not yet verified) and its offered artefacts.

        Parameters
        ----------
        model
            The model's name.
        ref
            A version number, an alias or ``latest``.

        Raises
        ------
        ConfigError
            If ``model`` or ``ref`` is malformed.
        FetchError
            If the store cannot be reached, refuses, or answers a malformed document.
        """
        if not isinstance(model, str) or _NAME.fullmatch(model) is None:
            raise ConfigError(f"model must match [A-Za-z0-9_.-]{{1,64}}, got {model!r:.40}")
        if not isinstance(ref, str) or _REF.fullmatch(ref) is None:
            raise ConfigError(f"ref must be a number, an alias or 'latest', got {ref!r:.40}")
        what = f"manifest of {model}@{ref}"
        target = f"{self._prefix}/v1/models/{model}/manifest?ref={ref}"
        last = "no attempt was made"
        for _ in self._attempts(what):
            try:
                body = self._document(target, what)
            except _Retry as exc:
                last = str(exc)
                logger.warning("store client: %s", last)
                continue
            return self._parse_manifest(body, model, ref, what)
        raise FetchError(f"cannot fetch the {what} after {self._retries + 1} attempts: {last}")

    def _document(self, target: str, what: str) -> bytes:
        connection, response = self._request(target, {})
        try:
            if response.status != 200:
                self._refuse(response.status, response, what)
            try:
                return response.read(_MAX_DOCUMENT + 1)
            except (OSError, http.client.HTTPException) as exc:
                raise _Retry(f"the answer for {what} broke off: {exc}") from exc
        finally:
            connection.close()

    @staticmethod
    def _parse_manifest(
        body: bytes, model: str, ref: str, what: str
    ) -> tuple[SignedManifest, list[str]]:
        if len(body) > _MAX_DOCUMENT:
            raise FetchError(f"the {what} is larger than {_MAX_DOCUMENT} bytes")
        try:
            document = json.loads(body)
            if not isinstance(document, dict):
                raise ConfigError("the answer must be a JSON object")
            offered = document.pop("offered", None)
            if not isinstance(offered, list) or not all(isinstance(n, str) for n in offered):
                raise ConfigError("'offered' must be a list of artefact names")
            signed = SignedManifest.from_json(document)
        except ValueError as exc:  # ConfigError and JSONDecodeError are ValueErrors
            raise FetchError(f"the store answered a malformed {what}: {exc}") from exc
        manifest = signed.manifest
        names = {a.name for a in manifest.artefacts}
        if manifest.model != model or (ref.isdigit() and manifest.version != int(ref)):
            raise FetchError(
                f"the store answered the manifest of {manifest.model} v{manifest.version} "
                f"for {model}@{ref}"
            )
        if not set(offered) <= names:
            raise FetchError(f"the {what} offers artefacts it does not list: {sorted(offered)}")
        return signed, offered

    def download(self, digest: str, destination: Path, *, expected_size: int) -> None:
        """Download an object to ``destination``, resuming a partial download, and verify it.

        Parameters
        ----------
        digest
            The object's SHA-256 (from a verified manifest).
        destination
            Where the verified bytes end up (renamed into place only once they verify).
        expected_size
            The object's size in bytes (from the same manifest).

        Raises
        ------
        ModelRejected
            If the bytes do not hash to ``digest`` or have another size.
        FetchError
            If the store cannot be reached or refuses (:class:`FetchUnauthorized`,
            :class:`FetchNotFound`), after the retries.
        StorageError
            If ``destination`` cannot be written.
        """
        check_digest(digest)
        if isinstance(expected_size, bool) or not isinstance(expected_size, int):
            raise ConfigError(f"expected_size must be an int >= 0, got {expected_size!r:.40}")
        if expected_size < 0:
            raise ConfigError(f"expected_size must be an int >= 0, got {expected_size!r:.40}")
        partial = destination.with_name(destination.name + ".partial")
        what = f"object {digest}"
        last = "no attempt was made"
        try:
            for _ in self._attempts(what):
                try:
                    size, actual, resumed = self._fetch_into(partial, digest, expected_size)
                except _Retry as exc:
                    last = str(exc)
                    logger.warning("store client: %s", last)
                    continue
                if (size, actual) == (expected_size, digest):
                    with open(partial, "rb+") as written:
                        os.fsync(written.fileno())
                    partial.replace(destination)
                    return
                partial.unlink()
                if not resumed:
                    raise ModelRejected(
                        f"{what} from the store has {size} bytes hashing to {actual}; "
                        f"the signed manifest says {expected_size} bytes"
                    )
                last = "the resumed download did not verify; fetching it whole"
                logger.warning("store client: %s", last)
        except (ModelRejected, FetchError, StorageError):
            raise
        except OSError as exc:
            raise StorageError(f"cannot write {partial}: {exc}") from exc
        raise FetchError(f"cannot fetch {what} after {self._retries + 1} attempts: {last}")

    def _fetch_into(self, partial: Path, digest: str, expected: int) -> tuple[int, str, bool]:
        """Bring ``partial`` up to the end of one answer; return its size, SHA-256, resumed."""
        hasher, offset = hashlib.sha256(), 0
        if partial.exists() and partial.stat().st_size > expected:
            partial.unlink()  # longer than the object: cannot be a prefix of it
        if partial.exists():
            with open(partial, "rb", buffering=0) as existing:
                while chunk := existing.read(_CHUNK):
                    hasher.update(chunk)
                    offset += len(chunk)
            if offset == expected:  # complete already (killed before the rename)
                return offset, hasher.hexdigest(), True
        resumed = offset > 0
        headers = {"Range": f"bytes={offset}-"} if resumed else {}
        what = f"object {digest}"
        connection, response = self._request(f"{self._prefix}/v1/objects/{digest}", headers)
        try:
            status = response.status
            span = _CONTENT_RANGE.fullmatch(response.getheader("Content-Range") or "")
            if status == 416 or (
                status == 206
                and (span is None or (int(span[1]), int(span[3])) != (offset, expected))
            ):
                partial.unlink(missing_ok=True)
                raise _Retry(f"the store refused resuming {what} at byte {offset}; restarting")
            if status == 200 and resumed:
                logger.info("store client: %s came whole; restarting from byte 0", what)
                hasher, offset, resumed = hashlib.sha256(), 0, False
            elif status not in {200, 206}:
                self._refuse(status, response, what)
            announced = response.getheader("Content-Length")
            start = offset
            with open(partial, "r+b" if offset else "wb") as out:
                out.seek(offset)
                out.truncate()
                while offset <= expected:
                    try:
                        chunk = response.read(_CHUNK)
                    except (OSError, http.client.HTTPException) as exc:
                        raise _Retry(f"the download of {what} broke at {offset}: {exc}") from exc
                    if not chunk:
                        break
                    hasher.update(chunk)
                    out.write(chunk)
                    offset += len(chunk)
            # http.client ends a body cut short without an error: compare with what was announced.
            if announced is not None and announced.isdigit() and offset - start < int(announced):
                raise _Retry(f"the download of {what} broke off at byte {offset}")
        finally:
            connection.close()
        return offset, hasher.hexdigest(), resumed

    def _fetch_all(
        self, cache: ModelCache, signed: SignedManifest, names: list[str], into: dict[str, Path]
    ) -> int:
        """Download the artefacts ``names`` not in ``into`` yet; return the bytes fetched."""
        fetched = 0
        for entry in signed.manifest.artefacts:
            if entry.name in names and entry.name not in into:
                destination = cache.download_path(entry.digest)
                self.download(entry.digest, destination, expected_size=entry.size)
                into[entry.name] = destination
                fetched += entry.size
        return fetched

    def sync(
        self,
        cache: ModelCache,
        model: str,
        *,
        ref: str = "latest",
        prefer: Sequence[str] = DEFAULT_PREFER,
        allow_downgrade: bool = False,
    ) -> SyncReport:
        """Make the store's ``model@ref`` current in ``cache``, fetching what the cache lacks.

        Parameters
        ----------
        cache
            The device's model cache; its trusted key verifies the manifest.
        model, ref
            What to fetch (``ref``: a number, an alias or ``latest``).
        prefer
            Artefact names in order of preference; the first one offered is used.
            Offered companions (:data:`COMPANIONS`) are installed with it.
        allow_downgrade
            Accept a version older than the current one.

        Returns
        -------
        SyncReport
            What was fetched and what the cache did.

        Raises
        ------
        ModelRejected
            If the manifest's signature does not verify (nothing is downloaded),
            no preferred artefact is offered, the version is an unallowed
            downgrade, or the bytes do not match the manifest.
        FetchError
            If the store cannot be reached or refuses.

        Notes
        -----
        Whatever fails, the model that was current stays current. The offer is
        taken from the signed manifest when it carries one, so a store whose
        database was edited can neither move devices off a variant nor onto a
        rejected one.
        """
        if isinstance(prefer, str) or not prefer:
            raise ConfigError("prefer must be a non-empty sequence of artefact names")
        signed, listed = self.manifest(model, ref)
        try:
            manifest = verify_manifest(signed, cache.trusted_key)
        except ManifestInvalid as exc:
            raise ModelRejected(f"the store's manifest of {model}@{ref} is refused: {exc}") from exc
        signed_offer = offered_names(manifest)
        if signed_offer is None:
            logger.info(
                "store client: %s v%d carries no signed offer; using the store's unsigned list",
                model,
                manifest.version,
            )
        elif set(signed_offer) != set(listed):
            logger.warning(
                "store client: the store lists %s for %s v%d but the signed manifest offers %s; "
                "following the signed manifest",
                sorted(listed),
                model,
                manifest.version,
                sorted(signed_offer),
            )
        offered = listed if signed_offer is None else signed_offer
        name = next((n for n in prefer if n in offered), None)
        if name is None:
            raise ModelRejected(
                f"{model} v{manifest.version} offers none of {list(prefer)} (offered: {offered})"
            )
        cache.check_upgrade(manifest, allow_downgrade=allow_downgrade)
        companions = [c for c in COMPANIONS if c in offered and c != name]
        wanted = [name, *companions]
        sources: dict[str, Path] = {}  # what was downloaded; the rest is in the cache

        def install() -> InstallReport:
            return cache.install(
                signed,
                name,
                sources.get(name),
                companions={c: sources.get(c) for c in companions},
                allow_downgrade=allow_downgrade,
            )

        try:
            downloaded = self._fetch_all(cache, signed, cache.missing(signed, wanted), sources)
            try:
                report = install()
            except ModelCorrupt as exc:  # a cached copy rotted since it was checked
                if set(sources) == set(wanted):
                    raise
                logger.warning("store client: %s; fetching it again", exc)
                downloaded += self._fetch_all(cache, signed, wanted, sources)
                report = install()
        finally:
            for path in sources.values():
                path.unlink(missing_ok=True)
        logger.info(
            "store client: %s v%d (%s): %s",
            model,
            report.current.version,
            name,
            report.outcome.value,
        )
        return SyncReport(
            install=report,
            ref=ref,
            offered=tuple(offered),
            offer_signed=signed_offer is not None,
            downloaded_bytes=downloaded,
        )

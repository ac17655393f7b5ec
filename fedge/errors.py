"""The error hierarchy shared by every fedge package.

Every error fedge raises on purpose derives from :class:`FedgeError`; each
subclass also inherits the builtin that fits it, so callers that know nothing of
fedge can still catch ``ValueError`` or ``OSError``.

Notes
-----
This module is the one exception to the rule that ``fedge/`` holds only the
command-line root: it sits *below* every other package (it imports nothing but
the standard library), so the lowest layer (``secure_agg``) can raise fedge
errors too. The layering test checks that it stays dependency-free.
"""

from __future__ import annotations

__all__ = [
    "AuditIntegrityError",
    "ConfigError",
    "DataError",
    "FedgeError",
    "StorageError",
]


class FedgeError(Exception):
    """Base class of every error raised on purpose by fedge."""


class ConfigError(FedgeError, ValueError):
    """A configuration value is missing, malformed or out of range."""


class DataError(FedgeError, OSError):
    """A data set is missing, truncated or corrupt."""


class StorageError(FedgeError, OSError):
    """A database or file store could not be read or written."""


class AuditIntegrityError(FedgeError):
    """The audit chain does not verify: a record was edited, removed or reordered."""

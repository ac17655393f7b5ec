"""The enrolment authority's key at rest: one secret file in the fedge home directory.

Notes
-----
The file holds a format line and the 32-byte Ed25519 seed in hex. It is
written 0600 and refused when group or others can read or write it
(:mod:`edge_runtime.secret_files`). Whoever reads it can certify identities, so
it belongs on the machine that enrols devices, not on every coordinator.
"""

from __future__ import annotations

from pathlib import Path

from edge_runtime.secret_files import read_secret, write_secret
from fedge.errors import ConfigError
from secure_agg.crypto import KEY_BYTES
from secure_agg.identity import EnrolmentAuthority

__all__ = ["AUTHORITY_FILE_FORMAT", "read_authority", "write_authority"]

AUTHORITY_FILE_FORMAT = "fedge-enrolment-authority/v1"


def write_authority(path: Path | str, authority: EnrolmentAuthority) -> None:
    """Store ``authority``'s signing seed at ``path`` (mode 0600, atomically).

    Raises
    ------
    ConfigError
        If ``authority`` is not an :class:`EnrolmentAuthority` or ``path`` is a directory.
    StorageError
        If the file cannot be written.
    """
    if not isinstance(authority, EnrolmentAuthority) or len(authority.signing_seed) != KEY_BYTES:
        raise ConfigError("authority must be an EnrolmentAuthority with a 32-byte seed")
    text = f"{AUTHORITY_FILE_FORMAT}\n{authority.signing_seed.hex()}\n"
    write_secret(path, text.encode("ascii"))


def read_authority(path: Path | str) -> EnrolmentAuthority:
    """Load the authority stored at ``path`` by :func:`write_authority`.

    Raises
    ------
    ConfigError
        If the file is missing, exposed to group or others, or not an
        authority file (the message never quotes its content).
    StorageError
        If the file cannot be read.
    """
    lines = read_secret(path).decode("ascii", errors="replace").splitlines()
    if len(lines) != 2 or lines[0] != AUTHORITY_FILE_FORMAT:
        raise ConfigError(f"{path} is not a {AUTHORITY_FILE_FORMAT} file")
    try:
        seed = bytes.fromhex(lines[1])
    except ValueError:
        seed = b""
    if len(seed) != KEY_BYTES:
        raise ConfigError(f"{path} does not hold a {KEY_BYTES}-byte authority seed")
    return EnrolmentAuthority(signing_seed=seed)

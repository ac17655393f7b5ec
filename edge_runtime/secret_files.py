"""Secret files of a deployment (CA key, authority seed): written 0600, refused if exposed.

Notes
-----
POSIX only. A secret that group or others can read may already have leaked,
and one they can write may have been replaced (an attacker's CA key would let
them mint server certificates), so :func:`read_secret` refuses both instead of
warning: the operator fixes the mode and, if in doubt, rotates the key.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from fedge.errors import ConfigError, StorageError

__all__ = ["read_secret", "write_secret"]

_FILE_MODE = 0o600
_DIR_MODE = 0o700
_EXPOSED_BITS = stat.S_IRWXG | stat.S_IRWXO


def write_secret(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, readable and writable by its owner only.

    The bytes go to a temporary file created with mode 0600 beside ``path``,
    are flushed to disk and renamed over ``path``, so a reader sees the old
    secret or the new one, never a partial file. A missing parent directory is
    created with mode 0700.

    Parameters
    ----------
    path
        Where the secret lives.
    data
        The secret bytes.

    Raises
    ------
    ConfigError
        If ``data`` is not bytes or ``path`` is a directory.
    StorageError
        If the file cannot be written.
    """
    if not isinstance(data, bytes):
        raise ConfigError(f"a secret is bytes, got {type(data).__name__}")
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"secret file {target} is a directory")
    parent = target.parent
    try:
        if not parent.exists():
            parent.mkdir(mode=_DIR_MODE, parents=True)
            parent.chmod(_DIR_MODE)  # mkdir's mode is masked by the umask
        temporary = parent / f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        descriptor = os.open(
            temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, _FILE_MODE
        )
        try:
            with os.fdopen(descriptor, "wb") as handle:
                os.fchmod(handle.fileno(), _FILE_MODE)
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            temporary.replace(target)
        except BaseException:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise
        directory = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as exc:
        raise StorageError(f"cannot write secret file {target}: {exc.strerror}") from exc


def read_secret(path: Path | str) -> bytes:
    """Return the bytes of the secret file ``path`` after checking it is private.

    Parameters
    ----------
    path
        The secret file (a symbolic link is followed; the file it names is checked).

    Returns
    -------
    bytes
        The file's content.

    Raises
    ------
    ConfigError
        If the file is missing, is not a regular file, or is readable or
        writable by group or others; the message names the path and the fix.
    StorageError
        If the file exists but cannot be read.
    """
    target = Path(path)
    try:
        descriptor = os.open(target, os.O_RDONLY)
    except FileNotFoundError as exc:
        raise ConfigError(
            f"secret file {target} does not exist: create it with fedge or restore it"
        ) from exc
    except OSError as exc:
        raise StorageError(f"cannot read secret file {target}: {exc.strerror}") from exc
    # Check the opened file itself (fstat), not the path again: a swap between
    # the check and the read cannot slip an unchecked file in.
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise ConfigError(f"secret file {target} is not a regular file (a directory?)")
        if status.st_mode & _EXPOSED_BITS:
            mode = stat.S_IMODE(status.st_mode)
            raise ConfigError(
                f"secret file {target} is accessible to group or others (mode {mode:04o}): "
                f"run `chmod 600 {target}`"
            )
        with os.fdopen(os.dup(descriptor), "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise StorageError(f"cannot read secret file {target}: {exc.strerror}") from exc
    finally:
        os.close(descriptor)

"""Child processes that never outlive their parent.

A supervisor (``fedge server start``, ``fedge client start``) runs Flower's
SuperLink or SuperNode and fedge's gateway as child processes. A supervisor
killed with SIGKILL runs no clean-up code, so on Linux each child asks the
kernel to send it SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``);
elsewhere the children rely on the supervisor's normal shutdown.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "ProcessStartError",
    "console_script",
    "die_with_parent",
    "log_tail",
    "start_listening",
    "stop_on_signals",
    "stop_process",
]

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Set ``stop`` on SIGTERM or SIGINT while inside (main thread only; else a no-op).

    The previous handlers are restored on the way out.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _set(signum: int, frame: object) -> None:
        del frame
        logger.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    previous = {number: signal.signal(number, _set) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def die_with_parent() -> None:
    """Ask the kernel to SIGTERM this process when its parent exits (Linux; a no-op elsewhere).

    Pass as ``preexec_fn`` to :class:`subprocess.Popen`. The parent must be
    the process (and thread) that stays alive for the child's lifetime.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:  # pragma: no cover
        return
    # The parent may have died between fork and prctl: then we were reparented.
    if os.getppid() == 1:  # pragma: no cover - a race
        os.kill(os.getpid(), signal.SIGTERM)


def stop_process(process: subprocess.Popen[bytes], *, grace_s: float = 10.0) -> int:
    """Send SIGTERM, wait up to ``grace_s`` seconds, then SIGKILL; return the exit code."""
    if process.poll() is None:
        process.terminate()
        deadline = time.monotonic() + grace_s
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if process.poll() is None:
            process.kill()
    return process.wait()


def console_script(name: str) -> str:
    """Return the path of console script ``name`` next to this Python, else ``name`` (on PATH).

    A virtual environment's scripts (``flower-superlink``, ...) sit beside its
    ``python``; finding them there works without an activated environment.
    """
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.is_file() else name


class ProcessStartError(RuntimeError):
    """A child exited, or never listened on its port; the message ends with its log tail."""


def log_tail(path: Path, chars: int = 4000) -> str:
    """Return the last ``chars`` characters of a log file (``<no log>`` if unreadable)."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-chars:]
    except OSError:
        return "<no log>"


def start_listening(
    argv: list[str],
    *,
    address: str,
    log_file: Path,
    env: dict[str, str],
    timeout: float,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` (output appended to ``log_file``) and wait until ``address`` accepts.

    The child dies with this process (:func:`die_with_parent`).

    Raises
    ------
    ProcessStartError
        If the child exits first, or ``address`` stays closed for ``timeout`` seconds
        (the child is then stopped).
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        process = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=die_with_parent,  # noqa: PLW1509 - only prctl, no locks taken
        )
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    name = Path(argv[0]).name
    while True:
        if process.poll() is not None:
            raise ProcessStartError(
                f"{name} exited with code {process.returncode}:\n{log_tail(log_file)}"
            )
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return process
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop_process(process)
            raise ProcessStartError(
                f"{name} did not listen on {address} within {timeout} s:\n{log_tail(log_file)}"
            )
        time.sleep(0.1)

"""The tests-only SuperNode launcher: Flower's idle poll capped, nothing else changed."""

from __future__ import annotations

import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest

from fl_client import _supernode_main, supernode
from fl_client._supernode_main import POLL_ENV, cap_retry_backoff, cap_sleeps, poll_cap
from fl_client.supernode import SuperNodeConfig, start_supernode


def test_the_poll_cap_is_read_only_when_set() -> None:
    assert poll_cap({}) is None
    assert poll_cap({POLL_ENV: " "}) is None
    assert poll_cap({POLL_ENV: "0.25"}) == 0.25
    for bad in ("0", "-1", "inf", "nan", "soon"):
        with pytest.raises(ValueError, match=POLL_ENV if bad != "soon" else "float"):
            poll_cap({POLL_ENV: bad})


def test_only_the_module_s_sleeps_are_capped() -> None:
    module = types.ModuleType("flower_like")
    module.time = time  # type: ignore[attr-defined]
    cap_sleeps(module, 0.01)

    started = time.monotonic()
    module.time.sleep(3)
    assert time.monotonic() - started < 1
    assert module.time.monotonic is time.monotonic
    assert time.sleep.__module__ == "time"  # the real module is untouched


def test_flower_s_supernode_still_sleeps_through_the_time_module() -> None:
    # The launcher replaces `time` in this module: it must still be how Flower sleeps.
    from flwr.supernode import start_client_internal

    assert vars(start_client_internal)["time"] is time


def test_the_reconnection_backoff_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.retry import http_retry, make_simple_http_retry_invoker

    monkeypatch.setattr(http_retry, "MAX_RETRY_DELAY", vars(http_retry)["MAX_RETRY_DELAY"])
    waits = make_simple_http_retry_invoker().wait_gen_factory()
    assert max(next(waits) for _ in range(12)) > 1  # Flower's own: up to 20 s

    cap_retry_backoff(http_retry, 0.5)
    waits = make_simple_http_retry_invoker().wait_gen_factory()
    assert max(next(waits) for _ in range(12)) <= 0.5


def _config(tmp_path: Path) -> SuperNodeConfig:
    return SuperNodeConfig(
        superlink_address="127.0.0.1:1",
        root_certificates=tmp_path / "ca.pem",
        auth_private_key=tmp_path / "key",
        runtime_port=9094,
        log_file=tmp_path / "supernode.log",
    )


def _argv_started(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str]) -> Any:
    started: list[list[str]] = []

    def fake_start(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        started.append(argv)
        return subprocess.Popen([sys.executable, "-c", "pass"])

    monkeypatch.delenv(POLL_ENV, raising=False)
    monkeypatch.setattr(supernode, "start_listening", fake_start)
    start_supernode(_config(tmp_path), env=env).wait()
    return started[0]


def test_without_the_variable_flower_s_own_supernode_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    argv = _argv_started(monkeypatch, tmp_path, {})
    assert argv == _config(tmp_path).argv()
    assert Path(argv[0]).name == "flower-supernode"


def test_with_the_variable_the_same_arguments_go_through_the_launcher(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    argv = _argv_started(monkeypatch, tmp_path, {POLL_ENV: "0.5"})
    assert argv[:3] == [sys.executable, "-m", "fl_client._supernode_main"]
    assert argv[3:] == _config(tmp_path).argv()[1:]


def test_the_launcher_runs_flower_s_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.retry import http_retry
    from flwr.supernode import cli, start_client_internal

    seen: list[object] = []
    monkeypatch.setattr(
        cli, "flower_supernode", lambda: seen.append(vars(start_client_internal)["time"])
    )
    monkeypatch.setattr(start_client_internal, "time", time)
    monkeypatch.setattr(http_retry, "MAX_RETRY_DELAY", vars(http_retry)["MAX_RETRY_DELAY"])
    monkeypatch.setattr(sys, "argv", ["x", "--superlink", "127.0.0.1:1"])
    monkeypatch.setenv(POLL_ENV, "0.2")

    assert _supernode_main.main() == 0
    assert sys.argv == ["flower-supernode", "--superlink", "127.0.0.1:1"]
    assert seen and seen[0] is not time
    assert vars(http_retry)["MAX_RETRY_DELAY"] == 0.2

"""A simulation that stops, however it stops, ends its ServerApp: Ctrl-C always ends a run.

Flower's simulation runs the ServerApp on a non-daemon thread; a round waiting for
replies the stopped engine will never send kept that thread, and so the process, alive.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
import types
from collections.abc import Callable, Iterable

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run

from simulations import run as sim_run


class _SilentGrid(Grid):
    """Takes every message; no reply ever comes (the engine behind it is gone)."""

    def __init__(self) -> None:
        self.waiting = threading.Event()

    def set_run(self, run: Run) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Run:
        raise NotImplementedError

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return [1]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return ["m0"]  # whatever was sent: one message now waits for its reply

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.waiting.set()
        return []

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        raise AssertionError("fedge's rounds must wait through the stoppable Grid")


def _context() -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})


def _waiting_server_app(outcome: list[BaseException]) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            grid.send_and_receive([], timeout=None)  # a round without a timeout
        except BaseException as exc:
            outcome.append(exc)
            raise

    return app


def _flower_like_engine(
    grid: _SilentGrid, threads: list[threading.Thread], failure: BaseException
) -> Callable[[ServerApp], None]:
    """Start the ServerApp on a non-daemon thread, as Flower does; fail once it waits."""

    def engine(app: ServerApp) -> None:
        thread = threading.Thread(target=lambda: _swallow(app, grid))
        threads.append(thread)
        thread.start()
        assert grid.waiting.wait(10), "the ServerApp never waited for replies"
        raise failure

    return engine


def _swallow(app: ServerApp, grid: Grid) -> None:
    # Flower's ServerApp thread puts an exception in a queue and ends.
    with contextlib.suppress(Exception):
        app(grid, _context())


@pytest.mark.parametrize("failure", [KeyboardInterrupt(), RuntimeError("engine crashed")])
def test_a_stopped_engine_ends_the_serverapp_before_the_run_is_recorded(
    failure: BaseException,
) -> None:
    grid = _SilentGrid()
    threads: list[threading.Thread] = []
    outcome: list[BaseException] = []
    started = time.monotonic()

    with pytest.raises(type(failure)):
        sim_run._run_engine(
            _waiting_server_app(outcome), _flower_like_engine(grid, threads, failure)
        )

    assert time.monotonic() - started < 10
    [thread] = threads
    assert not thread.is_alive()
    assert [type(exc) for exc in outcome] == [sim_run._SimulationStoppedError]


def test_ctrl_c_that_cut_ray_s_import_short_is_still_an_interrupt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A KeyboardInterrupt inside `import ray` leaves a partially initialised module
    # behind; importing it again in the clean-up raised AttributeError, which hid the
    # interrupt (the run was recorded as failed and the process never exited).
    partial = types.ModuleType("ray")
    monkeypatch.setitem(sys.modules, "ray", partial)
    grid = _SilentGrid()
    threads: list[threading.Thread] = []

    with pytest.raises(KeyboardInterrupt):
        sim_run._run_engine(
            _waiting_server_app([]), _flower_like_engine(grid, threads, KeyboardInterrupt())
        )

    assert sys.modules["ray"] is partial
    assert not threads[0].is_alive()


def test_a_serverapp_the_engine_starts_after_the_stop_never_runs() -> None:
    ran: list[bool] = []
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        ran.append(True)

    wrapped: list[ServerApp] = []

    def engine(server_app: ServerApp) -> None:
        wrapped.append(server_app)
        raise KeyboardInterrupt  # before the ServerApp's thread got going

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        sim_run._run_engine(app, engine)
    assert time.monotonic() - started < 5  # nothing to wait for

    wrapped[0](_SilentGrid(), _context())  # the thread gets going after all
    assert ran == []


def test_a_round_with_a_timeout_returns_what_came_when_it_expires() -> None:
    stopped = threading.Event()
    grid = sim_run._StoppableGrid(_SilentGrid(), stopped)

    started = time.monotonic()
    assert list(grid.send_and_receive([], timeout=0.3)) == []
    assert 0.3 <= time.monotonic() - started < 3

    stopped.set()
    with pytest.raises(sim_run._SimulationStoppedError):
        grid.get_node_ids()

"""Run a fedge ServerApp inside the coordinator process against a SuperLink.

Flower's own executor (``flower-superexec``) starts one ``flwr-serverapp`` process per
run, which installs the run's FAB and imports the ServerApp from it. fedge instead keeps
the coordinator long-running: this module acquires the ServerApp task of a run from the
SuperLink Runtime API and calls a ``ServerApp`` object the caller built, using the same
protocol as Flower (``AcquireTask`` under SuperExec auth, ``PullTaskInput``, task
heartbeats, an ``HttpGrid``, ``PushTaskOutput`` with ``COMPLETED`` or ``FAILED``).

Notes
-----
Flower's process-level helpers end the process when something goes wrong: its HTTP retry
policy sends ``SIGINT`` to its own process on HTTP 401, its heartbeat does the same when
the SuperLink reports the task gone, and ``run_serverapp`` ends in ``flwr_exit``. None of
them is used here: retries give up with an exception, a lost task stops the Grid with an
exception, and nothing installs signal handlers or exits.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import httpx
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import ServerApp
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.retry import RetryInvoker, exponential
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.superlink.grid import HttpGrid

from fedge.errors import FedgeError

__all__ = [
    "ServerAppResult",
    "ServerAppRunError",
    "ServerAppStoppedError",
    "run_serverapp_in_process",
]

logger = logging.getLogger(__name__)

_ACQUIRE_TASK_METHOD = "/flwr.proto.Runtime/AcquireTask"
_RETRYABLE_STATUS = frozenset({502, 503, 504})


class ServerAppRunError(FedgeError, RuntimeError):
    """The ServerApp raised; the task was reported ``FAILED`` (the cause is chained)."""


class ServerAppStoppedError(FedgeError, RuntimeError):
    """The run was stopped (stop event set, or the SuperLink dropped the task)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerAppResult:
    """The outcome of one ServerApp run.

    Parameters
    ----------
    run_id : int
        The run that was served.
    context : Context
        The ServerApp's context after it returned.
    """

    run_id: int
    context: Context


def _retry_invoker(stop: threading.Event, max_time: float) -> RetryInvoker:
    """Retry transport errors and 502-504 for `max_time` s; give up on anything else."""

    def should_give_up(error: Exception) -> bool:
        if isinstance(error, httpx.HTTPStatusError):
            return error.response.status_code not in _RETRYABLE_STATUS
        text = str(error).lower()
        return stop.is_set() or any(word in text for word in ("certificate", "ssl", "tls"))

    def wait(seconds: float) -> None:
        stop.wait(seconds)  # a stop ends the backoff at once

    return RetryInvoker(
        wait_gen_factory=lambda: exponential(max_delay=5),
        recoverable_exceptions=(httpx.TransportError, httpx.HTTPStatusError),
        max_tries=None,
        max_time=max_time,
        should_giveup=should_give_up,
        wait_function=wait,
    )


class _InProcessGrid(HttpGrid):
    """An ``HttpGrid`` that polls faster, never signals its process, and can be stopped."""

    def __init__(
        self,
        *,
        runtime_address: str,
        root_certificates: bytes | None,
        token: str,
        poll_interval: float,
        stop: threading.Event,
        lost: threading.Event,
    ) -> None:
        super().__init__(
            runtime_address,
            insecure=root_certificates is None,
            root_certificates=root_certificates,
            token=token,
        )
        self._retry_invoker = _retry_invoker(stop, max_time=60.0)
        self._poll_interval = poll_interval
        self._stop = stop
        self._lost = lost

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push `messages`, then poll for their replies every ``poll_interval`` s."""
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            received = list(self.pull_messages(pending))
            replies.extend(received)
            pending.difference_update(m.metadata.reply_to_message_id for m in received)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            if self._stop.wait(self._poll_interval) or self._lost.is_set():
                raise ServerAppStoppedError("the run was stopped while waiting for replies")
        return replies


def _heartbeat_fn(client: RuntimeHttpClient, lost: threading.Event) -> Callable[[], bool]:
    """Return a task heartbeat that flags a lost task instead of raising SIGINT."""
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

    def heartbeat() -> bool:
        try:
            response = client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        except httpx.TransportError:
            return False
        except httpx.HTTPStatusError as err:
            if err.response.status_code in (503, 504):
                return False
            logger.warning("task heartbeat refused (HTTP %d)", err.response.status_code)
            lost.set()
            return True
        if not response.success:
            logger.warning("the SuperLink no longer knows this task")
            lost.set()
        return True

    return heartbeat


def _runtime_client(
    runtime_address: str,
    root_certificates: bytes | None,
    stop: threading.Event,
    *,
    token: str | None = None,
    superexec_auth_secret: bytes | None = None,
) -> RuntimeHttpClient:
    """Return a Runtime API client authenticated by a task token or the SuperExec secret."""
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        SuperExecAuthHttpInterceptor,
    )
    from flwr.supercore.protobuf.client import ProtobufClientInterceptor

    interceptors: list[ProtobufClientInterceptor] = []
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    if superexec_auth_secret:
        interceptors.append(
            SuperExecAuthHttpInterceptor(
                master_secret=superexec_auth_secret,
                protected_methods=frozenset({_ACQUIRE_TASK_METHOD}),
            )
        )
    return RuntimeHttpClient.from_server_address(
        server_address=runtime_address,
        insecure=root_certificates is None,
        root_certificates=root_certificates,
        interceptors=interceptors,
        retry_invoker=_retry_invoker(stop, max_time=60.0),
    )


def _acquire_task(
    runtime_address: str,
    root_certificates: bytes | None,
    superexec_auth_secret: bytes | None,
    stop: threading.Event,
    poll_interval: float,
) -> str | None:
    """Poll ``AcquireTask`` until a ServerApp task comes; return its token."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    client = _runtime_client(
        runtime_address, root_certificates, stop, superexec_auth_secret=superexec_auth_secret
    )
    request = AcquireTaskRequest(supported_task_types=[TaskType.SERVER_APP])
    try:
        while not stop.is_set():
            try:
                response = client.AcquireTask(request)
            except httpx.HTTPError as err:
                raise ServerAppRunError(f"AcquireTask on {runtime_address} failed: {err}") from err
            if response.HasField("task") and response.token:
                logger.info(
                    "acquired ServerApp task %d of run %d",
                    response.task.task_id,
                    response.task.run_id,
                )
                return str(response.token)
            stop.wait(poll_interval)
    finally:
        client.close()
    return None


def run_serverapp_in_process(
    server_app: ServerApp,
    *,
    runtime_address: str,
    root_certificates: bytes | None,
    superexec_auth_secret: bytes | None,
    stop: threading.Event,
    poll_interval: float = 0.2,
) -> ServerAppResult | None:
    """Acquire the next ServerApp task from the SuperLink and run `server_app` for it.

    Parameters
    ----------
    server_app : flwr.serverapp.ServerApp
        The app to run, built by the caller (never loaded from the run's FAB).
    runtime_address : str
        ``host:port`` of the SuperLink (its Runtime API shares the HTTPS port).
    root_certificates : bytes or None
        PEM CA of the SuperLink's certificate; ``None`` means plain HTTP.
    superexec_auth_secret : bytes or None
        The secret the SuperLink was started with (``--superexec-auth-secret-file``).
    stop : threading.Event
        Set it to stop waiting for a task, or to stop the app at its next poll.
    poll_interval : float
        Seconds between ``AcquireTask`` calls and between reply polls.

    Returns
    -------
    ServerAppResult or None
        The run id and final context; ``None`` if `stop` was set before a task came.

    Raises
    ------
    ServerAppStoppedError
        If `stop` was set, or the SuperLink dropped the task, while the app ran.
    ServerAppRunError
        If the SuperLink could not be reached for a task, or the app raised (the task
        is then reported ``FAILED`` with the reason).
    """
    from flwr.common.config import get_fused_config_from_fab
    from flwr.common.constant import SubStatus
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.runtime_pb2 import PullTaskInputRequest
    from flwr.supercore.task_identity import TaskIdentity

    token = _acquire_task(
        runtime_address, root_certificates, superexec_auth_secret, stop, poll_interval
    )
    if token is None:
        return None
    lost = threading.Event()  # set when the SuperLink no longer knows the task
    client = _runtime_client(runtime_address, root_certificates, stop, token=token)
    grid = _InProcessGrid(
        runtime_address=runtime_address,
        root_certificates=root_certificates,
        token=token,
        poll_interval=poll_interval,
        stop=stop,
        lost=lost,
    )
    heartbeat = HeartbeatSender(_heartbeat_fn(client, lost))
    context: Context | None = None
    status, details = SubStatus.FAILED, "ServerApp failed"
    try:
        heartbeat.start()
        task_input = client.PullTaskInput(PullTaskInputRequest())
        # Flower stamps the messages a ServerApp creates from this process-wide identity.
        TaskIdentity.task_id = task_input.task_id
        TaskIdentity.run_id = task_input.run.run_id
        TaskIdentity.node_id = task_input.context.node_id
        run = run_from_proto(task_input.run)
        context = context_from_proto(task_input.context)
        context.run_config = get_fused_config_from_fab(fab_from_proto(task_input.fab).content, run)
        grid.set_run(run)
        logger.info("running ServerApp for run %d", run.run_id)
        server_app(grid=grid, context=context)
        status, details = SubStatus.COMPLETED, ""
        context.state = RecordDict()  # Flower does not store the ServerApp state either
        return ServerAppResult(run_id=run.run_id, context=context)
    except ServerAppStoppedError:
        status, details = SubStatus.STOPPED, "stopped by the fedge coordinator"
        raise
    except Exception as err:
        details = f"ServerApp failed with exception: {err}"
        if stop.is_set() or lost.is_set() or _run_not_running(err):
            status = SubStatus.STOPPED
            raise ServerAppStoppedError("the run was stopped while the ServerApp ran") from err
        raise ServerAppRunError(details) from err
    finally:
        _finish(grid, client, heartbeat=heartbeat, context=context, status=status, details=details)


def _run_not_running(error: BaseException | None) -> bool:
    """Return whether `error` or one of its causes is the SuperLink's HTTP 401 or 403.

    Once a run stops (e.g. through the Control API) the Runtime API revokes the task's
    token (401) and refuses the run (403). Flower's own retry policy answers a 401 by
    sending ``SIGINT`` to its own process; here it ends the ServerApp as stopped.
    """
    while error is not None:
        if isinstance(error, httpx.HTTPStatusError) and error.response.status_code in (401, 403):
            return True
        error = error.__cause__ or error.__context__
    return False


def _finish(
    grid: HttpGrid,
    client: RuntimeHttpClient,
    *,
    heartbeat: HeartbeatSender,
    context: Context | None,
    status: str,
    details: str,
) -> None:
    """Push the task output once (no retries), stop the heartbeat, close the Grid."""
    from flwr.common.serde import context_to_proto
    from flwr.proto.runtime_pb2 import PushTaskOutputRequest

    if heartbeat.is_running:
        heartbeat.stop()
    request = PushTaskOutputRequest(
        context=context_to_proto(context) if context is not None else None,
        sub_status=status,
        details=details,
    )
    try:
        client.PushTaskOutput(request)
        logger.info("ServerApp task finished: %s", status)
    except httpx.HTTPError as err:
        logger.warning("could not push the ServerApp task output: %s", err)
    client.close()
    grid.close()

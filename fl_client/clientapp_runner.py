"""Serve a device's own ClientApp, long-running, from its SuperNode's Runtime API.

Flower's executor starts a ``flwr-clientapp`` process per message, which installs the
run's FAB, imports the ClientApp from it, handles the message and exits (and so imports
torch again for every message). fedge runs one executor per device instead: it acquires
each ClientApp task from the SuperNode (``AcquireTask`` under SuperExec auth), pulls the
message and the run's context, calls the ClientApp object the device built, and pushes
the reply and the updated context, so ``context.state`` persists across a run's messages.

Notes
-----
Trust boundary: the device never installs, imports or executes anything from the
server's FAB. Flower's task input carries the FAB, but here it is dropped unread; the
device always runs its own installed ClientApp, with its own device policy, whatever app
the server names.

Flower's process-level helpers end the process when something goes wrong (its HTTP retry
policy sends ``SIGINT`` to its own process on HTTP 401, its heartbeat does the same when
a task is gone, ``run_clientapp`` ends in ``flwr_exit``). None of them is used here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import httpx
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.retry import RetryInvoker, exponential
from flwr.supercore.runtime import RuntimeHttpClient

__all__ = ["serve_clientapp_in_process"]

logger = logging.getLogger(__name__)

_PULL_MAX_TIME_S = 120.0
_PULL_MAX_TRIES = 60
_ACQUIRE_TASK_METHOD = "/flwr.proto.Runtime/AcquireTask"
_RETRYABLE_STATUS = frozenset({502, 503, 504})


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


def _heartbeat_fn(client: RuntimeHttpClient) -> Callable[[], bool]:
    """Return a task heartbeat that logs a lost task instead of raising SIGINT."""
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
            return True
        if not response.success:
            logger.warning("the SuperNode no longer knows this task")
        return True

    return heartbeat


def _pull_task_input(client: RuntimeHttpClient) -> tuple[Message, Context]:
    """Pull the task's context and message (Flower's ``pull_task_input``, minus the FAB).

    Unlike Flower's, it leaves the process-wide ``TaskIdentity`` alone, so a coordinator
    and device executors may share one process (as in tests and simulations).
    """
    from flwr.common.serde import context_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree

    # The task input also carries the run's FAB: it is dropped unread (trust boundary).
    context = context_from_proto(client.PullTaskInput(PullTaskInputRequest()).context)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode handed out a task without a message")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(
            client.ConfirmMessageReceived, node, context.run_id
        ),
        return_type=Message,
        # Flower waits up to two hours for a message's objects; a message of a run the
        # server abandoned (it crashed mid-round) never completes, and would hold this
        # device's only executor that long.
        max_time=_PULL_MAX_TIME_S,
        max_tries_per_object=_PULL_MAX_TRIES,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower sets it
    return message, context


def _run_task(client_app: ClientApp, client: RuntimeHttpClient) -> None:
    """Handle one acquired task: pull, call the app, push the reply and the context."""
    from flwr.app import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    heartbeat = HeartbeatSender(_heartbeat_fn(client))
    heartbeat.start()
    message: Message | None = None
    context: Context | None = None
    reply: Message | None = None
    status, details = SubStatus.FAILED, "the task input could not be pulled"
    try:
        message, context = _pull_task_input(client)
        try:
            reply = client_app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as err:
            reason = f"{type(err)}:<'{err}'>"
            logger.exception("the ClientApp raised on a %s message", message.metadata.message_type)
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                reply_to=message,
            )
            details = reason
        push_message(client, reply, context)
    except Exception:
        logger.exception("a ClientApp task failed in transport")
    finally:
        if heartbeat.is_running:
            heartbeat.stop()
        push_task_output(client=client, context=context, sub_status=status, details=details)


def serve_clientapp_in_process(
    client_app: ClientApp,
    *,
    runtime_address: str,
    superexec_auth_secret: bytes | None,
    stop: threading.Event,
    root_certificates: bytes | None = None,
    poll_interval: float = 0.1,
) -> int:
    """Acquire and handle ClientApp tasks from a SuperNode until `stop` is set.

    Parameters
    ----------
    client_app : flwr.clientapp.ClientApp
        The device's own installed app; never one from the server's FAB.
    runtime_address : str
        ``host:port`` of the SuperNode's Runtime API.
    superexec_auth_secret : bytes or None
        The secret the SuperNode was started with (``--superexec-auth-secret-file``).
    stop : threading.Event
        Set it to return after the current task.
    root_certificates : bytes or None
        PEM CA of the Runtime API's certificate; ``None`` (loopback) means plain HTTP.
    poll_interval : float
        Seconds between ``AcquireTask`` calls while idle.

    Returns
    -------
    int
        The number of tasks handled.

    Notes
    -----
    An exception in the app is answered with an ``Error`` reply (Flower's
    ``CLIENT_APP_RAISED_EXCEPTION``) and the task is reported ``FAILED``; a transport
    error on one task is logged. Neither ends the loop.
    """
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    acquirer = _runtime_client(
        runtime_address, root_certificates, stop, superexec_auth_secret=superexec_auth_secret
    )
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    handled = 0
    try:
        while not stop.is_set():
            try:
                response = acquirer.AcquireTask(request)
            except httpx.HTTPError as err:
                logger.warning("AcquireTask failed: %s", err)
                stop.wait(max(poll_interval, 1.0))
                continue
            if not (response.HasField("task") and response.token):
                stop.wait(poll_interval)
                continue
            logger.debug("acquired ClientApp task %d", response.task.task_id)
            client = _runtime_client(runtime_address, root_certificates, stop, token=response.token)
            try:
                _run_task(client_app, client)
            finally:
                client.close()
            handled += 1
    finally:
        acquirer.close()
    return handled

"""Gather single inference requests from many threads into one batched call."""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from edge_runtime.predictor import Predictor
from fedge.errors import ConfigError, FedgeError

__all__ = ["MicroBatcher"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Request:
    sample: np.ndarray
    future: Future[np.ndarray]


class MicroBatcher:
    """Gather single requests from many threads into batched :meth:`Predictor.predict` calls.

    A worker thread takes the first waiting request, then collects more until it
    has ``max_batch`` or ``max_delay_ms`` has passed since the first, runs one
    batch and gives each future its own row. A failing batch fails all its futures
    with the error. Use as a context manager or call :meth:`close`.

    Raises
    ------
    ConfigError
        If ``max_batch`` < 1, ``max_delay_ms`` is not in [0, 1000] or
        ``max_queue`` < ``max_batch``.
    """

    def __init__(
        self,
        predictor: Predictor,
        *,
        max_batch: int = 32,
        max_delay_ms: float = 2.0,
        max_queue: int = 1024,
    ) -> None:
        if max_batch < 1:
            raise ConfigError(f"max_batch must be at least 1, got {max_batch}")
        if not (math.isfinite(max_delay_ms) and 0 <= max_delay_ms <= 1000):
            raise ConfigError(f"max_delay_ms must be in [0, 1000], got {max_delay_ms}")
        if max_queue < max_batch:
            raise ConfigError(
                f"max_queue must be at least max_batch ({max_batch}), got {max_queue}"
            )
        self._predictor = predictor
        self._max_batch = max_batch
        self._max_delay_s = max_delay_ms / 1e3
        self._queue: queue.Queue[_Request | None] = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()
        self._closed = False
        self._batch_sizes: dict[int, int] = {}
        self._failed_batches = 0
        self._worker = threading.Thread(target=self._run, name="fedge-microbatcher", daemon=True)
        self._worker.start()

    def submit(self, sample: object) -> Future[np.ndarray]:
        """Queue one input (the model's shape without the batch dimension).

        Returns
        -------
        Future[numpy.ndarray]
            Resolves to this input's output row, or to the batch's error.

        Raises
        ------
        ConfigError
            If the input does not fit the model (checked now, so one bad input
            never fails a batch).
        FedgeError
            If the batcher is closed or its queue is full.
        """
        (checked,) = self._predictor.check_inputs([sample])
        request = _Request(sample=checked, future=Future())
        with self._lock:
            if self._closed:
                raise FedgeError("the micro-batcher is closed")
            try:
                self._queue.put_nowait(request)
            except queue.Full:
                raise FedgeError("the micro-batcher's queue is full; retry later") from None
        return request.future

    def _collect(self, first: _Request) -> tuple[list[_Request], bool]:
        batch, deadline = [first], time.monotonic() + self._max_delay_s
        while len(batch) < self._max_batch:
            try:
                remaining = deadline - time.monotonic()
                item = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            batch, stopping = self._collect(first)
            live = [request for request in batch if request.future.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                outputs = self._predictor.predict(np.stack([request.sample for request in live]))
                if len(outputs) != len(live):
                    raise FedgeError(
                        f"the model returned {len(outputs)} rows for {len(live)} inputs"
                    )
            except Exception as error:  # every failure goes to the callers, the worker lives on
                logger.warning("a batch of %d failed: %s", len(live), error)
                with self._lock:
                    self._failed_batches += 1
                for request in live:
                    request.future.set_exception(error)
                continue
            with self._lock:
                self._batch_sizes[len(live)] = self._batch_sizes.get(len(live), 0) + 1
            for row, request in zip(outputs, live, strict=True):
                request.future.set_result(np.array(row, copy=True))

    def stats(self) -> dict[str, object]:
        """Return batches, requests, failed_batches, mean/largest batch and sizes (size: count)."""
        with self._lock:
            sizes, failed = dict(self._batch_sizes), self._failed_batches
        batches = sum(sizes.values())
        requests = sum(size * count for size, count in sizes.items())
        return {
            "batches": batches,
            "requests": requests,
            "failed_batches": failed,
            "mean_batch": requests / batches if batches else None,
            "largest_batch": max(sizes) if sizes else 0,
            "sizes": {str(size): sizes[size] for size in sorted(sizes)},
        }

    def close(self, timeout: float = 10.0) -> None:
        """Stop accepting requests, finish those queued, and stop the worker."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(None)  # after every accepted request: they are all served first
        self._worker.join(timeout)
        if self._worker.is_alive():
            logger.warning("the micro-batcher's worker did not stop within %.1f s", timeout)

    def __enter__(self) -> MicroBatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

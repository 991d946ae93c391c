"""Dynamic batching for `t2s serve`: requests that arrive together are answered by one generation call.

A bounded queue of pending requests; one worker thread takes the first waiting request, waits up to `wait_s` for
more (up to `max_batch`), and hands the batch to `answer_batch`. A request whose deadline passed, or whose client
gave up, while it waited is dropped before it costs generation. A full queue refuses at once (QueueFull: 429), and a
closed one too (Closed: 503). The model runs in that one thread only, so nothing else touches it or its tokenizer.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable


class QueueFull(Exception):
    pass


class Closed(Exception):
    pass


class DeadlinePassed(Exception):
    pass


@dataclass(eq=False)
class Pending:
    """One request waiting for its answer. `deliver(result or exception)` is called exactly once, from the worker
    thread (or at once for a request refused at the door)."""
    payload: Any
    deadline: float  # time.monotonic()
    deliver: Callable[[Any], None]
    enqueued: float = field(default_factory=time.monotonic)
    abandoned: bool = False  # the client stopped waiting: skip it


class Batcher:
    def __init__(self, answer_batch: Callable[[list[Pending]], list[Any]], *, max_batch: int, wait_s: float,
                 max_queue: int, on_batch: Callable[[int], None] | None = None):
        if max_batch < 1 or max_queue < 1 or not 0 <= wait_s <= 10:
            raise ValueError("max_batch and max_queue must be at least 1, wait_s between 0 and 10 s")
        self.answer_batch, self.max_batch, self.wait_s, self.max_queue = answer_batch, max_batch, wait_s, max_queue
        self.on_batch = on_batch
        self._queue: deque[Pending] = deque()
        self._lock = threading.Condition()
        self._closed = False
        self.busy = False  # a batch is being answered
        self._thread = threading.Thread(target=self._work, name="t2s-batcher", daemon=True)
        self._thread.start()

    def depth(self) -> int:
        return len(self._queue)

    def submit(self, pending: Pending) -> None:
        """Queues a request; QueueFull or Closed when it cannot wait."""
        with self._lock:
            if self._closed:
                raise Closed()
            if len(self._queue) >= self.max_queue:
                raise QueueFull()
            self._queue.append(pending)
            self._lock.notify()

    def close(self, timeout_s: float = 0.0) -> None:
        """No more requests; those queued are still answered. Waits up to timeout_s for the worker to finish."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join(timeout_s)

    def next_batch(self) -> list[Pending] | None:
        """Blocks for the first request, then gathers more for up to wait_s; None once closed and empty."""
        with self._lock:
            while not self._queue:
                if self._closed:
                    return None
                self._lock.wait()
            until = time.monotonic() + self.wait_s
            while len(self._queue) < self.max_batch and not self._closed:
                left = until - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(left)
            return [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]

    def _work(self) -> None:
        while (batch := self.next_batch()) is not None:
            now = time.monotonic()
            live = []
            for pending in batch:
                if pending.abandoned:
                    continue
                if now > pending.deadline:
                    _deliver(pending, DeadlinePassed())
                    continue
                live.append(pending)
            if not live:
                continue
            self.busy = True
            try:
                if self.on_batch:
                    self.on_batch(len(live))
                results = self.answer_batch(live)
            except Exception as error:  # the batch fails, the server does not: each request gets the error
                results = [error] * len(live)
            finally:
                self.busy = False
            for pending, result in zip(live, results):
                if not pending.abandoned:  # (its client stopped waiting while the batch ran)
                    _deliver(pending, result)


def _deliver(pending: Pending, result: Any) -> None:
    """Hands one result over; a receiver that is gone (its event loop closed at shutdown) costs the others nothing:
    the worker thread goes on to the next batch."""
    try:
        pending.deliver(result)
    except Exception:  # noqa: BLE001 - whatever the receiver raises, the batcher must outlive it
        pass

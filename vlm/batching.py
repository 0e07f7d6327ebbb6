"""Serving many callers with one model: requests that arrive together run as one batch, and latency is logged.

- :class:`MicroBatcher` sits in front of a batched function. Each caller hands it one item and blocks; a worker
  thread collects the items that arrive within a short window of the first (or are already waiting), up to a
  maximum batch, calls the function once on all of them and hands every caller its own result. The function
  returns one result per item, or an exception for an item it could not do; if it raises, each item of the batch
  is run again alone, so a bad item gets its own error and the others still get their answers.
- :class:`LatencyLog` keeps each request kind's latencies and writes their median and 95th percentile to a logger
  every so many requests or seconds, and once more, for the whole run, when it is closed.

Both are thread-safe and know nothing of models: ``vlm serve`` builds them around the loaded predictors.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_STOP = object()  # the worker's signal to finish the batch in hand and stop


@dataclass(frozen=True)
class BatchStats:
    """What a :class:`MicroBatcher` has run: calls of its function, items in them, the largest batch."""

    batches: int = 0
    items: int = 0
    largest: int = 0

    @property
    def mean(self) -> float:
        return self.items / self.batches if self.batches else 0.0


class _Pending:
    """One caller's item, and its answer once the worker has it."""

    __slots__ = ("item", "result", "error", "done")

    def __init__(self, item: Any) -> None:
        self.item, self.result, self.error = item, None, None
        self.done = threading.Event()

    def answer(self, result: Any) -> None:
        if isinstance(result, BaseException):
            self.error = result
        else:
            self.result = result
        self.done.set()


class MicroBatcher(Generic[T, R]):
    """Runs ``fn`` on the items submitted from many threads, several at a time.

    Args:
        fn: items -> one result per item, in order; an item's result may be an exception, which is raised in its
            caller only. If ``fn`` raises, or returns the wrong number of results, each item is run alone.
        max_batch: the most items in one call of ``fn``.
        window_s: how long the first item of a batch waits for others (seconds). Items already waiting when the
            window closes join the batch too, up to ``max_batch``; 0 takes only those.
        name: the worker thread's name (and the logger's word for the batcher).
    """

    def __init__(self, fn: Callable[[list[T]], Sequence[R | BaseException]], max_batch: int = 16,
                 window_s: float = 0.01, name: str = "batch") -> None:
        if max_batch < 1 or not 0 <= window_s <= 10:
            raise ValueError(f"max_batch must be >= 1 and window_s in [0, 10], got {max_batch} and {window_s}")
        self.fn, self.max_batch, self.window_s, self.name = fn, max_batch, window_s, name
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stats = BatchStats()

    def submit(self, item: T) -> R:
        """``item``'s result, once its batch has run (raises the item's own exception)."""
        pending = _Pending(item)
        with self._lock:  # the worker starts with the first item, so a batcher never used costs no thread
            if self._closed:
                raise RuntimeError(f"the {self.name} batcher is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=f"vlm-{self.name}", daemon=True)
                self._thread.start()
            self._queue.put(pending)
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.result  # type: ignore[return-value]

    def stats(self) -> BatchStats:
        with self._lock:
            return self._stats

    def close(self, timeout: float | None = 30.0) -> None:
        """Runs what was submitted, then stops the worker; later submissions raise ``RuntimeError``."""
        with self._lock:
            self._closed = True
            thread = self._thread
            if thread is not None:
                self._queue.put(_STOP)
        if thread is not None:
            thread.join(timeout)

    # ------------------------------------------------------------------------------------------------ worker
    def _work(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            deadline = time.monotonic() + self.window_s
            while len(batch) < self.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            self._run(batch)

    def _run(self, batch: list[_Pending]) -> None:
        try:
            results = list(self.fn([p.item for p in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"{self.name}: {len(results)} results for {len(batch)} items")
        except Exception as e:  # noqa: BLE001 - the worker must outlive any batch; each caller gets an answer
            if len(batch) == 1:
                self._count(1)
                batch[0].answer(e)
                return
            logging.getLogger("vlm.batching").info("%s: a batch of %d failed (%s); running its items alone",
                                                   self.name, len(batch), e)
            for pending in batch:
                self._run([pending])
            return
        self._count(len(batch))
        for pending, result in zip(batch, results):
            pending.answer(result)

    def _count(self, size: int) -> None:
        with self._lock:
            s = self._stats
            self._stats = BatchStats(s.batches + 1, s.items + size, max(s.largest, size))


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (0 < q <= 100) of ascending values (nan for none)."""
    if not sorted_values:
        return math.nan
    return sorted_values[max(0, math.ceil(q / 100 * len(sorted_values)) - 1)]


class LatencyLog:
    """Latencies per request kind; their p50 and p95 go to ``logger`` (INFO) every ``every`` requests or
    ``interval_s`` seconds, whichever comes first (checked as each request ends), and for the whole run (the last
    ``keep`` requests of each kind) on :meth:`close`.

    Args:
        logger: where the lines go.
        every: requests (all kinds together) between two lines.
        interval_s: seconds between two lines while requests come in.
        keep: latencies kept per kind for the whole-run line.
        extra: called for more words at the end of each line (e.g. the batch sizes), or None.
    """

    def __init__(self, logger: logging.Logger, every: int = 100, interval_s: float = 60.0, keep: int = 10_000,
                 extra: Callable[[], str] | None = None) -> None:
        self.logger, self.every, self.interval_s, self.extra = logger, every, interval_s, extra
        self._lock = threading.Lock()
        self._recent: dict[str, list[float]] = {}
        self._all: dict[str, deque[float]] = {}
        self._keep = keep
        self._since = time.monotonic()
        self._closed = False

    def record(self, kind: str, seconds: float) -> None:
        with self._lock:
            self._recent.setdefault(kind, []).append(seconds)
            self._all.setdefault(kind, deque(maxlen=self._keep)).append(seconds)
            count = sum(map(len, self._recent.values()))
            due = count >= self.every or time.monotonic() - self._since >= self.interval_s
            line = self._line(self._recent, f"last {count} request(s)") if due else None
            if due:
                self._recent, self._since = {}, time.monotonic()
        if line:
            self.logger.info(line)

    @contextmanager
    def timed(self, kind: str) -> Iterator[None]:
        """Records the time the block takes (failed or not) as one ``kind`` request."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.record(kind, time.perf_counter() - start)

    def summary(self, kind: str) -> tuple[int, float, float]:
        """(requests, p50, p95 in seconds) of ``kind`` over the whole run (the kept ones)."""
        with self._lock:
            values = sorted(self._all.get(kind, ()))
        return len(values), percentile(values, 50), percentile(values, 95)

    def close(self) -> None:
        """Writes the whole run's line (once)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            line = self._line(self._all, "whole run")
        self.logger.info(line)

    def _line(self, samples: dict[str, Any], span: str) -> str:
        parts = []
        for kind in sorted(samples):
            values = sorted(samples[kind])
            parts.append(f"{kind} {len(values)} request(s) p50 {1000 * percentile(values, 50):.1f} ms "
                         f"p95 {1000 * percentile(values, 95):.1f} ms")
        words = "; ".join(parts) or "no requests"
        more = self.extra() if self.extra is not None else ""
        return f"latency, {span}: {words}" + (f"; {more}" if more else "")


__all__ = ["BatchStats", "LatencyLog", "MicroBatcher", "percentile"]

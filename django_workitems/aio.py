"""One event loop per process for async items.

A handler whose ``process`` is ``async def`` (or a ``QuerySetHandler`` whose ``handle`` is) does
not hold a pool thread per item: the pool thread that takes such an item starts it on this loop
and goes back to the channel, so an I/O-bound handler runs up to ``ASYNC_CONCURRENCY`` items at
once with a handful of threads. The loop runs in its own thread, started on the first async
item. Its items' ORM calls go through ``sync_to_async`` (Django's async ORM methods do that
themselves), which runs them on one shared thread with its own connection.

A hung async item is cancelled for real: past its ``item_timeout`` its token is cancelled, and
after the grace (``min(item_timeout, 30 s)``) its task is; no thread is given up.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Future
from typing import Any

from asgiref.sync import sync_to_async

from . import hygiene

logger = logging.getLogger("django_workitems.processing")


def async_process_of(handler: Any) -> Callable[[Any, Any], Awaitable[None]] | None:
    """The coroutine function that processes one item of ``handler``, or None (a sync one)."""
    process = getattr(handler, "process", None)
    if inspect.iscoroutinefunction(process):
        return process
    process_async = getattr(handler, "process_async", None)
    if process_async is not None and inspect.iscoroutinefunction(getattr(handler, "handle", None)):
        return process_async  # type: ignore[no-any-return]
    return None


class EventLoop:
    """The process's event loop for async items, with at most ``concurrency`` at once."""

    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self._permits = threading.BoundedSemaphore(concurrency)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._running = 0
        self._stopped = False

    @property
    def running(self) -> int:
        """Async items started and not ended."""
        return self._running

    def acquire(self, stopped: Callable[[], bool]) -> bool:
        """Wait for room for one more item; False once ``stopped()`` (then nothing is held)."""
        while not self._permits.acquire(timeout=0.25):
            if stopped():
                return False
        return True

    def start(self, coroutine: Coroutine[Any, Any, None]) -> bool:
        """Run ``coroutine`` on the loop; call after :meth:`acquire` (the permit goes with it).

        False (and nothing runs) once :meth:`stop` was called: no loop is started again.
        """
        if self._stopped:
            coroutine.close()
            self._permits.release()
            return False
        loop = self._ensure_loop()
        with self._lock:
            self._running += 1
        future = asyncio.run_coroutine_threadsafe(self._run(coroutine), loop)
        future.add_done_callback(self._ended)
        return True

    async def _run(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await coroutine
        finally:
            if task is not None:
                self._tasks.discard(task)

    def _ended(self, future: Future[None]) -> None:
        with self._lock:
            self._running -= 1
        self._permits.release()
        if not future.cancelled() and future.exception() is not None:  # pragma: no cover
            logger.error("An async item's bookkeeping raised", exc_info=future.exception())

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()
                thread = threading.Thread(
                    target=self._serve, args=(loop, ready), name="workitems-async", daemon=True
                )
                thread.start()
                ready.wait(10)
                self._loop, self._thread = loop, thread
            return self._loop

    @staticmethod
    def _serve(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def cancel_all(self, timeout: float) -> None:
        """Cancel every item still running and wait up to ``timeout`` s for their endings."""
        loop = self._loop
        if loop is None:
            return

        async def cancel() -> None:
            tasks = [t for t in self._tasks if not t.done()]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=timeout)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(cancel(), loop).result(timeout + 1.0)

    def stop(self, timeout: float) -> None:
        """Stop the loop and its thread (after :meth:`cancel_all`)."""
        with self._lock:
            self._stopped = True
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None:
            return
        # The items' ORM calls ran on the thread sync_to_async shares: close its connections.
        closing = asyncio.run_coroutine_threadsafe(sync_to_async(hygiene.close_all)(), loop)
        with contextlib.suppress(Exception):
            closing.result(timeout)
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout)

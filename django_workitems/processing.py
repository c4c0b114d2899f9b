"""WorkItemProcessingService: activations, their fetches, the fair channel and the pool.

One item walks ``fetch_next`` (a fetch thread) → the channel → ``process`` (a pool thread) →
its run (the recorder thread). Who owns what:

- the coordinator (the thread that calls :meth:`WorkItemProcessingService.step`: the worker's
  main thread) owns the live activations, the fetches in flight and the turn order; it starts
  fetches and watches their deadlines and those of items in process, and never touches the
  database;
- each :class:`~django_workitems.activation.Activation` owns its counts;
- the :class:`~django_workitems.channel.FairChannel` owns what is queued and in process;
- the :class:`~django_workitems.leases.LeaseKeeper` owns leases and the heartbeat;
- the :class:`~django_workitems.recording.RunRecorder` owns the writing of runs;
- the threads themselves (the fetch pool, what each pool thread is doing) are in
  :mod:`django_workitems.pool`, and async items run on :mod:`django_workitems.aio`'s loop.

Threads report to the coordinator only by posting events (a fetch ended, an activation
finished) and waking it; nothing calls back into its state.

Hung work is contained, not killed (Python cannot kill a thread): a fetch past its timeout is
recorded failed and whatever it returns later is released; an item past its timeout has its
token cancelled and, after a grace, is recorded failed while its pool thread is given up and
replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from asgiref.sync import sync_to_async

from . import hygiene, metrics, recording
from .activation import (
    Activation,
    ActivationResult,
    CycleResult,
    Failure,
    ItemOutcome,
    Step,
    describe_item,
    format_exception,
    safe_str,
)
from .aio import EventLoop, async_process_of
from .channel import FairChannel
from .claims import ClaimBook, QuerySetHandler
from .conf import app_settings
from .exceptions import Cancelled, WorkItemsError
from .handlers import CancellationToken, call_handler, current_worker_id
from .leases import LeaseKeeper
from .log import log_context, plural
from .pool import (
    IDLE_AFTER,
    DurationStats,
    EventWaker,
    FetchJob,
    FetchPool,
    Slot,
    Waker,
    join_all,
)
from .registry import Registration
from .scheduling import Fetchable, claim_limit, plan_fetches

logger = logging.getLogger("django_workitems.processing")

GRACE_CAP = 30.0
"""At most this long after an item's token was cancelled for its time-out, it is given up."""

FINAL_WRITES_TIMEOUT = 3.0
"""After the shutdown timeout: how long the last writes (runs, leases, the worker) may take."""

JOIN_TIMEOUT = 2.0
"""How long a stop waits for the engine's idle threads to exit and close their connections."""

Entry = tuple[Activation, Any]


class FetchResultError(WorkItemsError, TypeError):
    """``fetch_next`` returned something that is not a sequence of items."""


class LeakedTransaction(WorkItemsError):
    """``process`` returned with a transaction still open; it was rolled back."""


class HungItem(WorkItemsError):
    """``process`` did not return within its ``item_timeout`` and the grace after it."""


def as_items(value: object) -> list[Any]:
    """The items of what ``fetch_next`` returned: a sequence or iterable; None means none."""
    if value is None:
        return []
    if isinstance(value, str | bytes | bytearray | Mapping):
        raise FetchResultError(
            f"fetch_next returned a {type(value).__name__}; it must return a sequence of items "
            "(a list, a tuple, a QuerySet) or an iterable of them"
        )
    try:
        return list(value)  # type: ignore[call-overload, no-any-return]
    except TypeError:
        raise FetchResultError(
            f"fetch_next returned a {type(value).__name__}, which is not iterable; it must "
            "return a sequence of items"
        ) from None


# -- events the coordinator reacts to ----------------------------------------------------------


@dataclass(frozen=True)
class FetchEnded:
    job: FetchJob


@dataclass(frozen=True)
class Finished:
    activation: Activation


Event = FetchEnded | Finished


@dataclass
class StepResult:
    """What changed since the last step, for the background service's scheduler."""

    fetching_ended: list[Activation] = field(default_factory=list)
    finished: list[Activation] = field(default_factory=list)
    next_deadline: float | None = None
    """When the next fetch or item time-out falls due (monotonic), if any."""


class WorkItemProcessingService:
    """Runs activations: fetches in parallel, a fair bounded channel, a pool of threads.

    :meth:`run_cycle` runs one cycle; :class:`~django_workitems.background.
    BackgroundProcessingService` drives the service through :meth:`activate` and
    :meth:`step` instead.
    """

    def __init__(
        self,
        *,
        workers: int | None = None,
        queue_size: int | None = None,
        worker_id: int | None = None,
        lease_owner: str | None = None,
        cancel: CancellationToken | None = None,
        waker: Waker | None = None,
    ) -> None:
        self.workers = workers if workers is not None else app_settings.workers
        self.queue_size = queue_size if queue_size is not None else app_settings.queue_size
        self.lease_timeout = app_settings.lease_timeout
        self.async_concurrency = app_settings.async_concurrency
        self.worker_id = worker_id
        owner = lease_owner or (
            f"process:{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        )
        self.token = cancel or CancellationToken()
        self._waker = waker if waker is not None else EventWaker()
        self.channel: FairChannel[Entry] = FairChannel(self.queue_size, waker=self._waker)
        self.claims = ClaimBook()
        """The claim state of this process's ``QuerySetHandler`` activations."""
        self.keeper = LeaseKeeper(
            owner=owner,
            ttl=self.lease_timeout,
            worker_id=worker_id,
            claims=self.claims,
            waker=self._waker,
        )
        self.recorder = recording.RunRecorder(worker_id=worker_id)
        self.stats = DurationStats()
        self.loop = EventLoop(self.async_concurrency)
        """The event loop of this process's async items."""
        self._fetchers = FetchPool(worker_id)
        self._slots: list[Slot] = []
        self._slots_lock = threading.Lock()
        self._pool_serial = 0
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._live: dict[int, Activation] = {}
        self._jobs: dict[int, FetchJob] = {}
        self._reported: set[int] = set()
        self._served: dict[str, int] = {}
        self._serve_seq = 0
        self._stopping = False
        self._started = False
        self.given_up = 0
        """Threads given up on hung calls and not back yet."""
        self._given_up_lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the pool threads, the recorder and the lease keeper."""
        if self._started:
            return
        self._started = True
        for _ in range(self.workers):
            self._add_pool_thread()
        self.recorder.start()
        self.keeper.start()

    def __enter__(self) -> WorkItemProcessingService:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop(app_settings.shutdown_timeout.total_seconds())

    @property
    def exhausted(self) -> bool:
        """More threads given up on hung calls than ``WORKERS``: the process should be renewed."""
        return self.given_up > self.workers

    def active(self) -> list[Activation]:
        return list(self._live.values())

    def wait(self, timeout: float | None) -> None:
        self._waker.wait(timeout)

    def _post(self, event: Event) -> None:
        self._events.put(event)
        self._waker.wake()

    # -- activations (the coordinator) ----------------------------------------------------

    def activate(self, registration: Registration, *, handler_id: int) -> Activation | None:
        """Start an activation of a handler; its fetches start in :meth:`step`, when room allows.

        None once the service is stopping.
        """
        if self._stopping:
            return None
        activation = Activation(registration, handler_id=handler_id, token=self.token.child())
        activation.item_timeout = _seconds(registration.effective_item_timeout())
        activation.fetch_timeout = _seconds(registration.effective_fetch_timeout())
        self.channel.set_limit(registration.name, registration.max_concurrency)
        self._live[activation.serial] = activation
        self._waker.wake()
        return activation

    def step(self) -> StepResult:
        """Apply what threads reported, give up hung work, start the fetches room allows."""
        result = StepResult()
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            if isinstance(event, FetchEnded):
                self._jobs.pop(event.job.activation.serial, None)
            elif isinstance(event, Finished):
                activation = event.activation
                if self._live.pop(activation.serial, None) is not None:
                    if activation.serial not in self._reported:
                        result.fetching_ended.append(activation)
                    self._reported.discard(activation.serial)
                    result.finished.append(activation)
        now = time.monotonic()
        result.next_deadline = self._watch(now)
        if not self._stopping:
            self._dispatch()
        for activation in self._live.values():
            if (
                activation.serial not in self._reported
                and not activation.fetching
                and not activation.may_fetch
            ):
                self._reported.add(activation.serial)
                result.fetching_ended.append(activation)
        return result

    def _dispatch(self) -> None:
        if self.recorder.backlog >= recording.MAX_PENDING_RUNS:
            return  # the database is not keeping up: hold new fetches, memory stays bounded
        candidates = [
            a
            for a in self._live.values()
            if a.may_fetch
            and (
                not (a.registration.exclusive or a.hold)
                or (a.outstanding == 0 and a.serial not in self._jobs)
            )
        ]
        if not candidates:
            return
        busy = {a.name for a in self._live.values() if a.fetching or a.outstanding}
        plans = plan_fetches(
            candidates,
            room=self.channel.room(),
            capacity=self.channel.capacity,
            queued=self.channel.queued,
            limit=self._limit,
            served=lambda name: self._served.get(name, 0),
            busy=busy,
        )
        for plan in plans:
            activation = plan.activation
            assert isinstance(activation, Activation)
            granted = self.channel.reserve(activation.name, plan.ask)
            if granted < 1:
                break
            self._serve_seq += 1
            self._served[activation.name] = self._serve_seq
            activation.begin_fetch(granted)
            job = FetchJob(activation, granted, activation.fetch_timeout)
            self._jobs[activation.serial] = job
            self._fetchers.submit(lambda job=job: self._fetch(job))  # type: ignore[misc]

    def _limit(self, activation: Fetchable) -> int:
        assert isinstance(activation, Activation)
        if activation.registration.exclusive:
            # No other process may take its items while it holds the lease: nothing to hoard,
            # so it asks for its whole share (and a handler that does not claim is not asked
            # twice for the same items within a cycle).
            return activation.allowance
        return claim_limit(
            activation.registration,
            workers=self.workers,
            item_seconds=self.stats.get(activation.name),
            is_async=activation.is_async,
            async_concurrency=self.async_concurrency,
        )

    # -- fetching (fetch threads) -----------------------------------------------------------

    def _fetch(self, job: FetchJob) -> None:
        activation = job.activation
        reg = activation.registration
        items: list[Any] = []
        error: BaseException | None = None
        skipped: str | None = None  # why the fetch did not run, when it did not
        ran = False
        context = log_context.set((activation.name, activation.run_id, None))
        try:
            if reg.exclusive and (activation.lease is None or not activation.lease.valid()):
                # The lease is checked in the database before every fetch it does not cover.
                activation.lease = self.keeper.acquire(activation.handler_id)
                if activation.lease is None:
                    holder = self.keeper.holder(activation.handler_id) or "an unknown process"
                    skipped = f"another process holds its lease ({holder})"
            if skipped is None:
                activation.token.raise_if_cancelled()
                if activation.handler is None:
                    activation.handler = reg.create_handler()
                    if isinstance(activation.handler, QuerySetHandler):
                        activation.handler.claims = self.claims
                    activation.is_async = async_process_of(activation.handler) is not None
                ran = True
                items = as_items(
                    call_handler(activation.handler.fetch_next, job.ask, activation.token)
                )
        except Cancelled:
            skipped = "shutting down"
        except BaseException as exc:  # the database is down, the handler is broken: recorded
            error = exc
        finally:
            log_context.reset(context)
        if not job.complete():
            # Given up for its time-out: the run already says so; nothing of it is processed.
            if items:
                self._give_back(activation, items, "its fetch had been given up")
            self._thread_back()
            return
        if ran:
            self.recorder.checked(activation.handler_id)
        if error is not None or skipped is not None or not items:
            self.channel.unreserve(activation.name, job.ask)
            if error is not None:
                logger.error(
                    "Handler %s: fetch_next failed: %s: %s",
                    activation.name,
                    type(error).__name__,
                    safe_str(error),
                    exc_info=error,
                    extra=activation.log_extra(),
                )
                step = activation.fetch_failed(format_exception(error))
            elif skipped is not None:
                logger.debug(
                    "Handler %s skipped: %s", activation.name, skipped, extra=activation.log_extra()
                )
                step = activation.fetch_skipped(skipped)
            else:
                step = activation.fetch_returned(0)
        else:
            step = self._queue(job, items)
        self._post(FetchEnded(job))
        self._after(activation, step)

    def _queue(self, job: FetchJob, items: list[Any]) -> Step:
        """Hand fetched items to the channel (and the run to the recorder)."""
        activation = job.activation
        handler = activation.handler
        assert handler is not None
        if len(items) > job.ask:
            logger.warning(
                "Handler %s: fetch_next returned %s, more than the %d asked for",
                activation.name,
                plural(len(items), "item"),
                job.ask,
                extra=activation.log_extra(),
            )
        solo = [_isolate(handler, item) for item in items]
        first = activation.fetched == 0
        step = activation.fetch_returned(len(items), isolated=any(solo))
        if first:
            self.recorder.start_run(activation, items_fetched=len(items))
        # Items the handler calls urgent (rows taken back from a dead worker) come first.
        urgent = [_urgent(handler, item) for item in items]
        if any(urgent):
            order = sorted(range(len(items)), key=lambda i: not urgent[i])
            items = [items[i] for i in order]
            solo = [solo[i] for i in order]
        entries = [(activation, item) for item in items]
        if not self.channel.put(activation.name, entries, job.ask, solo, urgent=sum(urgent)):
            # Shutting down meanwhile: the items go back untouched.
            activation.stop_fetching(cancelled=True)
            self._give_back(activation, items, "the worker is shutting down")
            step = activation.items_released(len(items))
        elif any(urgent):
            self._make_way(activation, sum(urgent), batch=items)
        return step

    def _make_way(self, activation: Activation, count: int, *, batch: Sequence[Any]) -> None:
        """Rows taken back from a dead worker (just queued first) take the place of as many of
        the handler's own rows queued here before (given back: other workers, or the next
        fetch, take them). So the rows that waited longest are not held back behind a queue
        claimed before the death was seen, and this process holds no more unstarted rows."""
        just_fetched = {id(item) for item in batch}

        def movable(entry: Entry) -> bool:
            owner, item = entry
            handler = owner.handler
            return (
                id(item) not in just_fetched and handler is not None and not _urgent(handler, item)
            )

        moved = self.channel.make_way(activation.name, count, movable)
        for owner, items in _by_activation(moved).items():
            self._give_back(owner, items, "rows taken back from a dead worker go first")
            self._after(owner, owner.items_released(len(items)))

    def _give_back(self, activation: Activation, items: Sequence[Any], why: str) -> None:
        """Hand items that will never be started back to their handler (``release``)."""
        handler = activation.handler
        if handler is None or not items:
            return
        try:
            handler.release(items)
        except Exception:
            logger.exception(
                "Handler %s: release() of %d unstarted items raised",
                activation.name,
                len(items),
                extra=activation.log_extra(),
            )
        else:
            logger.info(
                "Handler %s: released %s never started (%s)",
                activation.name,
                plural(len(items), "item"),
                why,
                extra=activation.log_extra(),
            )

    def _release_queued(self, activation: Activation, why: str) -> Step:
        """Take the activation's unstarted items out of the channel and give them back."""
        entries = self.channel.remove(activation.name, lambda entry: entry[0] is activation)
        items = [item for _, item in entries]
        self._give_back(activation, items, why)
        return activation.items_released(len(items)) if items else Step.NONE

    # -- the pool (pool threads) ------------------------------------------------------------

    def _add_pool_thread(self) -> None:
        with self._slots_lock:
            self._pool_serial += 1
            name = f"workitems-pool-{self._pool_serial}"
            slot = Slot(name)
            self._slots.append(slot)
        slot.thread = threading.Thread(
            target=self._pool_worker, args=(slot,), name=name, daemon=True
        )
        slot.thread.start()

    def _pool_worker(self, slot: Slot) -> None:
        current_worker_id.set(self.worker_id)
        done: str | None = None  # the item just processed, told to the channel with the next take
        try:
            while True:
                found = self.channel.take(timeout=IDLE_AFTER, done=done)
                done = None
                if found is None:
                    if self.channel.closed:
                        return
                    hygiene.after_work(idle=True)
                    while found is None and not self.channel.closed:
                        found = self.channel.take(timeout=60.0)
                    if found is None:
                        return
                key, (activation, item) = found
                if activation.is_async:
                    self._start_async(key, activation, item)
                    continue
                done = self._process(slot, key, activation, item)
                if slot.given_up:
                    return  # given up on: this thread is no longer part of the pool
        finally:
            if slot.given_up:
                self._thread_back()
            else:
                with self._slots_lock:
                    if slot in self._slots:
                        self._slots.remove(slot)
            hygiene.close_all()

    def _fenced(self, key: str, activation: Activation, item: Any) -> bool:
        """True (and the item given back) when the activation's lease may be someone else's."""
        lease = activation.lease
        if lease is None or lease.valid():
            return False
        # Fenced: another process may hold the lease by now.
        self.channel.task_done(key)
        activation.stop_fetching(cancelled=True)
        self._give_back(activation, [item], "its lease could not be renewed in time")
        step = activation.items_released(1)
        self._after(activation, self._release_queued(activation, "its lease was lost"))
        self._after(activation, step)
        return True

    def _process(self, slot: Slot, key: str, activation: Activation, item: Any) -> str | None:
        """Process one item (unless the thread was given up on meanwhile: ``slot.given_up``).

        Returns ``key`` when the channel is still to be told that the item ended (the pool
        thread does so with its next take), None when it has been told.
        """
        if self._fenced(key, activation, item):
            return None
        handler = activation.handler
        assert handler is not None  # items are queued only after their handler fetched them
        item_id = describe_item(item)
        token = activation.token.child()
        slot.begin(activation, item, key, token, activation.item_timeout)
        context = log_context.set((activation.name, activation.run_id, item_id))
        failure: Failure | None = None
        outcome = ItemOutcome.SUCCEEDED
        started = slot.started
        try:
            call_handler(handler.process, item, token)
        except Cancelled as exc:
            if activation.token.cancelled:  # shutting down: it goes back, untouched
                outcome = ItemOutcome.RELEASED
            else:
                failure = Failure.of(item_id, exc)
        except BaseException as exc:  # an item must never take its pool thread down
            failure = Failure.of(item_id, exc)
        finally:
            log_context.reset(context)
        leaked = hygiene.after_item()  # rolled back whatever the outcome
        if outcome is ItemOutcome.SUCCEEDED and failure is None:
            failure = _leak(item_id, leaked)
        elapsed = time.monotonic() - started
        if not slot.end():
            return None
        if outcome is ItemOutcome.RELEASED:
            self._give_back(activation, [item], "the worker is shutting down")
        step = self._item_ended(key, activation, item_id, outcome, failure, elapsed, done=False)
        if step is Step.NONE:
            return key  # the common case: nothing else to do before the next take
        self.channel.task_done(key)
        self._after(activation, step)
        return None

    def _item_ended(
        self,
        key: str,
        activation: Activation,
        item_id: str,
        outcome: ItemOutcome,
        failure: Failure | None,
        elapsed: float,
        *,
        done: bool = True,
    ) -> Step:
        """Count an item that ended (any thread; no database): log, stats, the activation.

        With ``done=False`` the caller tells the channel itself (``task_done``) afterwards.
        """
        if failure is not None and outcome is not ItemOutcome.RELEASED:
            outcome = ItemOutcome.FAILED
            logger.error(
                "Handler %s: item %s failed: %s: %s",
                activation.name,
                item_id,
                failure.error_type.rsplit(".", 1)[-1],
                failure.message,
                exc_info=failure.exception,
                extra=activation.log_extra(item_id),
            )
        self.stats.observe(activation.name, elapsed)
        metrics.record_item(activation.name, outcome.value, elapsed)
        step = activation.item_ended(outcome, failure)
        if done:
            self.channel.task_done(key)
        return step

    # -- async items (a pool thread starts them; the event loop runs them) -----------------

    def _start_async(self, key: str, activation: Activation, item: Any) -> None:
        """Start an async item on the event loop, when it has room (``ASYNC_CONCURRENCY``)."""
        if self._fenced(key, activation, item):
            return
        if self.loop.acquire(stopped=lambda: self._stopping) and self.loop.start(
            self._process_async(key, activation, item)
        ):
            return
        # Stopping (no room came, or the loop has stopped): the item goes back, untouched.
        self.channel.task_done(key)
        self._give_back(activation, [item], "the worker is shutting down")
        self._after(activation, activation.items_released(1))

    async def _process_async(self, key: str, activation: Activation, item: Any) -> None:
        handler = activation.handler
        process = async_process_of(handler)
        assert process is not None  # is_async was decided from this very handler
        item_id = describe_item(item)
        token = activation.token.child()
        log_context.set((activation.name, activation.run_id, item_id))  # this task's own copy
        failure: Failure | None = None
        outcome = ItemOutcome.SUCCEEDED
        started = time.monotonic()
        task = asyncio.ensure_future(process(item, token))
        try:
            timeout = activation.item_timeout
            if timeout is not None and not await _finished_within(task, timeout):
                token.cancel()
                if not await _finished_within(task, min(timeout, GRACE_CAP)):
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
                    failure = Failure.of(
                        item_id,
                        HungItem(
                            f"process() did not finish within "
                            f"{time.monotonic() - started:.1f}s (item_timeout {timeout:.1f}s "
                            "and its grace); it was cancelled"
                        ),
                    )
            if failure is None:
                await task
        except asyncio.CancelledError:  # the shutdown timeout passed: it was cancelled
            task.cancel()
            failure = Failure.of(
                item_id, HungItem("still in process after the shutdown timeout; cancelled")
            )
        except Cancelled as exc:
            if activation.token.cancelled:  # shutting down: it goes back, untouched
                outcome = ItemOutcome.RELEASED
            else:
                failure = Failure.of(item_id, exc)
        except BaseException as exc:  # an item must never take the loop down
            failure = Failure.of(item_id, exc)
        elapsed = time.monotonic() - started
        # Its ORM calls ran on the thread sync_to_async shares: check that one for a leak.
        leaked = await sync_to_async(_after_async_item)()
        if outcome is ItemOutcome.SUCCEEDED and failure is None:
            failure = _leak(item_id, leaked)
        if outcome is ItemOutcome.RELEASED:
            await sync_to_async(self._give_back)(activation, [item], "the worker is shutting down")
        step = self._item_ended(key, activation, item_id, outcome, failure, elapsed)
        self._after(activation, step, on_coordinator=True)  # never the database on the loop

    # -- the watchdog (the coordinator) -------------------------------------------------------

    def _watch(self, now: float) -> float | None:
        """Give up fetches and items past their time-outs; returns the next deadline."""
        deadlines: list[float] = []
        for job in list(self._jobs.values()):
            if job.deadline is None:
                continue
            if now < job.deadline:
                deadlines.append(job.deadline)
            elif job.give_up():
                self._fetch_given_up(job)
        with self._slots_lock:
            slots = list(self._slots)
        for slot in slots:
            deadline, grace_until, token = slot.deadline, slot.grace_until, slot.token
            if slot.activation is None or deadline is None or slot.given_up:
                continue
            if grace_until is None:
                if now < deadline:
                    deadlines.append(deadline)
                    continue
                timeout = deadline - slot.started
                slot.grace_until = grace_until = now + min(timeout, GRACE_CAP)
                if token is not None:
                    token.cancel()
                activation = slot.activation
                if activation is not None:
                    logger.warning(
                        "Handler %s: item %s passed its item_timeout of %.1fs; cancelled it",
                        activation.name,
                        describe_item(slot.item),
                        timeout,
                        extra=activation.log_extra(describe_item(slot.item)),
                    )
            if now < grace_until:
                deadlines.append(grace_until)
            else:
                self._item_given_up(slot)
        return min(deadlines) if deadlines else None

    def _fetch_given_up(self, job: FetchJob) -> None:
        activation = job.activation
        self._jobs.pop(activation.serial, None)
        with self._given_up_lock:
            self.given_up += 1
        metrics.set_given_up_threads(self.given_up)
        seconds = time.monotonic() - job.started
        message = (
            f"fetch_next did not return within its fetch_timeout of {seconds:.1f}s; it was "
            "given up (whatever it returns later is released, not processed)"
        )
        logger.error("Handler %s: %s", activation.name, message, extra=activation.log_extra())
        self.channel.unreserve(activation.name, job.ask)
        activation.fetch_hung = True
        step = activation.fetch_failed(message)
        self._after(activation, step, on_coordinator=True)

    def _item_given_up(self, slot: Slot) -> None:
        taken = slot.give_up()
        if taken is None:
            return
        activation, item, started = taken.activation, taken.item, taken.started
        with self._given_up_lock:
            self.given_up += 1
        metrics.set_given_up_threads(self.given_up)
        item_id = describe_item(item)
        seconds = time.monotonic() - started
        failure = Failure.of(
            item_id,
            HungItem(
                f"process() did not finish within {seconds:.1f}s (item_timeout "
                f"{activation.item_timeout or 0:.1f}s and its grace); its pool thread "
                f"{slot.thread_name} was given up and replaced"
            ),
        )
        logger.error(
            "Handler %s: item %s %s",
            activation.name,
            item_id,
            failure.message,
            extra=activation.log_extra(item_id),
        )
        with self._slots_lock:
            if slot in self._slots:
                self._slots.remove(slot)
        if not self._stopping:
            self._add_pool_thread()
        activation.stop_fetching()
        if isinstance(activation.handler, QuerySetHandler):
            # A suspect given up on stays claimed here while this worker lives, but it no
            # longer holds back the take-back of other dead workers' rows.
            activation.handler.given_up(item)
        step = activation.item_ended(ItemOutcome.FAILED, failure)
        self.channel.task_done(taken.key)
        metrics.record_item(activation.name, ItemOutcome.FAILED.value, seconds)
        self._after(activation, step, on_coordinator=True)
        # Its neighbours that never started go back to the source: other workers may take them.
        self._fetchers.submit(
            lambda: self._after(activation, self._release_queued(activation, "a hung neighbour"))
        )

    def _thread_back(self) -> None:
        """A thread given up on has returned after all."""
        with self._given_up_lock:
            self.given_up = max(0, self.given_up - 1)
        metrics.set_given_up_threads(self.given_up)

    # -- finishing ------------------------------------------------------------------------

    def _after(self, activation: Activation, step: Step, *, on_coordinator: bool = False) -> None:
        if step is Step.FINISH:
            if on_coordinator:  # the coordinator never waits on the database
                self._fetchers.submit(lambda: self._finish(activation))
            else:
                self._finish(activation)
        elif step is Step.IDLE:
            self._waker.wake()

    def _finish(self, activation: Activation) -> None:
        """End an activation (exactly once): ``close()``, its status, its lease, its run."""
        handler = activation.handler
        if handler is not None and not activation.fetch_hung:
            try:
                handler.close()
            except BaseException as exc:  # even SystemExit: the run must still end
                activation.add_error(f"close() raised {format_exception(exc)}")
                logger.error(
                    "Handler %s: close() raised %s: %s",
                    activation.name,
                    type(exc).__name__,
                    safe_str(exc),
                    exc_info=exc,
                    extra=activation.log_extra(),
                )
        status = activation.conclude()
        if activation.lease is not None:
            try:
                self.keeper.release(activation.lease)
            except Exception:
                logger.warning(
                    "Handler %s: could not release its lease (it expires by itself)",
                    activation.name,
                    exc_info=True,
                    extra=activation.log_extra(),
                )
        if activation.is_run:
            result = activation.result()
            metrics.record_run(activation.name, status.value)
            logger.info(
                "Handler %s run %s %s: %d fetched, %d succeeded, %d failed%s in %.2fs",
                activation.name,
                activation.run_id if activation.run_id is not None else "(not yet written)",
                status.value,
                result.fetched,
                result.succeeded,
                result.failed,
                f", {result.released} released" if result.released else "",
                time.monotonic() - activation.started,
                extra=activation.log_extra(),
            )
        self.recorder.ended(activation)
        activation.finished.set()
        self._post(Finished(activation))

    # -- one cycle ------------------------------------------------------------------------

    def run_cycle(
        self,
        handlers: Sequence[tuple[Registration, int]],
        *,
        stopped: Callable[[], bool] = lambda: False,
    ) -> CycleResult:
        """One cycle: activate each (registration, handler row id), run until all have ended.

        Every handler may process up to its ``max_items_per_cycle`` items: when its share of
        the channel is smaller, it is fetched again within the cycle. Returns as soon as the
        last activation has ended, or when ``stopped()`` says so.
        """
        self.start()
        activations = [
            a
            for a in (self.activate(reg, handler_id=handler_id) for reg, handler_id in handlers)
            if a is not None
        ]
        while not stopped():
            result = self.step()
            if all(a.finished.is_set() for a in activations):
                break
            timeout = 1.0
            if result.next_deadline is not None:
                timeout = min(timeout, max(0.0, result.next_deadline - time.monotonic()))
            self.wait(timeout)
        self.step()
        cycle = CycleResult()
        for activation in activations:
            cycle.handlers[activation.name] = activation.result()
        return cycle

    # -- shutdown -------------------------------------------------------------------------

    def stop(self, timeout: float, abort: Callable[[], bool] | None = None) -> None:
        """Shut down: release unstarted items, give items in process ``timeout`` seconds.

        Activations still unfinished then are recorded ``cancelled`` (their items still in
        process counted failed); the last writes get a few seconds more, on their own threads,
        so the database cannot hold the process.
        """
        self._stopping = True
        self.token.cancel()
        self.channel.close()
        drained = _by_activation(entry for _key, entry in self.channel.drain())
        for activation, items in drained.items():
            activation.stop_fetching(cancelled=True)
            self._fetchers.submit(
                lambda a=activation, i=items: self._after(  # type: ignore[misc]
                    a, self._released(a, i)
                )
            )
        for activation in list(self._live.values()):
            self._after(activation, activation.stop_fetching(cancelled=True), on_coordinator=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if abort is not None and abort():
                return
            self.step()
            if not self._live:
                break
            self.wait(min(0.05, max(0.0, deadline - time.monotonic())))
        if self.loop.running:
            logger.warning(
                "%d async items still in process after the shutdown timeout of %.1fs: cancelled",
                self.loop.running,
                timeout,
            )
            self.loop.cancel_all(timeout=1.0)
        with self._slots_lock:
            slots = list(self._slots)
        for slot in slots:
            taken = slot.give_up()
            if taken is None:
                continue
            activation = taken.activation
            item_id = describe_item(taken.item)
            logger.warning(
                "Handler %s: item %s still in process after the shutdown timeout of %.1fs",
                activation.name,
                item_id,
                timeout,
                extra=activation.log_extra(item_id),
            )
            step = activation.item_ended(
                ItemOutcome.FAILED,
                Failure.of(
                    item_id,
                    HungItem(f"still in process after the shutdown timeout of {timeout:.1f}s"),
                ),
            )
            self._after(activation, step, on_coordinator=True)
        for activation in list(self._live.values()):
            if activation.force_finish(
                f"Items still in process after the shutdown timeout of {timeout:.1f}s."
            ):
                logger.warning(
                    "Handler %s: items still in process after the shutdown timeout of %.1fs",
                    activation.name,
                    timeout,
                    extra=activation.log_extra(),
                )
                self._fetchers.submit(lambda a=activation: self._finish(a))  # type: ignore[misc]
        final = time.monotonic() + FINAL_WRITES_TIMEOUT
        while self._live and time.monotonic() < final:
            if abort is not None and abort():
                return
            self.step()
            self.wait(0.05)
        self.recorder.stop(max(0.1, final - time.monotonic()) + 1.0)
        self.keeper.stop(max(0.1, final - time.monotonic()) + 1.0)
        with self._slots_lock:
            threads = [slot.thread for slot in self._slots if not slot.given_up]
        join_all([t for t in threads if t is not None], JOIN_TIMEOUT)
        self._fetchers.stop(JOIN_TIMEOUT)
        self.loop.stop(JOIN_TIMEOUT)

    def _released(self, activation: Activation, items: list[Any]) -> Step:
        self._give_back(activation, items, "the worker is shutting down")
        return activation.items_released(len(items))


def _by_activation(entries: Iterable[Entry]) -> dict[Activation, list[Any]]:
    """Unstarted items grouped by the activation that fetched them, in their order."""
    grouped: dict[Activation, list[Any]] = {}
    for activation, item in entries:
        grouped.setdefault(activation, []).append(item)
    return grouped


def _seconds(duration: Any) -> float | None:
    return None if duration is None else float(duration.total_seconds())


def _urgent(handler: Any, item: Any) -> bool:
    try:
        return bool(handler.urgent(item))
    except Exception:
        logger.exception("urgent() raised; queueing the item normally")
        return False


def _isolate(handler: Any, item: Any) -> bool:
    try:
        return bool(handler.isolate(item))
    except Exception:
        logger.exception("isolate() raised; processing the item normally")
        return False


def _leak(item_id: str, leaked: list[str]) -> Failure | None:
    """The failure of an item that returned with transactions open (now rolled back)."""
    if not leaked:
        return None
    return Failure.of(
        item_id,
        LeakedTransaction(
            f"process() returned with a transaction open on {', '.join(leaked)}; "
            "it was rolled back, so nothing it wrote there was kept"
        ),
    )


async def _finished_within(task: asyncio.Future[Any], seconds: float) -> bool:
    done, _ = await asyncio.wait({task}, timeout=seconds)
    return bool(done)


def _after_async_item() -> list[str]:
    """On the thread sync_to_async shares: roll back a leaked transaction, drop stale links."""
    return hygiene.after_item()


def results_of(activations: Iterable[Activation]) -> dict[str, ActivationResult]:
    return {a.name: a.result() for a in activations}

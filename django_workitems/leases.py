"""The lease keeper: exclusive handlers' leases and the worker's heartbeat, on the database clock.

A lease is taken with one conditional UPDATE (free, expired, or already ours) and renewed by the
keeper thread well inside ``LEASE_TIMEOUT``. Every expiry is computed by the database
(``Now() + LEASE_TIMEOUT``), so hosts whose clocks disagree never hold one lease at once.

The lease is *fenced* in this process too: :meth:`Lease.valid` is True only until
``LEASE_TIMEOUT`` after the send time of the last renewal the database confirmed. A process
that could not renew for that long (stalled, or cut off from the database) may already have
been replaced by another, so it stops starting the handler's items; it does not trust the lease
again until it has taken it anew in the database, before its next fetch.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from django.db import DatabaseError
from django.db.models import Q

from . import hygiene, recording
from .models import Handler, db_now, db_now_plus

if TYPE_CHECKING:
    from .claims import ClaimBook
    from .pool import Waker

logger = logging.getLogger("django_workitems.leases")


FENCE_MARGIN = 0.9
"""The fence closes a little before the database's expiry, for clocks that tick at other rates."""


def _expiry(ttl: timedelta) -> Any:
    return db_now_plus(ttl)


class Lease:
    """This process's hold on one exclusive handler, valid while its renewals are confirmed."""

    def __init__(self, handler_id: int, valid_until: float) -> None:
        self.handler_id = handler_id
        self._valid_until = valid_until
        self._lost = False

    def valid(self) -> bool:
        """True while it is certain that no other process holds this lease."""
        if self._lost:
            return False
        if time.monotonic() >= self._valid_until:
            self._lost = True  # once in doubt, never trusted again: re-take it in the database
            return False
        return True

    def renewed(self, sent_at: float, ttl: float) -> None:
        if not self._lost:
            self._valid_until = max(self._valid_until, sent_at + ttl)

    def lose(self) -> None:
        self._lost = True

    @property
    def lost(self) -> bool:
        return not self.valid()

    def __repr__(self) -> str:
        return f"<Lease handler={self.handler_id} valid={self.valid()}>"


class LeaseKeeper:
    """Owns every lease of this process and the worker's heartbeat; one thread renews them."""

    def __init__(
        self,
        *,
        owner: str,
        ttl: timedelta,
        worker_id: int | None = None,
        claims: ClaimBook | None = None,
        waker: Waker | None = None,
    ) -> None:
        self.owner = owner
        self.ttl = ttl
        self.worker_id = worker_id
        self._claims = claims
        """Whose unconfirmed writes each heartbeat settles."""
        self._waker = waker
        """Woken when the heartbeat found dead workers (:meth:`take_orphaned`)."""
        self._orphaned: dict[str, None] = {}  # a set in the order found: bounded by the handlers
        self._held: dict[int, Lease] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.interval = max(0.05, ttl.total_seconds() / 4)

    # -- on the calling thread (fetch and finishing threads) ---------------------------------

    def acquire(self, handler_id: int) -> Lease | None:
        """Take the handler's lease in the database; None when another process holds it."""
        sent = time.monotonic()
        taken = (
            Handler.objects.filter(pk=handler_id)
            .filter(
                Q(lease_owner="")
                | Q(lease_expires_at__isnull=True)
                | Q(lease_expires_at__lt=db_now())
                | Q(lease_owner=self.owner)
            )
            .update(lease_owner=self.owner, lease_expires_at=_expiry(self.ttl))
        )
        if taken != 1:
            return None
        lease = Lease(handler_id, sent + FENCE_MARGIN * self.ttl.total_seconds())
        with self._lock:
            previous = self._held.get(handler_id)
            if previous is not None:
                previous.lose()
            self._held[handler_id] = lease
        return lease

    def release(self, lease: Lease) -> None:
        """Give the lease up (if this process still holds it in the database)."""
        with self._lock:
            if self._held.get(lease.handler_id) is lease:
                del self._held[lease.handler_id]
        lease.lose()
        Handler.objects.filter(pk=lease.handler_id, lease_owner=self.owner).update(
            lease_owner="", lease_expires_at=None
        )

    @staticmethod
    def holder(handler_id: int) -> str:
        return (
            Handler.objects.filter(pk=handler_id).values_list("lease_owner", flat=True).first()
            or ""
        )

    def held(self) -> list[Lease]:
        with self._lock:
            return list(self._held.values())

    # -- the keeper thread ----------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="workitems-keeper", daemon=True)
            self._thread.start()

    def stop(self, timeout: float) -> None:
        """Stop renewing; release what is held and record the worker's stop, within ``timeout``.

        The final writes run on the keeper's own thread, so a database that does not answer
        cannot hold the caller past ``timeout``.
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning(
                    "The database did not answer the worker's last writes within %.1fs", timeout
                )

    def renew(self) -> None:
        """Push back every held lease's expiry; a lease found taken by another is lost."""
        leases = self.held()
        if not leases:
            return
        ids = [lease.handler_id for lease in leases]
        sent = time.monotonic()
        Handler.objects.filter(pk__in=ids, lease_owner=self.owner).update(
            lease_expires_at=_expiry(self.ttl)
        )
        ours = set(
            Handler.objects.filter(pk__in=ids, lease_owner=self.owner).values_list("pk", flat=True)
        )
        for lease in leases:
            if lease.handler_id in ours:
                lease.renewed(sent, FENCE_MARGIN * self.ttl.total_seconds())
            else:
                logger.error(
                    "The lease of handler #%s was taken by another process; its items in this "
                    "one are no longer started",
                    lease.handler_id,
                )
                lease.lose()

    def beat(self) -> None:
        """Heartbeat, and mark the runs of dead workers abandoned."""
        if self.worker_id is None:
            return
        recording.heartbeat(self.worker_id)
        handlers = recording.abandon_runs_of_dead_workers(self.ttl)
        if handlers:
            logger.warning(
                "Marked runs of dead workers abandoned (handlers: %s)", ", ".join(handlers)
            )
            with self._lock:
                self._orphaned.update(dict.fromkeys(handlers))
            if self._waker is not None:
                self._waker.wake()

    def take_orphaned(self) -> list[str]:
        """Handlers whose runs the heartbeat found abandoned by dead workers since the last call
        (the loop runs them at once, so their rows do not wait for the next poll)."""
        with self._lock:
            names, self._orphaned = list(self._orphaned), {}
        return names

    def settle(self) -> None:
        """Write the outcomes and undo the claims the database did not confirm."""
        if self._claims is not None:
            self._claims.settle()

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                for job, what in (
                    (self.renew, "renew leases"),
                    (self.beat, "heartbeat"),
                    (self.settle, "write the outcomes kept for the database"),
                ):
                    try:
                        job()
                    except DatabaseError:
                        logger.warning("Could not %s; retrying", what, exc_info=True)
                        hygiene.close_all()  # the connection may be the broken part
                    except Exception:
                        logger.exception("Could not %s; retrying", what)
                hygiene.after_work(idle=False)
            self._final_writes()
        finally:
            hygiene.close_all()

    def _final_writes(self) -> None:
        for lease in self.held():
            try:
                self.release(lease)
            except Exception:
                logger.warning("Could not release the lease of handler #%s", lease.handler_id)
        if self.worker_id is not None:
            try:
                recording.stop_worker(self.worker_id)
            except Exception:
                logger.warning("Could not record the stop of worker #%s", self.worker_id)

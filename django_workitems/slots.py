"""Taking the slots of scheduled handlers, once per slot across the deployment.

The rules are in :mod:`django_workitems.schedules`; this is the part that talks to the
database. One :class:`SlotKeeper` per worker, owned by its watcher thread (the coordinator
never waits on the database): each pass writes the slots whose activation ended, then reads
the scheduled handlers' rows with the database's clock and takes what is due.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from .models import Handler, Worker, db_now
from .registry import Registration
from .schedules import CronSchedule, local_text

logger = logging.getLogger("django_workitems.schedules")


@dataclass(frozen=True)
class TakenSlot:
    """A slot this worker took (or took over from a dead one): run one activation for it."""

    name: str
    at: datetime
    taken_over: bool = False


class SlotKeeper:
    """The slots of one worker's scheduled handlers.

    Thread-safe where it needs to be: :meth:`ended` is called by the coordinator, everything
    else by the watcher thread that owns the keeper.
    """

    def __init__(
        self, registrations: Iterable[Registration], *, worker_id: int, lease_timeout: timedelta
    ) -> None:
        self._registrations = {r.name: r for r in registrations if r.schedule is not None}
        self._crons = {
            name: CronSchedule(r.schedule or "") for name, r in self._registrations.items()
        }
        self._worker_id = worker_id
        self._lease_timeout = lease_timeout
        self._lock = threading.Lock()
        self._ended: set[str] = set()
        """Slots whose activation ended here: ``slot_taken_by`` is to be cleared."""
        self._retry: dict[str, datetime] = {}
        """Slots whose activation could not run here yet (another process held the lease)."""
        self._mine: dict[str, datetime] = {}
        """Slots this worker holds (``slot_taken_by`` is this worker)."""

    def __bool__(self) -> bool:
        return bool(self._registrations)

    # -- the coordinator's side ---------------------------------------------------------

    def ended(self, name: str, *, ran: bool) -> None:
        """The activation started for ``name``'s slot ended (``ran``: False to try again)."""
        with self._lock:
            if ran:
                self._ended.add(name)
            elif name in self._mine:
                self._retry[name] = self._mine[name]

    # -- the watcher's side -------------------------------------------------------------

    def flush(self) -> None:
        """Write the slots whose activation ended (raises ``DatabaseError``; kept for later)."""
        with self._lock:
            ended = sorted(self._ended)
        for name in ended:
            Handler.objects.filter(name=name, slot_taken_by_id=self._worker_id).update(
                slot_taken_by=None
            )
            with self._lock:
                self._ended.discard(name)
                self._mine.pop(name, None)

    def take(self) -> tuple[list[TakenSlot], float | None]:
        """One pass: the slots to run now, and seconds until the next one (database clock).

        Raises ``DatabaseError`` when the database does not answer (the caller retries).
        """
        self.flush()
        with self._lock:
            taken = [TakenSlot(name, at) for name, at in self._retry.items()]
            self._retry.clear()
        rows = list(
            Handler.objects.filter(name__in=list(self._registrations), is_enabled=True)
            .annotate(database_now=db_now())
            .values_list(
                "pk", "name", "next_slot_at", "slot_taken_by_id", "taken_slot_at", "database_now"
            )
        )
        others = {row[3] for row in rows} - {None, self._worker_id}
        dead = (
            set(
                Worker.objects.dead(self._lease_timeout)
                .filter(pk__in=others)
                .values_list("pk", flat=True)
            )
            if others
            else set()
        )
        waits = []
        for pk, name, next_slot, holder, taken_slot, now in rows:
            slot, next_slot = self._step(pk, name, next_slot, holder, taken_slot, now, dead)
            if slot is not None:
                taken.append(slot)
            if next_slot is not None:
                waits.append((next_slot - now).total_seconds())
        return taken, (max(0.0, min(waits)) if waits else None)

    def _step(
        self,
        pk: int,
        name: str,
        next_slot: datetime | None,
        holder: int | None,
        taken_slot: datetime | None,
        now: datetime,
        dead: set[int],
    ) -> tuple[TakenSlot | None, datetime | None]:
        """Decide one handler's row: (the slot to run, if any; its next slot as now written)."""
        cron = self._crons[name]
        row = Handler.objects.filter(pk=pk)
        if next_slot is None:
            first = cron.next_after(now)
            row.filter(next_slot_at__isnull=True).update(next_slot_at=first)
            return None, first
        if next_slot <= now:
            latest = cron.latest_at_or_before(now)
            following = cron.next_after(now)
            catch_up = self._registrations[name].catch_up(latest)
            if now - latest > catch_up:
                if row.filter(next_slot_at=next_slot).update(next_slot_at=following):
                    logger.info(
                        "Handler %s: missed slot %s skipped (older than its catch-up of %s); "
                        "next slot %s",
                        name,
                        local_text(latest),
                        catch_up,
                        local_text(following),
                        extra={"handler": name},
                    )
                return None, following
            won = row.filter(next_slot_at=next_slot).update(
                next_slot_at=following, slot_taken_by_id=self._worker_id, taken_slot_at=latest
            )
            if not won:
                return None, None  # another worker took it; the next read shows the new slot
            with self._lock:
                self._mine[name] = latest
            if latest > next_slot:
                logger.info(
                    "Handler %s: running missed slot %s once (slots since %s were missed)",
                    name,
                    local_text(latest),
                    local_text(next_slot),
                    extra={"handler": name},
                )
            return TakenSlot(name, latest), following
        if (
            holder in dead
            and taken_slot is not None
            and row.filter(slot_taken_by_id=holder).update(slot_taken_by_id=self._worker_id)
        ):
            with self._lock:
                self._mine[name] = taken_slot
            logger.warning(
                "Handler %s: slot %s was taken by worker %s, which died before its "
                "activation ended; running it here",
                name,
                local_text(taken_slot),
                holder,
                extra={"handler": name},
            )
            return TakenSlot(name, taken_slot, taken_over=True), next_slot
        return None, next_slot

"""Cron schedules: when a slot is due, and taking each slot once across the deployment.

A handler registered with ``schedule="0 3 * * *"`` is due at each slot of that expression,
evaluated in Django's ``TIME_ZONE``, instead of every poll interval. Expressions are parsed by
`cronsim <https://pypi.org/project/cronsim/>`_: five fields, or six with seconds first, with
Debian cron's rules for daylight saving time (a daily slot in the hour that is skipped runs
when the clock jumps, one in the hour that repeats runs once).

Slots are taken on the ``Handler`` row, on the database's clock:

- ``next_slot_at`` is the next slot nobody has taken. A worker whose read of the row shows it
  due moves it to the following slot with one conditional UPDATE (``WHERE next_slot_at =`` the
  value it read): of any number of workers, one wins the slot.
- The winner is written in ``slot_taken_by`` (and the slot in ``taken_slot_at``) until the
  activation it started has ended. If that worker dies (or stops before the activation ended),
  the next live worker takes the slot over, with the same kind of conditional UPDATE, once the
  dead one's heartbeat is ``LEASE_TIMEOUT`` old; so a slot is never lost, unless a newer slot
  comes due first (then that one runs, once).
- Missed slots (no worker was running): at the next start the handler runs once if the latest
  missed slot is younger than ``schedule_catch_up`` (default: one slot period), never once per
  missed slot; otherwise it waits for the next slot.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from functools import cached_property

from cronsim import CronSim, CronSimError
from django.utils import timezone

logger = logging.getLogger("django_workitems.schedules")

SCHEDULE_MAX_LENGTH = 200
"""The longest cron expression a ``Handler`` row stores."""


class ScheduleError(ValueError):
    """A cron expression cronsim cannot read."""


@dataclass(frozen=True)
class CronSchedule:
    """A cron expression; times in and out are aware datetimes, evaluated in ``TIME_ZONE``."""

    expression: str

    @classmethod
    def parse(cls, expression: str) -> CronSchedule:
        """The schedule of ``expression``; :class:`ScheduleError` saying what is wrong."""
        fields = expression.split()
        if len(fields) not in (5, 6):
            raise ScheduleError(
                f"has {len(fields)} fields; use five (minute hour day month weekday) or six "
                "(seconds first)"
            )
        if len(fields) == 6 and fields[0] == "0":
            # The same slots as five fields, and five fields get cron's daylight-saving rules.
            fields = fields[1:]
        try:
            CronSim(" ".join(fields), timezone.now())
        except CronSimError as exc:
            raise ScheduleError(f"is not a cron expression cronsim reads: {exc}") from None
        return cls(" ".join(fields))

    @staticmethod
    def _zone() -> tzinfo:
        return timezone.get_default_timezone()

    def next_after(self, moment: datetime) -> datetime:
        """The first slot strictly after ``moment``."""
        return next(CronSim(self.expression, moment.astimezone(self._zone())))

    def latest_at_or_before(self, moment: datetime) -> datetime:
        """The last slot at or before ``moment`` (slots fall on whole seconds)."""
        local = moment.astimezone(self._zone()).replace(microsecond=0)
        # cronsim's reverse iteration starts at ``dt`` itself when ``dt`` has microseconds.
        return next(CronSim(self.expression, local + timedelta(microseconds=1), reverse=True))

    def period(self, moment: datetime) -> timedelta:
        """The time between the last slot at or before ``moment`` and the one after it."""
        latest = self.latest_at_or_before(moment)
        return self.next_after(latest) - latest

    @cached_property
    def description(self) -> str:
        """The expression in words (cronsim's ``explain``), e.g. "At 03:00 every day"."""
        try:
            return CronSim(self.expression, timezone.now()).explain()
        except Exception:  # pragma: no cover - explain() does not cover every form
            return self.expression

    def __str__(self) -> str:
        return self.expression


def local_text(moment: datetime) -> str:
    """A time as people read it: in ``TIME_ZONE``, to the second, with its zone."""
    return timezone.localtime(moment).strftime("%Y-%m-%d %H:%M:%S %Z")


def next_due(
    schedule: str | None,
    *,
    next_slot_at: datetime | None,
    last_checked_at: datetime | None,
    poll_interval: timedelta,
    now: datetime | None = None,
) -> datetime | None:
    """When a handler is next due: its next slot, or its last fetch plus its poll interval.

    None for an interval handler no worker has fetched yet (it is due when one starts).
    """
    if schedule is not None:
        if next_slot_at is not None:
            return next_slot_at
        return CronSchedule(schedule).next_after(now or timezone.now())
    if last_checked_at is None:
        return None
    return last_checked_at + poll_interval

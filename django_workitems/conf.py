"""Typed, lazily read settings: ``settings.WORKITEMS`` is looked up on every access.

Reading at access time (never at import) keeps ``override_settings`` working in tests and lets
system checks report a bad value instead of crashing the import.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings as django_settings
from django.utils.dateparse import parse_duration as django_parse_duration

from .exceptions import ConfigurationError

_DURATION_RE = re.compile(
    r"(?:(?P<days>\d+)\.)?(?P<hours>\d+):(?P<minutes>[0-5]?\d):(?P<seconds>[0-5]?\d(?:\.\d+)?)",
    re.ASCII,
)
_SECONDS_RE = re.compile(r"\d+(?:\.\d+)?", re.ASCII)


MIN_POLL_INTERVAL = timedelta(milliseconds=100)
"""The shortest ``POLL_INTERVAL`` (and per-handler ``poll_interval``)."""
MIN_LEASE_TIMEOUT = timedelta(seconds=1)
MAX_LEASE_TIMEOUT = timedelta(days=1)


def max_date_offset() -> timedelta:
    """The longest duration that can be added to and subtracted from today's date.

    Durations are added to (next due, lease expiry) and subtracted from (retention horizon,
    dead-worker horizon) the current time; a day of margin keeps time zone conversions safe.
    """
    now = datetime.now(UTC)
    room = min(datetime.max.replace(tzinfo=UTC) - now, now - datetime.min.replace(tzinfo=UTC))
    return timedelta(days=room.days - 1)


def max_wait() -> timedelta:
    """The longest duration that is also used as a thread wait timeout."""
    return min(max_date_offset(), timedelta(seconds=int(threading.TIMEOUT_MAX)))


def parse_duration(
    value: object,
    *,
    allow_zero: bool = False,
    minimum: timedelta | None = None,
    maximum: timedelta | None = None,
) -> timedelta:
    """Parse a duration into a ``timedelta``: ``"[d.]hh:mm:ss"``, anything Django's
    ``parse_duration`` reads (``"3 00:00:00"``, ``"P3D"``, ``"PT5M"``), a ``timedelta`` or a
    number of seconds (a number or a numeric string).

    The result is positive (or zero with ``allow_zero``), at least ``minimum``, and at most
    ``maximum`` (by default :func:`max_date_offset`). Raises ``ValueError`` with a message that
    says what is accepted.
    """
    try:
        duration = _to_timedelta(value)
    except OverflowError:
        duration = None
    if duration is not None and (
        duration < timedelta(0) or (duration == timedelta(0) and not allow_zero)
    ):
        raise ValueError("must be positive" if not allow_zero else "must not be negative")
    if maximum is None:
        maximum = max_date_offset()
    if duration is None or duration > maximum:
        raise ValueError(f"is too large for a duration (at most {_describe(maximum)})")
    if minimum is not None and duration < minimum:
        raise ValueError(f"is too small (at least {_describe(minimum)})")
    return duration


def _describe(duration: timedelta) -> str:
    if duration >= timedelta(days=2):
        return f"{duration.days} days"
    seconds = duration.total_seconds()
    return f"{seconds:g} second{'' if seconds == 1 else 's'}"


def _to_timedelta(value: object) -> timedelta:
    duration: timedelta | None
    if isinstance(value, timedelta):
        duration = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError("must be a finite number of seconds")
        duration = timedelta(seconds=value)
    elif isinstance(value, str):
        text = value.strip()
        match = _DURATION_RE.fullmatch(text)
        if match:
            parts = match.groupdict()
            duration = timedelta(
                days=int(parts["days"] or 0),
                hours=int(parts["hours"]),
                minutes=int(parts["minutes"]),
                seconds=float(parts["seconds"]),
            )
        elif _SECONDS_RE.fullmatch(text):
            duration = timedelta(seconds=float(text))
        else:
            # Only ASCII: Django's patterns use \d, which also matches other scripts' digits.
            duration = django_parse_duration(text) if text.isascii() else None
            if duration is None:
                raise ValueError(
                    'must be "[d.]hh:mm:ss" (e.g. "00:05:00"), a duration Django\'s '
                    'parse_duration reads (e.g. "3 00:00:00", "P3D", "PT5M"), a timedelta '
                    "or seconds"
                )
    else:
        raise ValueError(
            'must be "[d.]hh:mm:ss", a timedelta or a number of seconds, '
            f"not {type(value).__name__}"
        )
    return duration


_INT_RE = re.compile(r"\+?\d+", re.ASCII)


def _positive_int(value: object) -> int:
    if isinstance(value, str) and _INT_RE.fullmatch(value.strip()):
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be an int >= 1 (or a string of digits), not {type(value).__name__}")
    if value < 1:
        raise ValueError("must be an int >= 1")
    return value


def _poll_interval(value: object) -> timedelta:
    return parse_duration(value, minimum=MIN_POLL_INTERVAL, maximum=max_wait())


def _lease_timeout(value: object) -> timedelta:
    return parse_duration(value, minimum=MIN_LEASE_TIMEOUT, maximum=MAX_LEASE_TIMEOUT)


def _duration(value: object) -> timedelta:
    return parse_duration(value)


def _wait_or_zero(value: object) -> timedelta:
    return parse_duration(value, allow_zero=True, maximum=max_wait())


def _wait_or_none(value: object) -> timedelta | None:
    return None if value is None else parse_duration(value, maximum=max_wait())


@dataclass(frozen=True)
class SettingSpec:
    """One key of ``WORKITEMS``: its default, its parser and its system check id."""

    key: str
    default: object
    parse: Callable[[object], Any]
    check_id: str


SETTINGS: tuple[SettingSpec, ...] = (
    SettingSpec("POLL_INTERVAL", "00:05:00", _poll_interval, "django_workitems.E002"),
    SettingSpec("WORKERS", 4, _positive_int, "django_workitems.E003"),
    SettingSpec("QUEUE_SIZE", 100, _positive_int, "django_workitems.E004"),
    SettingSpec("SHUTDOWN_TIMEOUT", "00:00:30", _wait_or_zero, "django_workitems.E005"),
    SettingSpec("LEASE_TIMEOUT", "00:01:00", _lease_timeout, "django_workitems.E006"),
    SettingSpec("RUN_RETENTION", "30.00:00:00", _duration, "django_workitems.E007"),
    SettingSpec("ITEM_TIMEOUT", "01:00:00", _wait_or_none, "django_workitems.E008"),
    SettingSpec("FETCH_TIMEOUT", "00:05:00", _wait_or_none, "django_workitems.E009"),
    SettingSpec("ASYNC_CONCURRENCY", 100, _positive_int, "django_workitems.E010"),
)
_BY_KEY = {spec.key: spec for spec in SETTINGS}


@dataclass(frozen=True)
class SettingProblem:
    """A bad ``WORKITEMS`` entry, as reported by the system checks and the command."""

    check_id: str
    key: str
    value: object
    reason: str

    def __str__(self) -> str:
        if self.key == "WORKITEMS":
            return f"settings.WORKITEMS {self.reason} (got {self.value!r})"
        return f"settings.WORKITEMS[{self.key!r}] = {self.value!r} is invalid: it {self.reason}"


class WorkItemsSettings:
    """Accessors for ``settings.WORKITEMS``, each validated and converted on every access."""

    def _user_settings(self) -> Mapping[str, object]:
        value = getattr(django_settings, "WORKITEMS", None)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ConfigurationError(str(self._not_a_mapping(value)))
        return value

    @staticmethod
    def _not_a_mapping(value: object) -> SettingProblem:
        return SettingProblem("django_workitems.E001", "WORKITEMS", value, "must be a dict")

    def _get(self, key: str) -> Any:
        spec = _BY_KEY[key]
        value = self._user_settings().get(key, spec.default)
        try:
            return spec.parse(value)
        except ValueError as exc:
            raise ConfigurationError(
                str(SettingProblem(spec.check_id, key, value, str(exc)))
            ) from None

    @property
    def poll_interval(self) -> timedelta:
        """How often each handler is due when it has no backlog."""
        return self._get("POLL_INTERVAL")  # type: ignore[no-any-return]

    @property
    def workers(self) -> int:
        """Threads processing items."""
        return self._get("WORKERS")  # type: ignore[no-any-return]

    @property
    def queue_size(self) -> int:
        """Capacity of the channel: items fetched but not yet started."""
        return self._get("QUEUE_SIZE")  # type: ignore[no-any-return]

    @property
    def shutdown_timeout(self) -> timedelta:
        """How long a shutdown waits for items in process."""
        return self._get("SHUTDOWN_TIMEOUT")  # type: ignore[no-any-return]

    @property
    def lease_timeout(self) -> timedelta:
        """After this long without renewal, leases and worker heartbeats count as expired."""
        return self._get("LEASE_TIMEOUT")  # type: ignore[no-any-return]

    @property
    def run_retention(self) -> timedelta:
        """Run history older than this is pruned."""
        return self._get("RUN_RETENTION")  # type: ignore[no-any-return]

    @property
    def item_timeout(self) -> timedelta | None:
        """How long one ``process`` call may take before it is given up (None: never)."""
        return self._get("ITEM_TIMEOUT")  # type: ignore[no-any-return]

    @property
    def fetch_timeout(self) -> timedelta | None:
        """How long one ``fetch_next`` call may take before it is given up (None: never)."""
        return self._get("FETCH_TIMEOUT")  # type: ignore[no-any-return]

    @property
    def async_concurrency(self) -> int:
        """Async items running at once on the process's event loop."""
        return self._get("ASYNC_CONCURRENCY")  # type: ignore[no-any-return]

    def problems(self) -> list[SettingProblem]:
        """Every invalid entry of ``settings.WORKITEMS`` (empty when all is well)."""
        raw = getattr(django_settings, "WORKITEMS", None)
        if raw is None:
            return []
        if not isinstance(raw, Mapping):
            return [self._not_a_mapping(raw)]
        problems = []
        for spec in SETTINGS:
            if spec.key in raw:
                try:
                    spec.parse(raw[spec.key])
                except ValueError as exc:
                    problems.append(
                        SettingProblem(spec.check_id, spec.key, raw[spec.key], str(exc))
                    )
        return problems

    def unknown_keys(self) -> list[str]:
        """Keys of ``settings.WORKITEMS`` this app does not know (most likely typos)."""
        raw = getattr(django_settings, "WORKITEMS", None)
        if not isinstance(raw, Mapping):
            return []
        return sorted(str(key) for key in raw if key not in _BY_KEY)


app_settings = WorkItemsSettings()

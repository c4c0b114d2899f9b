"""Plain-text views of the handlers, for ``runworkitems --list``."""

from __future__ import annotations

from collections.abc import Sequence

from django.db.models import OuterRef, Subquery

from .models import Handler, HandlerRun
from .registry import Registration
from .schedules import local_text, next_due


def describe_timing(registration: Registration) -> str:
    """When it runs, in words: "0 3 * * * (At 03:00 every day)" or "every 0:05:00"."""
    cron = registration.cron()
    if cron is not None:
        return f"{cron.expression} ({cron.description})"
    return f"every {registration.effective_poll_interval()}"


def handler_table(registrations: Sequence[Registration]) -> str:
    """A table of name, purpose, max items, enabled and last run, one handler a line."""
    last = HandlerRun.objects.filter(handler=OuterRef("pk")).order_by("-started_at", "-id")
    rows = {
        h.name: h
        for h in Handler.objects.filter(name__in=[r.name for r in registrations]).annotate(
            last_status=Subquery(last.values("status")[:1]),
            last_started=Subquery(last.values("started_at")[:1]),
        )
    }
    lines = [("NAME", "PURPOSE", "MAX ITEMS", "ENABLED", "LAST RUN", "RUNS", "NEXT DUE")]
    for reg in registrations:
        row = rows.get(reg.name)
        enabled = "yes" if row is None or row.is_enabled else "no"
        last_run = "never"
        if row is not None and row.last_status:  # type: ignore[attr-defined]
            last_run = f"{row.last_status} {local_text(row.last_started)}"  # type: ignore[attr-defined]
        due = next_due(
            reg.schedule,
            next_slot_at=row.next_slot_at if row is not None else None,
            last_checked_at=row.last_checked_at if row is not None else None,
            poll_interval=reg.effective_poll_interval(),
        )
        lines.append(
            (
                reg.name,
                reg.purpose.value,
                str(reg.max_items_per_cycle),
                enabled,
                last_run,
                describe_timing(reg),
                local_text(due) if due is not None else "when a worker starts",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(col.ljust(w) for col, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )

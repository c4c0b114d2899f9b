"""The operator's view: handlers and their recent runs, the run history, item failures, workers.

Every changelist costs a constant number of queries: the last run, what runs now and where, and
the recent runs of a page of handlers come from annotations and one windowed prefetch; runs and
failures select their handler and worker. Backlogs run the handlers' own code: the handler list
asks each *registered* handler on the page (bounded by the code's registry, not by rows).

The failure list is built for millions of rows: newest first by primary key, no sortable
columns, an exact search on the indexed item id, a count capped with ``LIMIT``, filter choices
from small queries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlencode

from django.contrib import admin, messages
from django.core.paginator import Paginator
from django.db.models import Count, OuterRef, Prefetch, Q, QuerySet, Subquery
from django.db.models.functions import Coalesce
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe
from django.utils.text import Truncator, capfirst, format_lazy
from django.utils.timesince import timesince
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from .conf import app_settings
from .exceptions import UnknownHandlerError
from .health import handler_backlog
from .log import plural
from .models import Handler, HandlerQuerySet, HandlerRun, ItemFailure, RunStatus, Worker
from .registry import Registration, registry
from .schedules import local_text, next_due

RECENT_RUNS = 20
"""How many of a handler's newest runs the success rate and the chart cover."""

MAX_FAILURES_SHOWN = 20
"""Item failures listed on a run's page; the rest are one click away in the failure list."""

MAX_ERROR_TYPES_SHOWN = 50
"""Error types in a run's failure summary; the rest are summed up in one line."""

FAILURE_COUNT_CAP = 10_000
"""The failure list counts at most this many rows: a ``COUNT(*)`` over millions would not."""

ERROR_TYPE_SAMPLE = 2_000
"""The error-type filter offers the types of this many newest failures (plus the chosen one)."""

_RATED = {RunStatus.SUCCEEDED, RunStatus.PARTIAL, RunStatus.FAILED, RunStatus.ABANDONED}
"""Outcomes that count for the success rate: not running, and not cancelled by a shutdown."""

_NOTHING = mark_safe('<span class="workitems-muted">-</span>')

CSS = {"all": ["django_workitems/admin.css"]}

if TYPE_CHECKING:  # the admin classes are generic for type checkers only
    HandlerAdminBase = admin.ModelAdmin[Handler]
    HandlerRunAdminBase = admin.ModelAdmin[HandlerRun]
    WorkerAdminBase = admin.ModelAdmin[Worker]
    ItemFailureAdminBase = admin.ModelAdmin[ItemFailure]
    ItemFailureInlineBase = admin.StackedInline[ItemFailure, HandlerRun]
else:
    HandlerAdminBase = HandlerRunAdminBase = WorkerAdminBase = admin.ModelAdmin
    ItemFailureAdminBase = admin.ModelAdmin
    ItemFailureInlineBase = admin.StackedInline


def _change_url(obj: Handler | HandlerRun | Worker) -> str:
    meta = obj._meta
    return reverse(f"admin:{meta.app_label}_{meta.model_name}_change", args=[obj.pk])


def status_badge(status: str) -> SafeString:
    """A run status as a coloured label; the long label is its tooltip."""
    try:
        label = str(RunStatus(status).label)
    except ValueError:
        label = status
    return format_html(
        '<span class="workitems-status workitems-status-{}" title="{}">{}</span>',
        status,
        label,
        status,
    )


def timestamp(moment: datetime | None) -> SafeString:
    """A time in lists: local, to the second, with its zone; ``-`` for none."""
    if moment is None:
        return _NOTHING
    return format_html('<span class="workitems-time">{}</span>', local_text(moment))


def ago(moment: datetime) -> str:
    """``3 minutes ago``; ``just now`` under a minute."""
    if timezone.now() - moment < timedelta(minutes=1):
        return str(_("just now"))
    return str(_("%(time)s ago") % {"time": timesince(moment)})


def format_duration(duration: timedelta | None) -> str:
    """``0.25 s``, ``12.3 s``, ``4 min 05 s``, ``2 h 03 min``."""
    if duration is None:
        return "-"
    seconds = duration.total_seconds()
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def success_rate(runs: Sequence[HandlerRun]) -> tuple[int, int]:
    """(succeeded, rated) runs over ``runs``: partial, failed and abandoned runs count against."""
    rated = [run for run in runs if run.status in _RATED]
    return sum(run.status == RunStatus.SUCCEEDED for run in rated), len(rated)


def item_success_rate(runs: Sequence[HandlerRun]) -> tuple[int, int, int]:
    """(items succeeded, items processed, failed fetches) over the finished runs in ``runs``.

    Items-based, so a partial run counts for what it did: 999 of 1000 items is not a failure.
    A run whose fetch failed processed no items; it is counted apart so it does not vanish.
    """
    rated = [run for run in runs if run.status in _RATED]
    succeeded = sum(run.items_succeeded for run in rated)
    processed = succeeded + sum(run.items_failed for run in rated)
    return succeeded, processed, sum(run.status == RunStatus.FAILED for run in rated)


def recent_runs_chart(
    runs: Sequence[HandlerRun], *, bar: int = 5, height: int = 24, legend: bool = False
) -> SafeString:
    """Inline SVG of ``runs`` (newest first), oldest on the left: items succeeded and failed.

    A run whose fetch failed is a full red bar; every bar has at least a sliver in the colour of
    its status, so cancelled and abandoned runs show too. Each bar links to its run.
    """
    if not runs:
        return _NOTHING
    chronological = list(reversed(runs))
    # A square-root scale: one huge run does not flatten the others into slivers.
    scale = math.sqrt(max(max(r.items_succeeded + r.items_failed for r in chronological), 1))
    gap = 1
    bars = []
    for i, run in enumerate(chronological):
        x = i * (bar + gap)
        total = run.items_succeeded + run.items_failed
        if run.status == RunStatus.FAILED:
            ok_h, failed_h = 0, height
        else:
            bar_h = round(height * math.sqrt(total) / scale)
            failed_h = round(bar_h * run.items_failed / total) if total else 0
            ok_h = bar_h - failed_h
            if run.items_failed and not failed_h:
                failed_h = 1  # one failure among thousands must not vanish
                ok_h = min(ok_h, height - 1)
        marker_h = 2 if ok_h + failed_h < 2 else 0
        title = (
            f"Run {run.pk}, {run.status}, {local_text(run.started_at)}: "
            f"{run.items_succeeded} succeeded, {run.items_failed} failed"
        )
        bars.append(
            format_html(
                '<a href="{url}"><title>{title}</title>'
                '<rect class="workitems-bar-ok" x="{x}" y="{ok_y}" width="{w}" height="{ok_h}"/>'
                '<rect class="workitems-bar-failed" x="{x}" y="{f_y}" width="{w}" '
                'height="{f_h}"/>'
                '<rect class="workitems-bar-{status}" x="{x}" y="{m_y}" width="{w}" '
                'height="{m_h}"/></a>',
                url=_change_url(run),
                title=title,
                x=x,
                w=bar,
                ok_y=height - ok_h,
                ok_h=ok_h,
                f_y=height - ok_h - failed_h,
                f_h=failed_h,
                status=run.status,
                m_y=height - marker_h,
                m_h=marker_h,
            )
        )
    succeeded, rated = success_rate(runs)
    chart = format_html(
        '<svg class="workitems-chart" role="img" width="{}" height="{}" viewBox="0 0 {} {}" '
        'aria-label="{}">{}</svg>',
        len(chronological) * (bar + gap) - gap,
        height,
        len(chronological) * (bar + gap) - gap,
        height,
        f"Last {plural(len(runs), 'run')}: {succeeded} of {rated} succeeded",
        format_html_join("", "{}", ((b,) for b in bars)),
    )
    if not legend:
        return chart
    return format_html(
        '{}<div class="workitems-legend"><span class="workitems-key workitems-key-ok"></span>{} '
        '<span class="workitems-key workitems-key-failed"></span>{} '
        '<span class="workitems-muted">{}</span></div>',
        chart,
        _("items succeeded"),
        _("items failed (a full red bar: the fetch failed)"),
        _("oldest on the left; bar height grows with the square root of the items"),
    )


# Handlers --------------------------------------------------------------------------------


@admin.register(Handler)
class HandlerAdmin(HandlerAdminBase):
    """Handlers are synced from the registry: only ``is_enabled`` is edited here."""

    list_display = (
        "display_name",
        "purpose",
        "is_enabled",
        "activity",
        "recent_success_rate",
        "recent_runs",
        "backlog_summary",
    )
    list_display_links = ("display_name",)
    list_filter = ("purpose", "is_enabled", "is_registered")
    search_fields = ("name",)
    actions = ("enable", "disable", "run_now")
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "name",
                    "purpose",
                    "is_enabled",
                    "is_registered",
                    "handler_class",
                    "max_items_per_cycle",
                )
            },
        ),
        (_("Timing and settings"), {"fields": ("timing", "next_due", "effective_settings")}),
        (
            _("Activity"),
            {
                "fields": (
                    "last_run",
                    "running_now",
                    "recent_success_rate",
                    "recent_runs_large",
                    "backlog",
                    "run_history",
                    "run_requested_at",
                )
            },
        ),
        (_("All time"), {"fields": ("total_runs", "total_items_succeeded", "total_items_failed")}),
        (
            _("Lease and bookkeeping"),
            {
                "fields": ("lease_owner", "lease_expires_at", "created", "modified"),
                "classes": ("collapse",),
            },
        ),
    )
    readonly_fields = (
        "name",
        "purpose",
        "is_registered",
        "handler_class",
        "max_items_per_cycle",
        "timing",
        "next_due",
        "effective_settings",
        "last_run",
        "running_now",
        "recent_success_rate",
        "recent_runs_large",
        "backlog",
        "run_history",
        "run_requested_at",
        "total_runs",
        "total_items_succeeded",
        "total_items_failed",
        "lease_owner",
        "lease_expires_at",
        "created",
        "modified",
    )

    class Media:
        css = CSS

    def get_queryset(self, request: HttpRequest) -> QuerySet[Handler]:
        recent = HandlerRun.objects.only(
            "id",
            "handler_id",
            "status",
            "started_at",
            "finished_at",
            "items_fetched",
            "items_succeeded",
            "items_failed",
        ).order_by("-started_at", "-id")[:RECENT_RUNS]
        handlers = cast(HandlerQuerySet, super().get_queryset(request))
        # "Running now and where": the newest running run and its worker, as subqueries, so the
        # list stays one query for the page whatever the number of handlers.
        running = HandlerRun.objects.filter(
            handler=OuterRef("pk"), status=RunStatus.RUNNING
        ).order_by("-started_at", "-id")
        running_count = (
            HandlerRun.objects.filter(handler=OuterRef("pk"), status=RunStatus.RUNNING)
            .order_by()
            .values("handler")
            .annotate(n=Count("id"))
            .values("n")
        )
        return (
            handlers.with_last_run()
            .annotate(
                running_run_id=Subquery(running.values("id")[:1]),
                running_started_at=Subquery(running.values("started_at")[:1]),
                running_hostname=Subquery(running.values("worker__hostname")[:1]),
                running_pid=Subquery(running.values("worker__pid")[:1]),
                running_count=Coalesce(Subquery(running_count), 0),
            )
            .prefetch_related(Prefetch("runs", queryset=recent, to_attr="recent_run_list"))
        )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # rows come from the registry when workers start

    def has_delete_permission(self, request: HttpRequest, obj: Handler | None = None) -> bool:
        # A registered handler would be recreated, without its history, at the next start.
        return (
            obj is not None
            and not obj.is_registered
            and super().has_delete_permission(request, obj)
        )

    @staticmethod
    def _recent(obj: Handler) -> list[HandlerRun]:
        runs: list[HandlerRun] | None = getattr(obj, "recent_run_list", None)
        if runs is None:  # not fetched through get_queryset()
            runs = list(obj.runs.order_by("-started_at", "-id")[:RECENT_RUNS])
        return runs

    @admin.display(description=_("name"), ordering="name")
    def display_name(self, obj: Handler) -> SafeString:
        if obj.is_registered:
            return format_html("{}", obj.name)
        return format_html(
            '{} <span class="workitems-muted">({})</span>', obj.name, _("no longer registered")
        )

    @admin.display(description=_("max items"), ordering="max_items_per_cycle")
    def max_items(self, obj: Handler) -> int:
        return obj.max_items_per_cycle

    @admin.display(description=_("last run"), ordering="last_run_at")
    def last_run(self, obj: Handler) -> SafeString:
        runs = self._recent(obj)
        if not runs:
            return format_html('<span class="workitems-muted">{}</span>', _("never"))
        run = runs[0]
        return format_html(
            '<a class="workitems-last-run" href="{}" title="{}">{} {}</a>',
            _change_url(run),
            f"{run.started_at:%Y-%m-%d %H:%M:%S %Z}",
            status_badge(run.status),
            ago(run.started_at),
        )

    @admin.display(description=_("last run"), ordering="last_run_at")
    def activity(self, obj: Handler) -> SafeString:
        """The list's column: the last run and, below it, what is running now and where."""
        running = self.running_now(obj)
        if running is _NOTHING:
            return self.last_run(obj)
        return format_html("{}<br>{}", self.last_run(obj), running)

    # Items, not runs (a partial run counts for what it did); the value's title says so.
    @admin.display(description=_("items ok"))
    def recent_success_rate(self, obj: Handler) -> SafeString:
        succeeded, processed, failed_fetches = item_success_rate(self._recent(obj))
        fetches = (
            format_html(
                ' <span class="workitems-rate workitems-rate-bad">{}</span>',
                ngettext("%(n)d fetch failed", "%(n)d fetches failed", failed_fetches)
                % {"n": failed_fetches},
            )
            if failed_fetches
            else ""
        )
        if not processed:
            return format_html("{}", fetches) if fetches else _NOTHING
        rate = 100 * succeeded // processed
        level = "good" if rate >= 90 else "warn" if rate >= 50 else "bad"
        return format_html(
            '<span class="workitems-rate workitems-rate-{}" title="{}">{}%</span>{}',
            level,
            _("%(ok)d of the %(n)d items processed by the last %(runs)d runs succeeded")
            % {"ok": succeeded, "n": processed, "runs": RECENT_RUNS},
            rate,
            fetches,
        )

    @admin.display(description=_("running now"))
    def running_now(self, obj: Handler) -> SafeString:
        run_id = getattr(obj, "running_run_id", None)
        if run_id is None:
            if hasattr(obj, "running_run_id"):
                return _NOTHING
            # Not fetched through get_queryset(): one query for this handler.
            run = obj.runs.filter(status=RunStatus.RUNNING).select_related("worker").first()
            if run is None:
                return _NOTHING
            run_id, started_at, count = run.pk, run.started_at, 1
            where = f"{run.worker.hostname}:{run.worker.pid}" if run.worker else None
        else:
            row: Any = obj  # the annotations of get_queryset()
            started_at, count = row.running_started_at, row.running_count
            where = f"{row.running_hostname}:{row.running_pid}" if row.running_hostname else None
        url = reverse("admin:django_workitems_handlerrun_change", args=[run_id])
        text = format_html(
            '<a class="workitems-running" href="{}" title="{}">{} {}</a>',
            url,
            local_text(started_at),
            status_badge(RunStatus.RUNNING),
            _("on %(where)s") % {"where": where} if where else _("on no recorded worker"),
        )
        if count > 1:
            text = format_html(
                '{} <a href="{}?handler__id__exact={}&amp;status__exact=running">{}</a>',
                text,
                reverse("admin:django_workitems_handlerrun_changelist"),
                obj.pk,
                _("and %(n)d more") % {"n": count - 1},
            )
        return text

    @admin.display(description=_("backlog"))
    def backlog_summary(self, obj: Handler) -> SafeString:
        """The backlog in the list: one call of the handler's code per *registered* handler.

        Unregistered rows cost nothing, so the calls are bounded by the code's registry, not
        by the rows in the table, and the page shows at most ``list_per_page`` handlers.
        """
        if not obj.is_registered:
            return _NOTHING
        backlog = handler_backlog(obj.name)
        if not backlog.registered:
            return _NOTHING
        if backlog.error:
            return format_html(
                '<span class="workitems-status workitems-status-failed" title="{}">{}</span>',
                backlog.error,
                _("error"),
            )
        if backlog.count is None:
            return _NOTHING
        if backlog.oldest_waiting is None:
            return format_html("{}", backlog.count)
        return format_html(
            '<span title="{}">{}</span>',
            _("the oldest waiting since %(time)s") % {"time": local_text(backlog.oldest_waiting)},
            backlog.count,
        )

    @admin.display(description=_("recent runs"))
    def recent_runs(self, obj: Handler) -> SafeString:
        return recent_runs_chart(self._recent(obj))

    @admin.display(description=_("recent runs"))
    def recent_runs_large(self, obj: Handler) -> SafeString:
        return recent_runs_chart(self._recent(obj), bar=12, height=48, legend=True)

    @admin.display(description=_("backlog"))
    def backlog(self, obj: Handler) -> SafeString:
        backlog = handler_backlog(obj.name)
        if not backlog.registered:
            return format_html('<span class="workitems-muted">{}</span>', _("not registered"))
        if backlog.error:
            return format_html(
                '<span class="workitems-status workitems-status-failed">{}</span> {}',
                _("error"),
                backlog.error,
            )
        if backlog.count is None:
            return format_html(
                '<span class="workitems-muted">{}</span>', _("not reported by the handler")
            )
        if backlog.oldest_waiting is None:
            return format_html("{}", _("%(n)d waiting") % {"n": backlog.count})
        return format_html(
            "{}",
            _("%(n)d waiting, the oldest since %(ago)s")
            % {"n": backlog.count, "ago": ago(backlog.oldest_waiting)},
        )

    @staticmethod
    def _registration(obj: Handler) -> Registration | None:
        try:
            return registry.get(obj.name)
        except UnknownHandlerError:
            return None

    @admin.display(description=_("runs"))
    def timing(self, obj: Handler) -> SafeString:
        registration = self._registration(obj)
        if registration is None:
            return format_html('<span class="workitems-muted">{}</span>', _("not registered"))
        cron = registration.cron()
        if cron is None:
            return format_html(
                "{}", _("every %(interval)s") % {"interval": registration.effective_poll_interval()}
            )
        return format_html(
            "<code>{}</code> ({}, {})",
            cron.expression,
            cron.description,
            _("time zone %(zone)s") % {"zone": timezone.get_current_timezone_name()},
        )

    @admin.display(description=_("next due"))
    def next_due(self, obj: Handler) -> SafeString:
        registration = self._registration(obj)
        if registration is None:
            return _NOTHING
        due = next_due(
            registration.schedule,
            next_slot_at=obj.next_slot_at,
            last_checked_at=obj.last_checked_at,
            poll_interval=registration.effective_poll_interval(),
        )
        if due is None:
            return format_html("{}", _("when a worker starts"))
        text = format_html("{}", local_text(due))
        if registration.schedule is not None and obj.taken_slot_at is not None:
            text = format_html(
                "{}; {}",
                text,
                _("last slot %(slot)s") % {"slot": local_text(obj.taken_slot_at)},
            )
        return text

    @admin.display(description=_("settings"))
    def effective_settings(self, obj: Handler) -> SafeString:
        registration = self._registration(obj)
        if registration is None:
            return _NOTHING
        never = _("never")
        item_timeout = registration.effective_item_timeout()
        fetch_timeout = registration.effective_fetch_timeout()
        rows = [
            (_("exclusive"), _("yes") if registration.exclusive else _("no")),
            (_("max concurrency"), registration.max_concurrency or _("no limit")),
            (_("item timeout"), item_timeout if item_timeout is not None else never),
            (_("fetch timeout"), fetch_timeout if fetch_timeout is not None else never),
        ]
        return format_html(
            '<dl class="workitems-settings">{}</dl>',
            format_html_join("", "<dt>{}</dt><dd>{}</dd>", rows),
        )

    @admin.display(description=_("run history"))
    def run_history(self, obj: Handler) -> SafeString:
        url = reverse("admin:django_workitems_handlerrun_changelist")
        return format_html(
            '<a href="{}?handler__id__exact={}">{}</a>', url, obj.pk, _("All runs of this handler")
        )

    # -- actions --------------------------------------------------------------------------

    def _set_enabled(
        self, request: HttpRequest, queryset: QuerySet[Handler], enabled: bool
    ) -> None:
        changed = list(queryset.exclude(is_enabled=enabled))
        Handler.objects.filter(pk__in=[h.pk for h in changed]).update(
            is_enabled=enabled, modified=timezone.now()
        )
        word = _("Enabled") if enabled else _("Disabled")
        for handler in changed:
            self.log_change(request, handler, [{"changed": {"fields": ["is_enabled"]}}])
        self.message_user(
            request,
            ngettext("%(word)s %(count)d handler.", "%(word)s %(count)d handlers.", len(changed))
            % {"word": word, "count": len(changed)},
            messages.SUCCESS,
        )

    @admin.action(description=_("Enable selected handlers"), permissions=["change"])
    def enable(self, request: HttpRequest, queryset: QuerySet[Handler]) -> None:
        self._set_enabled(request, queryset, True)

    @admin.action(description=_("Disable selected handlers"), permissions=["change"])
    def disable(self, request: HttpRequest, queryset: QuerySet[Handler]) -> None:
        self._set_enabled(request, queryset, False)

    @admin.action(description=_("Run selected handlers now"), permissions=["change"])
    def run_now(self, request: HttpRequest, queryset: QuerySet[Handler]) -> None:
        from . import notify  # the public path: what workitems.notify(name) does

        requested, unknown, disabled = [], [], []
        for name, enabled in queryset.values_list("name", "is_enabled").order_by("name"):
            try:
                notify(name)
            except UnknownHandlerError:
                unknown.append(name)
                continue
            requested.append(name)
            if not enabled:
                disabled.append(name)
        if requested:
            self.message_user(
                request,
                _("Asked the workers to run now: %(names)s.") % {"names": ", ".join(requested)},
                messages.SUCCESS,
            )
            if not Worker.objects.alive(app_settings.lease_timeout).exists():
                self.message_user(
                    request,
                    _(
                        "No worker is alive (none heartbeated within %(timeout)s), so the "
                        "request waits: it runs when a worker starts."
                    )
                    % {"timeout": app_settings.lease_timeout},
                    messages.WARNING,
                )
        if disabled:
            self.message_user(
                request,
                _("Disabled, so they will not run until enabled: %(names)s.")
                % {"names": ", ".join(disabled)},
                messages.WARNING,
            )
        if unknown:
            self.message_user(
                request,
                _("Not registered in this code, so they cannot run: %(names)s.")
                % {"names": ", ".join(unknown)},
                messages.ERROR,
            )


# Runs ------------------------------------------------------------------------------------


class ItemFailureInline(ItemFailureInlineBase):
    model = ItemFailure
    extra = 0
    max_num = 0
    can_delete = False
    fields = ("item_id", "error_type", "message", "occurred_at", "traceback_block")
    readonly_fields = fields
    verbose_name_plural = format_lazy(_("item failures (the first {n})"), n=MAX_FAILURES_SHOWN)

    def first_of(self, run: HandlerRun, queryset: QuerySet[ItemFailure]) -> QuerySet[ItemFailure]:
        """The run's first ``MAX_FAILURES_SHOWN`` failures, by id (the order they were recorded).

        A ``LIMIT`` on the run's index, not a sort or a numbering of all its failures: a run
        can have a million.
        """
        first = list(
            ItemFailure.objects.filter(run=run)
            .order_by("id")
            .values_list("id", flat=True)[:MAX_FAILURES_SHOWN]
        )
        return queryset.filter(pk__in=first).order_by("id")

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description=_("traceback"))
    def traceback_block(self, obj: ItemFailure) -> SafeString:
        return traceback_details(obj.traceback)


def traceback_details(traceback: str) -> SafeString:
    """A traceback, collapsed until opened."""
    if not traceback:
        return _NOTHING
    last = traceback.rstrip().rsplit("\n", 1)[-1]
    return format_html(
        '<details class="workitems-details"><summary>{}</summary>'
        '<pre class="workitems-traceback">{}</pre></details>',
        Truncator(last).chars(120),
        traceback,
    )


def failures_url(**params: object) -> str:
    """The failure list, filtered by ``params`` (already in query-string form)."""
    url = reverse("admin:django_workitems_itemfailure_changelist")
    return f"{url}?{urlencode(params)}" if params else url


@admin.register(HandlerRun)
class HandlerRunAdmin(HandlerRunAdminBase):
    """The run history: read-only; only superusers may delete (pruning does it anyway)."""

    list_display = (
        "run",
        "handler",
        "coloured_status",
        "started",
        "duration",  # its title says when it finished
        "fetched",
        "succeeded",
        "failed",
        "worker",
    )
    list_display_links = ("run",)
    list_select_related = ("handler", "worker")
    list_filter = ("status", "handler")
    date_hierarchy = "started_at"
    search_fields = ("handler__name", "=failures__item_id")  # see get_search_results
    search_help_text = _("Handler name, or the exact id of a failed item.")
    ordering = ("-started_at", "-id")
    fields = (
        "handler_link",
        "coloured_status",
        "worker",
        "started_at",
        "finished_at",
        "duration",
        "items_fetched",
        "items_succeeded",
        "items_failed",
        "failure_summary",
        "error_block",
    )
    readonly_fields = fields
    inlines = (ItemFailureInline,)

    class Media:
        css = CSS

    def get_queryset(self, request: HttpRequest) -> QuerySet[HandlerRun]:
        return super().get_queryset(request).select_related("handler", "worker")

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[HandlerRun], search_term: str
    ) -> tuple[QuerySet[HandlerRun], bool]:
        # "=failures__item_id" would be iexact through a join: no index on PostgreSQL. The
        # exact id goes to the item_id index in a subquery, which also needs no DISTINCT.
        term = search_term.strip()
        if not term:
            return queryset, False
        failed = ItemFailure.objects.filter(item_id=term).values("run_id")
        return queryset.filter(Q(handler__name__icontains=term) | Q(pk__in=failed)), False

    def get_formset_kwargs(
        self, request: HttpRequest, obj: HandlerRun, inline: Any, prefix: str
    ) -> dict[str, Any]:
        kwargs = super().get_formset_kwargs(request, obj, inline, prefix)
        if isinstance(inline, ItemFailureInline) and obj is not None and obj.pk is not None:
            kwargs["queryset"] = inline.first_of(obj, kwargs["queryset"])
        return kwargs

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: HandlerRun | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: HandlerRun | None = None) -> bool:
        return bool(request.user.is_superuser)

    @admin.display(description=_("run"), ordering="-id")
    def run(self, obj: HandlerRun) -> str:
        return f"#{obj.pk}"

    @admin.display(description=_("started"), ordering="started_at")
    def started(self, obj: HandlerRun) -> SafeString:
        return timestamp(obj.started_at)

    @admin.display(description=_("finished"))
    def finished(self, obj: HandlerRun) -> SafeString:
        return timestamp(obj.finished_at)

    @admin.display(description=_("failures by error type"))
    def failure_summary(self, obj: HandlerRun) -> SafeString:
        """Counts per error type (one grouped query on the run's index), each a link."""
        counts = list(
            obj.failures.order_by()
            .values("error_type")
            .annotate(n=Count("id"))
            .order_by("-n", "error_type")[: MAX_ERROR_TYPES_SHOWN + 1]
        )
        if not counts:
            return _NOTHING
        rows = [
            (
                failures_url(run__id__exact=obj.pk, error_type=c["error_type"]),
                c["n"],
                c["error_type"],
            )
            for c in counts[:MAX_ERROR_TYPES_SHOWN]
        ]
        more = (
            format_html(
                '<li class="workitems-muted">{}</li>', _("more error types in the full list")
            )
            if len(counts) > MAX_ERROR_TYPES_SHOWN
            else ""
        )
        return format_html(
            '<ul class="workitems-failure-summary">{}{}</ul><p><a href="{}">{}</a></p>',
            format_html_join("", '<li><a href="{}">{} &times; <code>{}</code></a></li>', rows),
            more,
            failures_url(run__id__exact=obj.pk),
            _("All failures of this run"),
        )

    @admin.display(description=_("fetched"), ordering="items_fetched")
    def fetched(self, obj: HandlerRun) -> int:
        return obj.items_fetched

    @admin.display(description=_("ok"), ordering="items_succeeded")
    def succeeded(self, obj: HandlerRun) -> int:
        return obj.items_succeeded

    @admin.display(description=_("failed"), ordering="items_failed")
    def failed(self, obj: HandlerRun) -> int:
        return obj.items_failed

    def render_change_form(
        self,
        request: HttpRequest,
        context: dict[str, Any],
        add: bool = False,
        change: bool = False,
        form_url: str = "",
        obj: HandlerRun | None = None,
    ) -> Any:
        if obj is not None:
            context["subtitle"] = _("Run #%(id)s of %(handler)s") % {
                "id": obj.pk,
                "handler": obj.handler.name,
            }
        return super().render_change_form(request, context, add, change, form_url, obj)

    @admin.display(description=_("handler"), ordering="handler__name")
    def handler_link(self, obj: HandlerRun) -> SafeString:
        return format_html('<a href="{}">{}</a>', _change_url(obj.handler), obj.handler.name)

    @admin.display(description=_("status"), ordering="status")
    def coloured_status(self, obj: HandlerRun) -> SafeString:
        return status_badge(obj.status)

    @admin.display(description=_("duration"))
    def duration(self, obj: HandlerRun) -> str | SafeString:
        if obj.finished_at is None:
            return str(
                _("running for %(d)s") % {"d": format_duration(timezone.now() - obj.started_at)}
            )
        return format_html(
            '<span title="{}">{}</span>',
            _("finished %(at)s") % {"at": local_text(obj.finished_at)},
            format_duration(obj.duration),
        )

    @admin.display(description=_("error"))
    def error_block(self, obj: HandlerRun) -> SafeString:
        if not obj.error:
            return _NOTHING
        return format_html('<pre class="workitems-traceback">{}</pre>', obj.error)


# Workers ---------------------------------------------------------------------------------


class WorkerStateFilter(admin.SimpleListFilter):
    title = _("state")
    parameter_name = "state"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [
            ("alive", str(_("alive"))),
            ("stale", str(_("stale (no recent heartbeat)"))),
            ("stopped", str(_("stopped"))),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Worker]) -> QuerySet[Worker]:
        horizon = timezone.now() - app_settings.lease_timeout
        if self.value() == "alive":
            return queryset.filter(stopped_at__isnull=True, last_heartbeat_at__gte=horizon)
        if self.value() == "stale":
            return queryset.filter(stopped_at__isnull=True, last_heartbeat_at__lt=horizon)
        if self.value() == "stopped":
            return queryset.filter(~Q(stopped_at=None))
        return queryset


@admin.register(Worker)
class WorkerAdmin(WorkerAdminBase):
    """``runworkitems`` processes: alive while they heartbeat within ``LEASE_TIMEOUT``."""

    list_display = ("__str__", "started", "last_heartbeat", "state", "stopped")
    list_filter = (WorkerStateFilter,)
    search_fields = ("hostname", "=pid")
    date_hierarchy = "started_at"
    readonly_fields = ("hostname", "pid", "started_at", "last_heartbeat_at", "state", "stopped_at")
    fields = readonly_fields

    class Media:
        css = CSS

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Worker | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Worker | None = None) -> bool:
        return bool(request.user.is_superuser)

    @admin.display(description=_("started"), ordering="started_at")
    def started(self, obj: Worker) -> SafeString:
        return timestamp(obj.started_at)

    @admin.display(description=_("last heartbeat"), ordering="last_heartbeat_at")
    def last_heartbeat(self, obj: Worker) -> SafeString:
        return timestamp(obj.last_heartbeat_at)

    @admin.display(description=_("stopped"), ordering="stopped_at")
    def stopped(self, obj: Worker) -> SafeString:
        return timestamp(obj.stopped_at)

    @admin.display(description=_("state"))
    def state(self, obj: Worker) -> SafeString:
        if obj.stopped_at is not None:
            return format_html(
                '<span class="workitems-status workitems-status-cancelled">{}</span>', _("stopped")
            )
        age = timezone.now() - obj.last_heartbeat_at
        if age <= app_settings.lease_timeout:
            return format_html(
                '<span class="workitems-status workitems-status-succeeded">{}</span>', _("alive")
            )
        return format_html(
            '<span class="workitems-status workitems-status-failed" title="{}">{}</span>',
            capfirst(_("last heartbeat %(ago)s") % {"ago": ago(obj.last_heartbeat_at)}),
            _("stale"),
        )


# Item failures ---------------------------------------------------------------------------


class CappedCountPaginator(Paginator):  # type: ignore[type-arg]
    """Counts at most ``FAILURE_COUNT_CAP`` rows: ``COUNT(*)`` over a ``LIMIT``, never the table.

    Pages beyond the cap are not reachable; the list says so and the filters narrow it.
    """

    cap = FAILURE_COUNT_CAP

    @property
    def count(self) -> int:
        if not hasattr(self, "_capped_count"):
            object_list = cast(QuerySet[Any], self.object_list)
            self._capped_count = object_list[: self.cap + 1].count()
        return min(self._capped_count, self.cap)

    @property
    def capped(self) -> bool:
        """Whether more rows match than were counted."""
        return self.count > 0 and self._capped_count > self.cap


class ErrorTypeFilter(admin.SimpleListFilter):
    """Error types seen among the newest failures: no ``DISTINCT`` over the whole table."""

    title = _("error type")
    parameter_name = "error_type"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        recent = ItemFailure.objects.order_by("-id").values_list("error_type", flat=True)
        types = set(recent[:ERROR_TYPE_SAMPLE])
        if self.value():
            types.add(str(self.value()))
        return [(t, t) for t in sorted(types)]

    def queryset(
        self, request: HttpRequest, queryset: QuerySet[ItemFailure]
    ) -> QuerySet[ItemFailure]:
        if self.value():
            return queryset.filter(error_type=self.value())
        return queryset


@admin.register(ItemFailure)
class ItemFailureAdmin(ItemFailureAdminBase):
    """Every failed item, newest first; read-only, and cheap on a table of millions.

    Newest first is the primary key's order (no index on ``occurred_at`` is needed), no column
    sorts, the count is capped (``CappedCountPaginator``), search is an exact match on the
    indexed ``item_id``, and the filter choices come from small queries.
    """

    list_display = (
        "occurred",
        "handler",
        "item",
        "error_type",
        "short_message",
        "run_link",
    )
    list_display_links = ("item",)
    list_select_related = ("run__handler",)
    list_filter = (
        "run__handler",  # every handler: a small table, unlike the failures
        ErrorTypeFilter,
        ("occurred_at", admin.DateFieldListFilter),
    )
    search_fields = ("item_id",)  # see get_search_results: exact, on the index
    search_help_text = _("The exact id of an item.")
    ordering = ("-id",)
    sortable_by = ()
    show_full_result_count = False
    paginator = CappedCountPaginator
    fields = (
        "run_link",
        "handler",
        "item_id",
        "error_type",
        "occurred",
        "message_block",
        "traceback_block",
    )
    readonly_fields = fields

    class Media:
        css = CSS

    def get_queryset(self, request: HttpRequest) -> QuerySet[ItemFailure]:
        return super().get_queryset(request).select_related("run__handler")

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[ItemFailure], search_term: str
    ) -> tuple[QuerySet[ItemFailure], bool]:
        # The admin's "=item_id" is iexact, which PostgreSQL cannot answer from the index.
        term = search_term.strip()
        if not term:
            return queryset, False
        return queryset.filter(item_id=term), False

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> Any:
        response = super().changelist_view(request, extra_context)
        if isinstance(response, TemplateResponse) and response.context_data:
            cl = response.context_data.get("cl")
            paginator = getattr(cl, "paginator", None)
            if isinstance(paginator, CappedCountPaginator) and paginator.capped:
                response.context_data["subtitle"] = _(
                    "More than %(n)d failures match; the newest are listed. "
                    "Filter by handler, error type or date to see older ones."
                ) % {"n": paginator.cap}
        return response

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: ItemFailure | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: ItemFailure | None = None) -> bool:
        return bool(request.user.is_superuser)  # as for runs

    @admin.display(description=_("occurred at"))
    def occurred(self, obj: ItemFailure) -> SafeString:
        return timestamp(obj.occurred_at)

    @admin.display(description=_("handler"))
    def handler(self, obj: ItemFailure) -> SafeString:
        handler = obj.run.handler
        return format_html('<a href="{}">{}</a>', _change_url(handler), handler.name)

    @admin.display(description=_("item id"))
    def item(self, obj: ItemFailure) -> str:
        return obj.item_id

    @admin.display(description=_("message"))
    def short_message(self, obj: ItemFailure) -> str:
        return Truncator(obj.message.replace("\n", " ")).chars(100)

    @admin.display(description=_("run"))
    def run_link(self, obj: ItemFailure) -> SafeString:
        return format_html('<a href="{}">#{}</a>', _change_url(obj.run), obj.run_id)

    @admin.display(description=_("message"))
    def message_block(self, obj: ItemFailure) -> SafeString:
        if not obj.message:
            return _NOTHING
        return format_html('<pre class="workitems-message">{}</pre>', obj.message)

    @admin.display(description=_("traceback"))
    def traceback_block(self, obj: ItemFailure) -> SafeString:
        return traceback_details(obj.traceback)

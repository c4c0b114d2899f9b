"""Handler metadata, run history and workers."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Generic, TypeVar

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections, models, router, transaction
from django.db.models import DateTimeField, ExpressionWrapper, F, OuterRef, Q, Subquery
from django.db.models.functions import Now
from django.utils import timezone
from django.utils.translation import gettext_lazy as _
from model_utils import Choices
from model_utils.fields import StatusField
from model_utils.models import TimeStampedModel

from .handlers import Purpose
from .log import plural
from .schedules import SCHEDULE_MAX_LENGTH
from .status import RunStatus as RunStatus
from .wakeups import CHANNEL

_W = TypeVar("_W", bound="WorkItemModel")


class DatabaseNow(Now):
    """``Now()`` at full precision on every backend.

    Django's SQLite form keeps milliseconds only, so a row stamped a moment ago in Python (with
    microseconds) would look a little in the future. SQLite runs inside this process, so its
    clock is this process's clock: the current time, read from the system clock as SQLite
    itself reads it, is passed as a parameter instead.
    """

    def as_sqlite(self, compiler: Any, connection: Any, **extra_context: Any) -> Any:
        now = datetime.now(UTC) if settings.USE_TZ else datetime.now()
        return "%s", (connection.ops.adapt_datetimefield_value(now),)


def db_now() -> Now:
    """The database's clock: every time that decides liveness, claims and back-off."""
    return DatabaseNow()


def db_now_plus(delta: timedelta) -> ExpressionWrapper[Any]:
    """The database's now plus ``delta`` (negative for the past)."""
    return ExpressionWrapper(DatabaseNow() + delta, output_field=DateTimeField())


class WorkerQuerySet(models.QuerySet["Worker"]):
    def alive(self, lease_timeout: timedelta) -> WorkerQuerySet:
        """Workers that heartbeated within ``lease_timeout`` and have not stopped."""
        return self.filter(
            stopped_at__isnull=True, last_heartbeat_at__gte=db_now_plus(-lease_timeout)
        )

    def dead(self, lease_timeout: timedelta) -> WorkerQuerySet:
        """Workers that stopped, or whose heartbeat is older than ``lease_timeout``."""
        return self.filter(
            Q(stopped_at__isnull=False) | Q(last_heartbeat_at__lt=db_now_plus(-lease_timeout))
        )


class Worker(models.Model):
    """One ``runworkitems`` process."""

    hostname = models.CharField(_("hostname"), max_length=255)
    pid = models.PositiveIntegerField(_("pid"))
    started_at = models.DateTimeField(_("started at"), default=timezone.now)
    last_heartbeat_at = models.DateTimeField(_("last heartbeat at"), default=timezone.now)
    stopped_at = models.DateTimeField(_("stopped at"), null=True, blank=True)

    objects = WorkerQuerySet.as_manager()

    class Meta:
        ordering = ["-started_at", "-id"]
        indexes = [models.Index(fields=["last_heartbeat_at"], name="workitems_worker_heartbeat")]
        verbose_name = _("worker")
        verbose_name_plural = _("workers")

    def __str__(self) -> str:
        return f"{self.hostname}:{self.pid}"

    @property
    def lease_owner(self) -> str:
        """The identity this worker writes into the leases it holds."""
        return f"worker:{self.pk}"


class HandlerQuerySet(models.QuerySet["Handler"]):
    def registered(self) -> HandlerQuerySet:
        return self.filter(is_registered=True)

    def enabled(self) -> HandlerQuerySet:
        return self.filter(is_enabled=True)

    def with_last_run(self) -> HandlerQuerySet:
        """Annotate ``last_run_at`` and ``last_run_status`` (the newest run), and
        ``last_success_at`` (when the newest ``succeeded`` run finished), in this one query."""
        runs = HandlerRun.objects.filter(handler=OuterRef("pk")).order_by("-started_at", "-id")
        return self.annotate(
            last_run_at=Subquery(runs.values("started_at")[:1]),
            last_run_status=Subquery(runs.values("status")[:1]),
            last_success_at=Subquery(
                runs.filter(status=RunStatus.SUCCEEDED).values("finished_at")[:1]
            ),
        )


class Handler(TimeStampedModel):
    """A registered handler, synced from the registry when a worker starts."""

    name = models.CharField(_("name"), max_length=100, unique=True)
    purpose = models.CharField(
        _("purpose"), max_length=20, choices=Purpose.choices, default=Purpose.INTERNAL
    )
    max_items_per_cycle = models.PositiveIntegerField(_("max items per cycle"), default=10)
    handler_class = models.CharField(_("handler class"), max_length=255, blank=True)
    is_enabled = models.BooleanField(_("enabled"), default=True)
    is_registered = models.BooleanField(
        _("registered"), default=True, help_text=_("False once the code no longer registers it.")
    )
    run_requested_at = models.DateTimeField(_("run requested at"), null=True, blank=True)
    lease_owner = models.CharField(_("lease owner"), max_length=100, blank=True, default="")
    lease_expires_at = models.DateTimeField(_("lease expires at"), null=True, blank=True)
    last_checked_at = models.DateTimeField(
        _("last checked at"),
        null=True,
        blank=True,
        help_text=_("The last fetch of this handler, even one that found nothing."),
    )
    next_slot_at = models.DateTimeField(
        _("next slot at"),
        null=True,
        blank=True,
        help_text=_("Scheduled handlers: the next cron slot no worker has taken yet."),
    )
    schedule = models.CharField(
        _("schedule"),
        max_length=SCHEDULE_MAX_LENGTH,
        blank=True,
        help_text=_("The cron expression it is registered with (empty: a poll interval)."),
    )
    taken_slot_at = models.DateTimeField(
        _("last slot taken"), null=True, blank=True, help_text=_("The newest slot a worker took.")
    )
    slot_taken_by = models.ForeignKey(
        "Worker",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        verbose_name=_("slot taken by"),
        help_text=_(
            "The worker running the newest slot until that activation ended; another worker "
            "runs the slot again if this one dies first."
        ),
    )
    # All-time figures, added to as runs progress and finish, so they survive run pruning.
    total_runs = models.PositiveBigIntegerField(
        _("total runs"), default=0, help_text=_("Runs finished by a worker, all time.")
    )
    total_items_succeeded = models.PositiveBigIntegerField(_("total items succeeded"), default=0)
    total_items_failed = models.PositiveBigIntegerField(_("total items failed"), default=0)

    objects = HandlerQuerySet.as_manager()

    class Meta:
        ordering = ["name"]
        verbose_name = _("handler")
        verbose_name_plural = _("handlers")

    def __str__(self) -> str:
        return self.name


class HandlerRunQuerySet(models.QuerySet["HandlerRun"]):
    def running(self) -> HandlerRunQuerySet:
        return self.filter(status=RunStatus.RUNNING)

    def finished(self) -> HandlerRunQuerySet:
        return self.exclude(status=RunStatus.RUNNING)

    def expired(self, retention: timedelta, now: datetime | None = None) -> HandlerRunQuerySet:
        """Finished runs that started more than ``retention`` ago: what pruning deletes."""
        return self.finished().filter(started_at__lt=(now or timezone.now()) - retention)


class HandlerRun(models.Model):
    """One activation of a handler: a fetch and the processing of what it returned."""

    Status = RunStatus

    handler = models.ForeignKey(
        Handler, on_delete=models.CASCADE, related_name="runs", verbose_name=_("handler")
    )
    status = models.CharField(
        _("status"), max_length=20, choices=RunStatus.choices, default=RunStatus.RUNNING
    )
    started_at = models.DateTimeField(_("started at"), default=timezone.now)
    finished_at = models.DateTimeField(_("finished at"), null=True, blank=True)
    items_fetched = models.PositiveIntegerField(_("items fetched"), default=0)
    items_succeeded = models.PositiveIntegerField(_("items succeeded"), default=0)
    items_failed = models.PositiveIntegerField(_("items failed"), default=0)
    error = models.TextField(_("error"), blank=True)
    worker = models.ForeignKey(
        Worker,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="runs",
        verbose_name=_("worker"),
    )

    objects = HandlerRunQuerySet.as_manager()

    class Meta:
        ordering = ["-started_at", "-id"]
        indexes = [
            models.Index(fields=["handler", "-started_at"], name="workitems_run_handler_started"),
            models.Index(fields=["status", "worker"], name="workitems_run_status_worker"),
            models.Index(fields=["started_at"], name="workitems_run_started"),
        ]
        verbose_name = _("handler run")
        verbose_name_plural = _("handler runs")

    def __str__(self) -> str:
        return f"Run #{self.pk} of {self.handler} ({self.status})"

    @property
    def duration(self) -> timedelta | None:
        """Wall time from start to finish, None while running."""
        if self.finished_at is None:
            return None
        return self.finished_at - self.started_at

    @property
    def duration_seconds(self) -> float | None:
        duration = self.duration
        return None if duration is None else duration.total_seconds()


class ItemFailure(models.Model):
    """One failed item of a run, with its traceback."""

    run = models.ForeignKey(
        HandlerRun, on_delete=models.CASCADE, related_name="failures", verbose_name=_("run")
    )
    item_id = models.CharField(_("item id"), max_length=255, db_index=True)
    error_type = models.CharField(_("error type"), max_length=255)
    message = models.TextField(_("message"), blank=True)
    traceback = models.TextField(_("traceback"), blank=True)
    occurred_at = models.DateTimeField(_("occurred at"), default=timezone.now)

    class Meta:
        ordering = ["occurred_at", "id"]
        verbose_name = _("item failure")
        verbose_name_plural = _("item failures")

    def __str__(self) -> str:
        return f"{self.item_id}: {self.error_type}"


def quoted_column(model: type[models.Model], name: str, *, using: str) -> str:
    """The quoted column of field ``name`` of ``model``, for SQL this app writes itself."""
    field = model._meta.get_field(name)
    assert isinstance(field, models.Field) and field.column
    return str(connections[using].ops.quote_name(field.column))


def lease_is_free(now: datetime) -> Q:
    """Rows whose lease nobody holds, or whose holder let it expire."""
    return Q(lease_owner="") | Q(lease_expires_at__isnull=True) | Q(lease_expires_at__lt=now)


# Database-backed work items ------------------------------------------------------------


class WorkItemQuerySet(models.QuerySet[_W]):
    """Claims and outcomes of ``WorkItemModel`` rows; every verb is a constant number of queries."""

    def queued(self) -> WorkItemQuerySet[_W]:
        return self.filter(status=WorkItemModel.STATUS.queued)

    def available(self) -> WorkItemQuerySet[_W]:
        """Queued rows whose ``available_at`` has come, on the database's clock."""
        return self.queued().filter(available_at__lte=db_now())

    def abandoned(
        self, lease_timeout: timedelta, *, worker_id: int | None = None
    ) -> WorkItemQuerySet[_W]:
        """Rows in process under a claim whose worker stopped or stopped heartbeating.

        Never the rows of ``worker_id`` itself: a worker that was cut off from the database
        for longer than ``LEASE_TIMEOUT`` is still alive, and so are its items.
        """
        dead = Worker.objects.dead(lease_timeout).values("pk")
        rows = self.filter(status=WorkItemModel.STATUS.processing).filter(
            Q(claimed_by__in=dead)
            | Q(claimed_by__isnull=True, claimed_at__lt=db_now_plus(-lease_timeout))
        )
        if worker_id is not None:
            rows = rows.exclude(claimed_by_id=worker_id)
        return rows

    def claim(
        self,
        max_items: int,
        *,
        worker_id: int | None,
        reclaim: bool = False,
        lease_timeout: timedelta | None = None,
        token: uuid.UUID | None = None,
        where: Q | None = None,
    ) -> list[_W]:
        """Claim up to ``max_items`` available rows (or, with ``reclaim``, abandoned ones).

        ``where`` narrows the candidates further (e.g. by ``attempts``).

        Rows are picked with ``SELECT ... FOR UPDATE SKIP LOCKED`` where the database has it,
        and taken with a conditional UPDATE either way, so two workers never claim one row.
        Each claim carries a fresh token (or ``token``); outcomes are written only where it
        still matches. Every claim counts as an attempt. Any queryset works: one with joins,
        ``distinct()`` or annotations is narrowed to its primary keys first, since rows can
        only be locked in the model's own table.
        """
        token = token or uuid.uuid4()
        candidates = self.claim_candidates(
            worker_id=worker_id, reclaim=reclaim, lease_timeout=lease_timeout, where=where
        )
        if connections[self.db].vendor == "postgresql":
            return ClaimStatement(candidates).run(max_items, worker_id=worker_id, token=token)
        with transaction.atomic(using=self.db):
            ids = list(candidates.values_list("pk", flat=True)[:max_items])
            if not ids:
                return []
            # Re-check the state in the UPDATE itself: SQLite has no row locks, but with
            # IMMEDIATE transactions (see the README) the whole claim holds its write lock.
            candidates.filter(pk__in=ids).update(
                attempts=F("attempts") + 1,
                claimed_at=db_now(),
                modified=db_now(),
                status=WorkItemModel.STATUS.processing,
                claimed_by_id=worker_id,
                claim_token=token,
            )
            # Read inside the transaction: if the connection drops before the commit, the claim
            # is rolled back instead of leaving rows claimed that nobody knows of.
            return list(
                self.model._base_manager.using(self.db).filter(claim_token=token).order_by("pk")
            )

    def claim_candidates(
        self,
        *,
        worker_id: int | None,
        reclaim: bool = False,
        lease_timeout: timedelta | None = None,
        where: Q | None = None,
    ) -> WorkItemQuerySet[_W]:
        """The rows :meth:`claim` picks from, in the order it takes them."""
        # The state filters apply to the locked table itself, so a row claimed by another
        # worker meanwhile is re-checked when it is locked, and skipped.
        rows = self._lockable()
        if reclaim:
            assert lease_timeout is not None
            candidates = rows.abandoned(lease_timeout, worker_id=worker_id).order_by(
                "claimed_at", "pk"
            )
        else:
            candidates = rows.available().order_by("available_at", "pk")
        if where is not None:
            candidates = candidates.filter(where)
        return candidates

    def _lockable(self) -> WorkItemQuerySet[_W]:
        """This queryset as one over the model's table alone, so its rows can be locked."""
        query = self.query
        if not (query.distinct or len(query.alias_map) > 1 or query.annotations or query.extra):
            return self
        base: WorkItemQuerySet[_W] = WorkItemQuerySet(model=self.model, using=self.db)
        return base.filter(pk__in=self.order_by().values("pk"))

    def fail_exhausted_abandoned(
        self, lease_timeout: timedelta, max_attempts: int, *, worker_id: int | None = None
    ) -> int:
        """Mark ``failed`` the abandoned rows that already used every attempt."""
        return (
            self.abandoned(lease_timeout, worker_id=worker_id)
            .filter(attempts__gte=max_attempts)
            .update(
                status=WorkItemModel.STATUS.failed,
                last_error=(
                    f"Its worker died while processing it, {plural(max_attempts, 'time')}: "
                    "the item most likely kills the worker (crash, out of memory)."
                ),
                claimed_by=None,
                claim_token=None,
                modified=db_now(),
            )
        )


def mark_succeeded(
    model: type[WorkItemModel], pks: list[Any], token: uuid.UUID, *, using: str
) -> int:
    """PostgreSQL: mark the rows of ``pks`` still under the claim ``token`` ``succeeded``, in
    one UPDATE whose keys travel as one array; returns how many were."""
    connection = connections[using]
    meta = model._meta
    assert meta.pk is not None

    def column(name: str) -> str:
        return quoted_column(model, name, using=connection.alias)

    # Only quoted identifiers of this model are interpolated; values are parameters.
    sql = (
        f"UPDATE {connection.ops.quote_name(meta.db_table)} SET "  # noqa: S608
        f"{column('status')} = %s, {column('last_error')} = '', "
        f"{column('modified')} = STATEMENT_TIMESTAMP() "
        f"WHERE {column(meta.pk.name)} = ANY(%s) AND {column('claim_token')} = %s "
        f"AND {column('status')} = %s"
    )
    status = WorkItemModel.STATUS
    with connection.cursor() as cursor:
        cursor.execute(sql, [status.succeeded, pks, token, status.processing])
        return int(cursor.rowcount)


class ClaimStatement(Generic[_W]):
    """PostgreSQL: ``UPDATE ... WHERE pk IN (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING``.

    One round trip, atomic on its own: the rows are locked, re-checked and taken together.
    Compiled once from a queryset of candidates (``QuerySetHandler`` keeps it as long as its
    queryset is the class's own); each :meth:`run` binds the limit, the worker and the token,
    and builds the rows as Django would (the fields' database converters, ``from_db``).
    """

    def __init__(self, candidates: WorkItemQuerySet[_W]) -> None:
        if candidates.query.is_sliced:
            raise ValueError(f"cannot claim from a sliced queryset of {candidates.model.__name__}")
        self.model: type[_W] = candidates.model
        self.db = candidates.db
        connection = connections[self.db]
        quote = connection.ops.quote_name
        meta = self.model._meta
        assert meta.pk is not None
        sub_sql, sub_params = candidates.values("pk").query.get_compiler(using=self.db).as_sql()
        fields = list(meta.concrete_fields)
        self._attnames = [f.attname for f in fields]

        def column(name: str) -> str:
            return quoted_column(self.model, name, using=self.db)

        attempts = column("attempts")
        # Only quoted identifiers of this model and Django's own compiled subquery are
        # interpolated; every value goes through the parameters.
        update = (
            f"UPDATE {quote(meta.db_table)} SET "  # noqa: S608
            f"{column('status')} = %s, {column('claimed_by')} = %s, {column('claim_token')} = %s, "
            f"{column('claimed_at')} = STATEMENT_TIMESTAMP(), "
            f"{column('modified')} = STATEMENT_TIMESTAMP(), "
            f"{attempts} = {attempts} + 1 "
            f"WHERE {column(meta.pk.name)} IN ({sub_sql} LIMIT %s FOR UPDATE SKIP LOCKED)"
        )
        returning = f" RETURNING {', '.join(column(f.name) for f in fields)}"
        self._sql = update + returning
        # A claim of its own (autocommit) commits without waiting for its WAL flush: that wait
        # is most of a claim's time, and a claim a database crash loses leaves its rows as they
        # were, to be claimed again, as at-least-once allows. Nothing that depends on it can
        # outlive it: every outcome is a durable commit, which flushes the WAL up to itself.
        self._sql_async = (
            f"WITH {quote('workitems_claim')} AS MATERIALIZED "  # noqa: S608
            "(SELECT set_config('synchronous_commit', 'off', true) AS setting) "
            f"{update} AND (SELECT setting FROM {quote('workitems_claim')}) = 'off'{returning}"
        )
        self._params = list(sub_params)
        self._converters = []
        for index, field in enumerate(fields):
            col = field.get_col(meta.db_table)
            functions = connection.ops.get_db_converters(col) + col.get_db_converters(connection)
            if functions:
                self._converters.append((index, col, functions))

    def run(self, max_items: int, *, worker_id: int | None, token: uuid.UUID) -> list[_W]:
        """Claim up to ``max_items`` rows for ``worker_id`` under ``token``, sorted by pk."""
        connection = connections[self.db]
        params = [WorkItemModel.STATUS.processing, worker_id, token, *self._params, max_items]
        # Within a transaction of the caller's, the setting would apply to all of it: not there.
        own = connection.get_autocommit() and not connection.in_atomic_block
        with connection.cursor() as cursor:
            cursor.execute(self._sql_async if own else self._sql, params)
            fetched = cursor.fetchall()
        rows = []
        for values in fetched:
            if self._converters:
                values = list(values)
                for index, col, functions in self._converters:
                    for function in functions:
                        values[index] = function(values[index], col, connection)
            rows.append(self.model.from_db(self.db, self._attnames, values))
        rows.sort(key=lambda row: row.pk)
        return rows


class WorkItemModel(TimeStampedModel):
    """Abstract base of database-backed work items, claimed by ``QuerySetHandler``."""

    STATUS = Choices("queued", "processing", "succeeded", "failed")

    status = StatusField(_("status"), default=STATUS.queued, db_index=False)
    attempts = models.PositiveIntegerField(_("attempts"), default=0)
    available_at = models.DateTimeField(_("available at"), default=timezone.now)
    claimed_by = models.ForeignKey(
        Worker,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        verbose_name=_("claimed by"),
    )
    claimed_at = models.DateTimeField(_("claimed at"), null=True, blank=True)
    claim_token = models.UUIDField(_("claim token"), null=True, blank=True, editable=False)
    last_error = models.TextField(_("last error"), blank=True)

    notify_handler: ClassVar[str | None] = None
    """Handler to wake at once (as ``notify`` does) when a row is saved ``queued``.

    ``bulk_create`` and ``update`` bypass ``save()``: call ``workitems.notify`` after them.
    """

    objects = WorkItemQuerySet.as_manager()

    class Meta:
        abstract = True
        indexes = [
            # Claims read queued rows by availability, and processing rows by claim age; the
            # status prefix keeps them fast however many finished rows the table holds.
            models.Index(fields=["status", "available_at"]),
            models.Index(fields=["claim_token"]),
        ]

    def save(self, *args: Any, **kwargs: Any) -> None:
        """Save; a queued row of a model with ``notify_handler`` wakes that handler on commit."""
        super().save(*args, **kwargs)
        name = self.notify_handler
        if name and self.status == self.STATUS.queued:
            using = kwargs.get("using") or router.db_for_write(type(self), instance=self)
            transaction.on_commit(lambda: request_run(name, using=using), using=using)

    def outcome_filter(self) -> Q:
        """Rows this claim still holds: the fence for writing an outcome."""
        return Q(pk=self.pk, claim_token=self.claim_token, status=self.STATUS.processing)


def request_run(name: str, using: str = DEFAULT_DB_ALIAS) -> bool:
    """Ask running workers to activate ``name`` now; False when it has no ``Handler`` row.

    Sets ``run_requested_at`` (workers read it within a second) and, on PostgreSQL, sends the
    ``NOTIFY`` that wakes them at once: both in one statement, so one round trip and one commit
    (inside a transaction, the notification goes out with its commit).
    """
    connection = connections[using]
    if connection.vendor != "postgresql":
        updated = (
            Handler.objects.using(using).filter(name=name).update(run_requested_at=timezone.now())
        )
        return updated == 1
    quote = connection.ops.quote_name
    meta = Handler._meta
    column = {f: quoted_column(Handler, f, using=using) for f in ("name", "run_requested_at")}
    # A request of its own (autocommit) commits without waiting for its WAL flush: the request
    # is a hint (a database crash that loses it loses nothing but a wake-up), and the wait is
    # most of its time. Inside the caller's transaction the setting would apply to all of it.
    own = connection.get_autocommit() and not connection.in_atomic_block
    asynchronous = "SELECT set_config('synchronous_commit', 'off', true) AS setting"
    # Only this model's quoted identifiers are interpolated; values are parameters.
    sql = (
        f"WITH requested AS (UPDATE {quote(meta.db_table)} "  # noqa: S608
        f"SET {column['run_requested_at']} = %s WHERE {column['name']} = %s "
        f"RETURNING {column['name']})"
        + (f", unflushed AS MATERIALIZED ({asynchronous})" if own else "")
        + f" SELECT pg_notify(%s, {column['name']}) FROM requested"  # noqa: S608
        + (" WHERE (SELECT setting FROM unflushed) = 'off'" if own else "")
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [timezone.now(), name, CHANNEL])
        return len(cursor.fetchall()) == 1

"""GraphQL (graphene-django): handlers, their runs and failures, and the operator's mutations.

A project's schema inherits :class:`Query` and :class:`Mutation`; projects without one use
:data:`schema`. Queries need the models' ``view_`` permissions, mutations ``change_handler``.

Nested lists never cost a query per parent: the objects a resolver returns know their siblings
(:func:`_batched`), and the first nested resolver to run loads the field for all of them with
one prefetch (runs per handler through a windowed ``Prefetch``, failures per run, the handler
of each run).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, TypeVar

import graphene
from django.db import models
from django.db.models import Prefetch, prefetch_related_objects
from graphene.validation import depth_limit_validator
from graphene_django import DjangoObjectType
from graphene_django_graphiql_static.views import GraphiQLOfflineView
from graphql import ExecutionResult, GraphQLError, parse, specified_rules, validate

from . import recording
from .exceptions import UnknownHandlerError
from .handlers import Purpose
from .health import Backlog, handler_backlog
from .models import Handler, HandlerRun, ItemFailure
from .registry import Registration, registry
from .schedules import next_due
from .status import RunStatus

MAX_DEPTH = 6
"""Queries nested deeper than this are refused before anything runs."""

VALIDATION_RULES: Sequence[Any] = (*specified_rules, depth_limit_validator(max_depth=MAX_DEPTH))
"""graphql-core's rules plus the depth limit: give them to any view serving these types."""

MAX_FIRST = 100
"""The most rows a list field returns, whatever ``first`` asks for."""

DEFAULT_FIRST = 20

_M = TypeVar("_M", bound=models.Model)
_BATCH = "_workitems_batch"
_BACKLOG = "_workitems_backlog"

WorkItemHandlerPurpose = graphene.Enum.from_enum(
    Purpose, name="WorkItemHandlerPurpose", description="What a handler is for."
)


HandlerRunStatus = graphene.Enum(
    "HandlerRunStatus",
    [(status.name, status.value) for status in RunStatus],
    description="How a run ended, or RUNNING.",
)


def _status(value: Any) -> str:
    """The stored value of a ``HandlerRunStatus`` argument (graphene passes the member)."""
    return str(getattr(value, "value", value))


def _registration(handler: Handler) -> Registration | None:
    return registry.get(handler.name) if handler.name in registry else None


def _batched(objects: list[_M]) -> list[_M]:
    """Let each object find its siblings, so a nested field is loaded for all at once."""
    for obj in objects:
        setattr(obj, _BATCH, objects)
    return objects


def _siblings(obj: _M) -> list[_M]:
    batch: list[_M] = getattr(obj, _BATCH, None) or [obj]
    return batch


def _require(info: graphene.ResolveInfo, model: type[models.Model], action: str) -> None:
    """Raise a GraphQL error unless the user is authenticated and has ``action`` on ``model``."""
    user = getattr(info.context, "user", None)
    if user is None or not user.is_authenticated:
        raise GraphQLError("Authentication required: log in to use the work item handlers API.")
    perm = f"{model._meta.app_label}.{action}_{model._meta.model_name}"
    if not user.has_perm(perm):
        raise GraphQLError(f"Permission denied: this needs the {perm} permission.")


def _first(first: int | None) -> int:
    if first is None:
        return DEFAULT_FIRST
    if first < 0:
        raise GraphQLError(f"first must be >= 0, got {first}.")
    return min(first, MAX_FIRST)


def _purpose(value: Any) -> str | None:
    """The stored value of a ``WorkItemHandlerPurpose`` argument (graphene passes the member)."""
    if value is None:
        return None
    return str(getattr(value, "value", value))


def _unknown_handler(name: str) -> GraphQLError:
    return GraphQLError(str(UnknownHandlerError(name, registry.names())))


def _runs_of(handler: Handler, first: int) -> list[HandlerRun]:
    """The newest ``first`` runs of ``handler``, loaded with those of all its siblings."""
    if first == 0:
        return []
    attr = f"_workitems_runs_{first}"
    if not hasattr(handler, attr):
        pending = [h for h in _siblings(handler) if not hasattr(h, attr)]
        newest = HandlerRun.objects.order_by("-started_at", "-id")[:first]
        prefetch_related_objects(pending, Prefetch("runs", queryset=newest, to_attr=attr))
        _batched([run for h in pending for run in getattr(h, attr)])
    runs: list[HandlerRun] = getattr(handler, attr)
    return runs


class ItemFailureType(DjangoObjectType):  # type: ignore[misc]
    class Meta:
        model = ItemFailure
        name = "ItemFailureType"
        description = "One failed item of a run, with its traceback."
        fields = ("id", "item_id", "error_type", "message", "traceback", "occurred_at")


class WorkItemHandlerType(DjangoObjectType):  # type: ignore[misc]
    purpose = graphene.NonNull(WorkItemHandlerPurpose)
    last_run = graphene.Field(lambda: HandlerRunType, description="The newest run.")
    backlog = graphene.Int(description="Items waiting, as the handler reports it; null if unknown.")
    oldest_waiting = graphene.DateTime(
        description="When the oldest waiting item was created, as the handler reports it."
    )
    runs = graphene.NonNull(
        graphene.List(graphene.NonNull(lambda: HandlerRunType)),
        first=graphene.Int(
            description=f"How many, newest first (default {DEFAULT_FIRST}, at most {MAX_FIRST})."
        ),
    )
    poll_interval_seconds = graphene.Float(
        description="Seconds between activations of an interval handler; null when scheduled."
    )
    schedule = graphene.String(description="The cron expression of a scheduled handler.")
    exclusive = graphene.Boolean(required=True, description="At most one worker runs it at a time.")
    next_due_at = graphene.DateTime(description="When it is next due to run, if known.")
    last_checked_at = graphene.DateTime(description="The last fetch, even one that found nothing.")

    class Meta:
        model = Handler
        name = "WorkItemHandlerType"
        description = "A registered work item handler."
        fields = (
            "name",
            "purpose",
            "max_items_per_cycle",
            "is_enabled",
            "is_registered",
            "last_checked_at",
        )
        convert_choices_to_enum = False

    @staticmethod
    def resolve_poll_interval_seconds(root: Handler, info: graphene.ResolveInfo) -> float | None:
        registration = _registration(root)
        if registration is None or registration.schedule:
            return None
        return registration.effective_poll_interval().total_seconds()

    @staticmethod
    def resolve_schedule(root: Handler, info: graphene.ResolveInfo) -> str | None:
        registration = _registration(root)
        return registration.schedule if registration is not None else None

    @staticmethod
    def resolve_exclusive(root: Handler, info: graphene.ResolveInfo) -> bool:
        registration = _registration(root)
        return registration.exclusive if registration is not None else True

    @staticmethod
    def resolve_next_due_at(root: Handler, info: graphene.ResolveInfo) -> datetime | None:
        registration = _registration(root)
        if registration is None:
            return None
        return next_due(
            registration.schedule,
            next_slot_at=root.next_slot_at,
            last_checked_at=root.last_checked_at,
            poll_interval=registration.effective_poll_interval(),
        )

    @staticmethod
    def resolve_last_run(root: Handler, info: graphene.ResolveInfo) -> HandlerRun | None:
        _require(info, HandlerRun, "view")
        runs = _runs_of(root, 1)
        return runs[0] if runs else None

    @staticmethod
    def resolve_runs(
        root: Handler, info: graphene.ResolveInfo, first: int | None = None
    ) -> list[HandlerRun]:
        _require(info, HandlerRun, "view")
        return _runs_of(root, _first(first))

    @staticmethod
    def _backlog(root: Handler) -> Backlog:
        backlog: Backlog | None = getattr(root, _BACKLOG, None)
        if backlog is None:
            backlog = handler_backlog(root.name)
            setattr(root, _BACKLOG, backlog)
        if backlog.error:
            raise GraphQLError(f"The backlog of {root.name} could not be read: {backlog.error}")
        return backlog

    @staticmethod
    def resolve_backlog(root: Handler, info: graphene.ResolveInfo) -> int | None:
        return WorkItemHandlerType._backlog(root).count

    @staticmethod
    def resolve_oldest_waiting(root: Handler, info: graphene.ResolveInfo) -> datetime | None:
        return WorkItemHandlerType._backlog(root).oldest_waiting


class HandlerRunType(DjangoObjectType):  # type: ignore[misc]
    handler = graphene.NonNull(WorkItemHandlerType)
    status = graphene.NonNull(HandlerRunStatus)
    duration_seconds = graphene.Float()
    error = graphene.String()
    failures = graphene.NonNull(graphene.List(graphene.NonNull(ItemFailureType)))

    class Meta:
        model = HandlerRun
        name = "HandlerRunType"
        description = "One activation of a handler: a fetch and the processing of its items."
        fields = (
            "id",
            "handler",
            "status",
            "started_at",
            "finished_at",
            "items_fetched",
            "items_succeeded",
            "items_failed",
            "error",
            "failures",
        )
        convert_choices_to_enum = False

    @staticmethod
    def resolve_status(root: HandlerRun, info: graphene.ResolveInfo) -> str:
        return root.status

    @staticmethod
    def resolve_handler(root: HandlerRun, info: graphene.ResolveInfo) -> Handler:
        _require(info, Handler, "view")
        if not HandlerRun.handler.is_cached(root):
            siblings = _siblings(root)
            prefetch_related_objects(siblings, "handler")
            _batched(list({run.handler.pk: run.handler for run in siblings}.values()))
        return root.handler

    @staticmethod
    def resolve_error(root: HandlerRun, info: graphene.ResolveInfo) -> str | None:
        return root.error or None

    @staticmethod
    def resolve_failures(root: HandlerRun, info: graphene.ResolveInfo) -> list[ItemFailure]:
        prefetch_related_objects(_siblings(root), "failures")
        return list(root.failures.all())


class Query(graphene.ObjectType):  # type: ignore[misc]
    """Read the handlers and their runs; inherit it in a project's ``Query``."""

    available_handlers = graphene.NonNull(
        graphene.List(graphene.NonNull(graphene.String)),
        purpose=WorkItemHandlerPurpose(),
        description="Names of the handlers registered in code, sorted.",
    )
    work_item_handlers = graphene.NonNull(
        graphene.List(graphene.NonNull(WorkItemHandlerType)),
        purpose=WorkItemHandlerPurpose(),
        is_enabled=graphene.Boolean(),
        description="Handlers known to the database, by name.",
    )
    work_item_handler = graphene.Field(
        WorkItemHandlerType,
        name=graphene.String(required=True),
        description="One handler; null while a registered handler has no row yet.",
    )
    handler_runs = graphene.NonNull(
        graphene.List(graphene.NonNull(HandlerRunType)),
        handler=graphene.String(),
        status=HandlerRunStatus(),
        first=graphene.Int(),
        description=f"Runs, newest first (default {DEFAULT_FIRST}, at most {MAX_FIRST}).",
    )

    @staticmethod
    def resolve_available_handlers(
        root: Any, info: graphene.ResolveInfo, purpose: Any = None
    ) -> list[str]:
        _require(info, Handler, "view")
        return registry.names(_purpose(purpose))

    @staticmethod
    def resolve_work_item_handlers(
        root: Any, info: graphene.ResolveInfo, purpose: Any = None, is_enabled: bool | None = None
    ) -> list[Handler]:
        _require(info, Handler, "view")
        handlers = Handler.objects.order_by("name")
        if purpose is not None:
            handlers = handlers.filter(purpose=_purpose(purpose))
        if is_enabled is not None:
            handlers = handlers.filter(is_enabled=is_enabled)
        return _batched(list(handlers))

    @staticmethod
    def resolve_work_item_handler(
        root: Any, info: graphene.ResolveInfo, name: str
    ) -> Handler | None:
        _require(info, Handler, "view")
        handler = Handler.objects.filter(name=name).first()
        if handler is None and name not in registry:
            raise _unknown_handler(name)
        return handler

    @staticmethod
    def resolve_handler_runs(
        root: Any,
        info: graphene.ResolveInfo,
        handler: str | None = None,
        status: Any = None,
        first: int | None = None,
    ) -> list[HandlerRun]:
        _require(info, HandlerRun, "view")
        runs = HandlerRun.objects.order_by("-started_at", "-id")
        if status is not None:
            runs = runs.filter(status=_status(status))
        if handler is not None:
            handler_id = Handler.objects.filter(name=handler).values_list("pk", flat=True).first()
            if handler_id is None:
                if handler in registry:
                    return []  # registered, but no worker has started since: no runs yet
                raise _unknown_handler(handler)
            runs = runs.filter(handler_id=handler_id)
        return _batched(list(runs[: _first(first)]))


class RunWorkItemHandler(graphene.Mutation):  # type: ignore[misc]
    """Ask the running workers to activate a handler now (as ``workitems.notify``)."""

    class Meta:
        name = "RunWorkItemHandlerPayload"

    class Arguments:
        name = graphene.String(required=True)

    ok = graphene.Boolean(required=True)
    handler = graphene.Field(WorkItemHandlerType)

    @staticmethod
    def mutate(root: Any, info: graphene.ResolveInfo, name: str) -> RunWorkItemHandler:
        from . import notify

        _require(info, Handler, "change")
        try:
            notify(name)
        except UnknownHandlerError:
            raise _unknown_handler(name) from None
        return RunWorkItemHandler(ok=True, handler=Handler.objects.filter(name=name).first())


class SetWorkItemHandlerEnabled(graphene.Mutation):  # type: ignore[misc]
    """Enable or disable a handler; workers skip disabled handlers within a second."""

    class Meta:
        name = "SetWorkItemHandlerEnabledPayload"
        # A dict, not an Arguments class, keeps the SPEC's order (name first).
        arguments = {
            "name": graphene.String(required=True),
            "is_enabled": graphene.Boolean(required=True),
        }

    ok = graphene.Boolean(required=True)
    handler = graphene.Field(WorkItemHandlerType)

    @staticmethod
    def mutate(
        root: Any, info: graphene.ResolveInfo, name: str, is_enabled: bool
    ) -> SetWorkItemHandlerEnabled:
        _require(info, Handler, "change")
        handler = Handler.objects.filter(name=name).first()
        if handler is None and name in registry:  # no worker started since it was added
            handler = recording.sync_handlers(registry).get(name)
        if handler is None:
            raise _unknown_handler(name)
        if handler.is_enabled != is_enabled:
            handler.is_enabled = is_enabled
            handler.save(update_fields=["is_enabled", "modified"])
        return SetWorkItemHandlerEnabled(ok=True, handler=handler)


class Mutation(graphene.ObjectType):  # type: ignore[misc]
    """Act on handlers; inherit it in a project's ``Mutation``."""

    run_work_item_handler = RunWorkItemHandler.Field()
    set_work_item_handler_enabled = SetWorkItemHandlerEnabled.Field()


class BoundedSchema(graphene.Schema):  # type: ignore[misc]
    """A schema whose ``execute`` applies :data:`VALIDATION_RULES` (the depth limit) first."""

    def execute(self, request_string: Any = None, *args: Any, **kwargs: Any) -> ExecutionResult:
        source = kwargs.get("source", request_string)
        if isinstance(source, str):
            try:
                document = parse(source)
            except GraphQLError as error:
                return ExecutionResult(data=None, errors=[error])
            errors = validate(self.graphql_schema, document, VALIDATION_RULES)
            if errors:
                return ExecutionResult(data=None, errors=errors)
        result: ExecutionResult = super().execute(request_string, *args, **kwargs)
        return result


class GraphQLView(GraphiQLOfflineView):  # type: ignore[misc]
    """graphene-django's view with :data:`VALIDATION_RULES`: mount this one for these types.

    ``path("graphql/", GraphQLView.as_view(schema=schema, graphiql=True))``; a project with its
    own view class sets ``validation_rules = VALIDATION_RULES`` on it.

    GraphiQL works offline: the page is graphene-django-graphiql-static's template, which loads
    GraphiQL, its explorer, React, whatwg-fetch and graphql-ws from that package's static files
    instead of a CDN (add ``"graphene_django_graphiql_static"`` to ``INSTALLED_APPS``).
    """

    validation_rules = VALIDATION_RULES


schema = BoundedSchema(query=Query, mutation=Mutation)

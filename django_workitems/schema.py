"""GraphQL (graphene-django): handlers, their runs and failures, and the operator's mutations.

A project's schema inherits :class:`Query` and :class:`Mutation`; projects without one use
:data:`schema`. Queries need the models' ``view_`` permissions, mutations ``change_handler``.

Nested lists never cost a query per parent: the objects a resolver returns know their siblings
(:func:`_batched`), and the first nested resolver to run loads the field for all of them with
one prefetch (runs per handler through a windowed ``Prefetch``, failures per run, the handler
of each run).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, TypeVar

import graphene
from django.db import models
from django.db.models import Prefetch, prefetch_related_objects
from graphene_django import DjangoObjectType
from graphql import GraphQLError

from . import recording
from .exceptions import UnknownHandlerError
from .handlers import Purpose
from .health import Backlog, handler_backlog
from .models import Handler, HandlerRun, ItemFailure, RunStatus
from .registry import registry

MAX_FIRST = 100
"""The most rows a list field returns, whatever ``first`` asks for."""

DEFAULT_FIRST = 20

_M = TypeVar("_M", bound=models.Model)
_BATCH = "_workitems_batch"
_BACKLOG = "_workitems_backlog"

WorkItemHandlerPurpose = graphene.Enum.from_enum(
    Purpose, name="WorkItemHandlerPurpose", description="What a handler is for."
)


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

    class Meta:
        model = Handler
        name = "WorkItemHandlerType"
        description = "A registered work item handler."
        fields = ("name", "purpose", "max_items_per_cycle", "is_enabled", "is_registered")
        convert_choices_to_enum = False

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
    status = graphene.String(required=True, description=", ".join(RunStatus.values))
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
        status=graphene.String(),
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
        status: str | None = None,
        first: int | None = None,
    ) -> list[HandlerRun]:
        _require(info, HandlerRun, "view")
        runs = HandlerRun.objects.order_by("-started_at", "-id")
        if status is not None:
            if status not in RunStatus.values:
                raise GraphQLError(
                    f"Unknown run status {status!r}; use one of {', '.join(RunStatus.values)}."
                )
            runs = runs.filter(status=status)
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


schema = graphene.Schema(query=Query, mutation=Mutation)

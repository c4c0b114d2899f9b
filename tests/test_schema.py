"""GraphQL: the SPEC's fields, filters, bounds, errors, permissions and query counts."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import graphene
import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

import django_workitems.background
from django_workitems.models import Handler, HandlerRun, ItemFailure, RunStatus
from django_workitems.recording import sync_handlers
from django_workitems.registry import registry
from django_workitems.schema import MAX_FIRST, Mutation, Query
from tests.factories import HandlerFactory, HandlerRunFactory, ItemFailureFactory
from tests.testapp.models import Task

pytestmark = pytest.mark.django_db


def perms(*codenames: str) -> list[Permission]:
    return list(
        Permission.objects.filter(
            content_type__app_label="django_workitems", codename__in=codenames
        )
    )


@pytest.fixture
def gql(client, django_user_model):
    """Run a GraphQL document as a user with the given permissions (None: anonymous)."""
    logged_in: dict[str, tuple[str, ...] | None] = {}

    def run(
        query: str,
        variables: dict[str, Any] | None = None,
        *,
        user_perms: tuple[str, ...] | None = (
            "view_handler",
            "view_handlerrun",
            "change_handler",
        ),
    ) -> dict[str, Any]:
        if user_perms is not None and user_perms != logged_in.get("perms"):
            user, _ = django_user_model.objects.get_or_create(username="api")
            user.user_permissions.set(perms(*user_perms))
            client.force_login(user)
            logged_in["perms"] = user_perms
        response = client.post(
            "/graphql/",
            json.dumps({"query": query, "variables": variables or {}}),
            content_type="application/json",
        )
        assert response.status_code in (200, 400), response.content  # never a 500
        return response.json()

    return run


def data(result: dict[str, Any]) -> dict[str, Any]:
    assert "errors" not in result, result["errors"]
    return result["data"]


def error(result: dict[str, Any]) -> str:
    assert result.get("errors"), result
    return " | ".join(e["message"] for e in result["errors"])


@pytest.fixture
def handlers() -> dict[str, Handler]:
    return sync_handlers(registry)


# Queries ---------------------------------------------------------------------------------


def test_available_handlers_are_the_registered_names(gql):
    assert data(gql("{ availableHandlers }"))["availableHandlers"] == registry.names()
    result = data(gql("{ availableHandlers(purpose: EXPORT) }"))
    assert result["availableHandlers"] == registry.names("export") == ["slow-jobs"]


def test_work_item_handlers_with_filters(gql, handlers):
    Handler.objects.filter(name="jobs").update(is_enabled=False)
    HandlerFactory(name="retired", is_registered=False, purpose="export")
    query = """query($purpose: WorkItemHandlerPurpose, $enabled: Boolean) {
      workItemHandlers(purpose: $purpose, isEnabled: $enabled) {
        name purpose maxItemsPerCycle isEnabled isRegistered
      }
    }"""

    every = data(gql(query))["workItemHandlers"]
    assert [h["name"] for h in every] == sorted([*handlers, "retired"])
    slow = next(h for h in every if h["name"] == "slow-jobs")
    assert slow == {
        "name": "slow-jobs",
        "purpose": "EXPORT",
        "maxItemsPerCycle": 4,
        "isEnabled": True,
        "isRegistered": True,
    }
    exports = data(gql(query, {"purpose": "EXPORT"}))["workItemHandlers"]
    assert [(h["name"], h["isRegistered"]) for h in exports] == [
        ("retired", False),
        ("slow-jobs", True),
    ]
    disabled = data(gql(query, {"enabled": False}))["workItemHandlers"]
    assert [h["name"] for h in disabled] == ["jobs"]


def test_work_item_handler_with_last_run_runs_and_failures(gql, handlers):
    jobs = handlers["jobs"]
    start = timezone.now() - timedelta(minutes=10)
    old = HandlerRunFactory(handler=jobs, started_at=start)
    new = HandlerRunFactory(
        handler=jobs,
        status=RunStatus.PARTIAL,
        started_at=start + timedelta(minutes=5),
        finished_at=start + timedelta(minutes=5, seconds=1.5),
        items_fetched=2,
        items_succeeded=1,
        items_failed=1,
        error="",
    )
    ItemFailureFactory(run=new, item_id="job-3", message="boom")

    result = data(
        gql(
            """{ workItemHandler(name: "jobs") {
                name
                lastRun { id status durationSeconds error handler { name } }
                runs(first: 5) {
                  id status startedAt finishedAt itemsFetched itemsSucceeded itemsFailed
                  failures { itemId errorType message traceback occurredAt }
                }
            } }"""
        )
    )["workItemHandler"]

    assert result["lastRun"] == {
        "id": str(new.pk),
        "status": "PARTIAL",
        "durationSeconds": 1.5,
        "error": None,
        "handler": {"name": "jobs"},
    }
    assert [r["id"] for r in result["runs"]] == [str(new.pk), str(old.pk)]
    assert result["runs"][0]["failures"] == [
        {
            "itemId": "job-3",
            "errorType": "builtins.ValueError",
            "message": "boom",
            "traceback": "Traceback (most recent call last):\nValueError: bad item\n",
            "occurredAt": result["runs"][0]["failures"][0]["occurredAt"],
        }
    ]
    assert result["runs"][1]["failures"] == []
    assert (result["runs"][0]["itemsFetched"], result["runs"][0]["itemsFailed"]) == (2, 1)


def test_backlog_and_oldest_waiting_come_from_the_handler(gql, handlers):
    Task.objects.bulk_create([Task(), Task()])
    oldest = Task.objects.order_by("created").first().created
    result = data(
        gql(
            """{ tasks: workItemHandler(name: "tasks") { backlog oldestWaiting }
                 jobs: workItemHandler(name: "jobs") { backlog oldestWaiting } }"""
        )
    )
    assert result["tasks"]["backlog"] == 2
    assert result["tasks"]["oldestWaiting"] == oldest.isoformat()
    assert result["jobs"] == {"backlog": None, "oldestWaiting": None}  # not reported


def test_a_backlog_that_raises_is_a_field_error_not_a_failed_query(gql, handlers, monkeypatch):
    from tests.testapp.handlers import TaskHandler

    def broken(self):
        raise ConnectionError("queue down")

    monkeypatch.setattr(TaskHandler, "backlog", broken)
    result = gql('{ workItemHandler(name: "tasks") { name backlog } }')
    assert "ConnectionError: queue down" in error(result)
    assert result["data"]["workItemHandler"] == {"name": "tasks", "backlog": None}


def test_handler_runs_filters_newest_first(gql, handlers):
    jobs, tasks = handlers["jobs"], handlers["tasks"]
    now = timezone.now()
    a = HandlerRunFactory(handler=jobs, started_at=now - timedelta(minutes=3))
    b = HandlerRunFactory(handler=tasks, status=RunStatus.FAILED, started_at=now - timedelta(2))
    c = HandlerRunFactory(handler=jobs, status=RunStatus.FAILED, started_at=now)
    query = """query($handler: String, $status: HandlerRunStatus, $first: Int) {
      handlerRuns(handler: $handler, status: $status, first: $first) { id handler { name } }
    }"""

    def ids(**variables: Any) -> list[int]:
        return [int(r["id"]) for r in data(gql(query, variables))["handlerRuns"]]

    assert ids() == [c.pk, a.pk, b.pk]
    assert ids(handler="jobs") == [c.pk, a.pk]
    assert ids(status="FAILED") == [c.pk, b.pk]
    assert ids(handler="jobs", status="FAILED") == [c.pk]
    assert ids(first=1) == [c.pk]
    assert ids(first=0) == []


def test_first_is_capped_at_100(gql, handlers):
    HandlerRun.objects.bulk_create(
        HandlerRun(handler=handlers["jobs"], status=RunStatus.SUCCEEDED)
        for _ in range(MAX_FIRST + 5)
    )
    result = data(
        gql(
            """{ handlerRuns(first: 500) { id }
                 workItemHandler(name: "jobs") { runs(first: 1000) { id } } }"""
        )
    )
    assert len(result["handlerRuns"]) == MAX_FIRST == 100
    assert len(result["workItemHandler"]["runs"]) == 100
    assert len(data(gql("{ handlerRuns { id } }"))["handlerRuns"]) == 20  # the default


def test_unknown_names_statuses_and_bad_first_are_clear_errors(gql, handlers):
    message = error(gql('{ workItemHandler(name: "nope") { name } }'))
    assert "Unknown work item handler 'nope'" in message and "jobs" in message
    assert "Unknown work item handler 'nope'" in error(
        gql('{ handlerRuns(handler: "nope") { id } }')
    )
    message = error(gql("{ handlerRuns(status: EXPLODED) { id } }"))
    assert "EXPLODED" in message
    assert "first must be >= 0" in error(gql("{ handlerRuns(first: -1) { id } }"))
    assert "first must be >= 0" in error(
        gql('{ workItemHandler(name: "jobs") { runs(first: -5) { id } } }')
    )
    assert error(gql("{ availableHandlers(purpose: SIDEWAYS) }"))  # not an enum value


def test_a_registered_handler_without_a_row_yet_is_null_not_an_error(gql):
    assert not Handler.objects.exists()  # no worker has started
    result = gql('{ workItemHandler(name: "jobs") { name } handlerRuns(handler: "jobs") { id } }')
    assert data(result) == {"workItemHandler": None, "handlerRuns": []}


# Mutations -------------------------------------------------------------------------------


def test_run_work_item_handler_takes_the_notify_path(gql, handlers, monkeypatch):
    called = []
    original = django_workitems.background.notify

    def spy(name, **kwargs):
        called.append(name)
        original(name, **kwargs)

    monkeypatch.setattr(django_workitems.background, "notify", spy)
    result = data(
        gql('mutation { runWorkItemHandler(name: "jobs") { ok handler { name isEnabled } } }')
    )
    assert result["runWorkItemHandler"] == {
        "ok": True,
        "handler": {"name": "jobs", "isEnabled": True},
    }
    assert called == ["jobs"]
    assert Handler.objects.get(name="jobs").run_requested_at is not None


def test_run_work_item_handler_rejects_unknown_and_unregistered_names(gql, handlers):
    HandlerFactory(name="retired", is_registered=False)
    for name in ("nope", "retired"):
        result = gql("mutation($n: String!) { runWorkItemHandler(name: $n) { ok } }", {"n": name})
        assert f"Unknown work item handler '{name}'" in error(result)
        assert result["data"]["runWorkItemHandler"] is None
    assert not Handler.objects.filter(run_requested_at__isnull=False).exists()


def test_set_work_item_handler_enabled(gql, handlers):
    mutation = """mutation($name: String!, $on: Boolean!) {
      setWorkItemHandlerEnabled(name: $name, isEnabled: $on) { ok handler { name isEnabled } }
    }"""
    result = data(gql(mutation, {"name": "jobs", "on": False}))["setWorkItemHandlerEnabled"]
    assert result == {"ok": True, "handler": {"name": "jobs", "isEnabled": False}}
    assert not Handler.objects.get(name="jobs").is_enabled
    data(gql(mutation, {"name": "jobs", "on": True}))
    assert Handler.objects.get(name="jobs").is_enabled
    assert "Unknown work item handler 'nope'" in error(gql(mutation, {"name": "nope", "on": True}))


def test_set_enabled_on_a_registered_handler_creates_its_row(gql):
    mutation = 'mutation { setWorkItemHandlerEnabled(name: "tasks", isEnabled: false) { ok } }'
    assert data(gql(mutation))["setWorkItemHandlerEnabled"] == {"ok": True}
    assert Handler.objects.get(name="tasks").is_enabled is False


# Permissions -----------------------------------------------------------------------------


QUERIES = [
    "{ availableHandlers }",
    "{ workItemHandlers { name } }",
    '{ workItemHandler(name: "jobs") { name } }',
    "{ handlerRuns { id } }",
]
MUTATIONS = [
    'mutation { runWorkItemHandler(name: "jobs") { ok } }',
    'mutation { setWorkItemHandlerEnabled(name: "jobs", isEnabled: false) { ok } }',
]


@pytest.mark.parametrize("document", QUERIES + MUTATIONS)
def test_anonymous_callers_get_an_error_and_no_data(gql, handlers, document):
    HandlerRunFactory(handler=handlers["jobs"])
    result = gql(document, user_perms=None)
    assert "Authentication required" in error(result)
    assert not any((result.get("data") or {}).values())


@pytest.mark.parametrize("document", QUERIES + MUTATIONS)
def test_users_without_permissions_get_an_error_and_no_data(gql, handlers, document):
    HandlerRunFactory(handler=handlers["jobs"])
    result = gql(document, user_perms=())
    assert "Permission denied" in error(result)
    assert not any((result.get("data") or {}).values())


def test_view_permissions_read_but_do_not_act(gql, handlers):
    viewer = ("view_handler", "view_handlerrun")
    for document in QUERIES:
        assert data(gql(document, user_perms=viewer))
    for document in MUTATIONS:
        assert "django_workitems.change_handler" in error(gql(document, user_perms=viewer))
    jobs = Handler.objects.get(name="jobs")
    assert jobs.is_enabled and jobs.run_requested_at is None


def test_runs_need_the_run_view_permission_even_nested(gql, handlers):
    HandlerRunFactory(handler=handlers["jobs"])
    only_handlers = ("view_handler",)
    result = gql(
        '{ workItemHandler(name: "jobs") { name lastRun { id } } }', user_perms=only_handlers
    )
    assert "django_workitems.view_handlerrun" in error(result)
    assert result["data"]["workItemHandler"] == {"name": "jobs", "lastRun": None}
    result = gql("{ handlerRuns { id } }", user_perms=only_handlers)
    assert "django_workitems.view_handlerrun" in error(result)


# Query counts ----------------------------------------------------------------------------


DEEP = """{
  workItemHandlers {
    name
    lastRun { id status failures { itemId } handler { name lastRun { id } } }
    runs(first: 3) { id durationSeconds failures { itemId traceback } handler { name } }
  }
  handlerRuns(first: 100) {
    id handler { name lastRun { id } runs(first: 2) { id } } failures { itemId }
  }
}"""


def test_nested_queries_cost_the_same_for_3_or_30_handlers(gql):
    data(gql("{ availableHandlers }"))  # log in before counting

    def make(count: int) -> int:
        Handler.objects.all().delete()
        handlers = Handler.objects.bulk_create(
            Handler(name=f"h-{i:02d}", purpose="internal") for i in range(count)
        )
        runs = HandlerRun.objects.bulk_create(
            HandlerRun(handler=h, status=RunStatus.PARTIAL, items_failed=2)
            for h in handlers
            for _ in range(3)
        )
        ItemFailure.objects.bulk_create(
            ItemFailure(run=run, item_id=f"{run.pk}-{k}", error_type="E")
            for run in runs
            for k in range(2)
        )
        with CaptureQueriesContext(connection) as ctx:
            result = data(gql(DEEP))
        assert len(result["workItemHandlers"]) == count
        assert len(result["handlerRuns"]) == min(3 * count, 100)
        assert all(len(r["failures"]) == 2 for r in result["handlerRuns"])
        assert all(len(h["runs"]) == 3 for h in result["workItemHandlers"])
        return len(ctx.captured_queries)

    assert make(3) == make(30)


# Composition -----------------------------------------------------------------------------


def test_query_and_mutation_mix_into_a_projects_schema(rf, admin_user, handlers):
    class ProjectQuery(Query, graphene.ObjectType):
        hello = graphene.String()

        def resolve_hello(root, info):
            return "world"

    class ProjectMutation(Mutation, graphene.ObjectType):
        pass

    schema = graphene.Schema(query=ProjectQuery, mutation=ProjectMutation)
    request = rf.post("/graphql/")
    request.user = admin_user
    result = schema.execute("{ hello availableHandlers }", context_value=request)
    assert result.errors is None
    assert result.data == {"hello": "world", "availableHandlers": registry.names()}
    result = schema.execute(
        'mutation { setWorkItemHandlerEnabled(name: "jobs", isEnabled: false) { ok } }',
        context_value=request,
    )
    assert result.errors is None and not Handler.objects.get(name="jobs").is_enabled


def test_queries_nested_deeper_than_6_levels_are_refused_before_any_resolver_runs(
    gql, handlers, monkeypatch
):
    called = []
    monkeypatch.setattr(
        "django_workitems.schema.Query.resolve_handler_runs",
        staticmethod(lambda *a, **k: called.append(1) or []),
    )
    deep = "{ handlerRuns { handler { runs { handler { runs { handler { runs { id } } } } } } } }"
    message = error(gql(deep))
    assert "exceeds maximum operation depth" in message
    assert called == []
    from django_workitems.schema import schema

    result = schema.execute(deep)
    assert result.errors and "maximum operation depth" in str(result.errors[0])
    assert called == []


def test_handler_fields_of_the_spec(gql, handlers):
    data = gql(
        "{ workItemHandlers { name pollIntervalSeconds schedule exclusive nextDueAt "
        "lastCheckedAt } }"
    )
    assert all(isinstance(h["exclusive"], bool) for h in data["data"]["workItemHandlers"])


def test_a_scheduled_handler_shows_its_expression_and_next_slot(gql, handlers, monkeypatch):
    from tests.testapp.handlers import ScheduledHandler

    nightly = (
        type(registry)()
        .add_handler(ScheduledHandler, name="nightly", schedule="0 3 * * *")
        .get("nightly")
    )
    monkeypatch.setitem(registry._registrations, "nightly", nightly)
    sync_handlers(registry)
    slot = timezone.now().replace(hour=3, minute=0, second=0, microsecond=0) + timedelta(days=1)
    Handler.objects.filter(name="nightly").update(next_slot_at=slot)
    query = '{ workItemHandler(name: "%s") { schedule pollIntervalSeconds nextDueAt } }'
    data = gql(query % "nightly")["data"]["workItemHandler"]
    assert data == {
        "schedule": "0 3 * * *",
        "pollIntervalSeconds": None,
        "nextDueAt": slot.isoformat(),
    }
    interval = gql(query % "jobs")["data"]["workItemHandler"]
    assert interval["schedule"] is None and interval["pollIntervalSeconds"] > 0


def test_the_depth_limit_lets_depth_6_through_and_refuses_depth_7(gql, handlers):
    # graphene's depth: the top field is at depth 0, so depth 6 is seven nested fields.
    six = "{ handlerRuns { handler { runs { handler { runs { handler { name } } } } } } }"
    seven = "{ handlerRuns { handler { runs { handler { runs { handler { runs { id } } } } } } } }"
    assert "errors" not in gql(six)
    assert "exceeds maximum operation depth of 6" in error(gql(seven))

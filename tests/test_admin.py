"""The admin: handler, run and worker lists, filters, actions, permissions, query counts."""

from __future__ import annotations

import re
from datetime import timedelta
from urllib.parse import urlencode

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission
from django.contrib.staticfiles import finders
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

import django_workitems.background
from django_workitems.admin import format_duration, recent_runs_chart
from django_workitems.models import Handler, HandlerRun, ItemFailure, RunStatus, Worker
from django_workitems.recording import sync_handlers
from django_workitems.registry import registry
from tests.factories import HandlerFactory, HandlerRunFactory, ItemFailureFactory, WorkerFactory
from tests.testapp.models import Task

pytestmark = pytest.mark.django_db

HANDLERS = reverse("admin:django_workitems_handler_changelist")
RUNS = reverse("admin:django_workitems_handlerrun_changelist")
WORKERS = reverse("admin:django_workitems_worker_changelist")
FAILURES = reverse("admin:django_workitems_itemfailure_changelist")


def handler_url(handler: Handler) -> str:
    return reverse("admin:django_workitems_handler_change", args=[handler.pk])


def run_url(run: HandlerRun) -> str:
    return reverse("admin:django_workitems_handlerrun_change", args=[run.pk])


@pytest.fixture
def viewer(client, django_user_model):
    """A staff user with only the view_ permissions of the app's models."""
    user = django_user_model.objects.create_user("viewer", is_staff=True)
    user.user_permissions.set(
        Permission.objects.filter(
            content_type__app_label="django_workitems", codename__startswith="view_"
        )
    )
    client.force_login(user)
    return client


@pytest.fixture
def operator(client, django_user_model):
    """A staff user with every permission of the app, but not a superuser."""
    user = django_user_model.objects.create_user("operator", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(content_type__app_label="django_workitems"))
    client.force_login(user)
    return client


def synced() -> dict[str, Handler]:
    return sync_handlers(registry)


# Handlers --------------------------------------------------------------------------------


def test_handler_list_shows_last_run_success_rate_and_chart(admin_client):
    jobs = synced()["jobs"]
    base = timezone.now() - timedelta(hours=1)
    for i, status in enumerate([RunStatus.SUCCEEDED, RunStatus.SUCCEEDED, RunStatus.PARTIAL]):
        HandlerRunFactory(
            handler=jobs,
            status=status,
            started_at=base + timedelta(minutes=i),
            items_succeeded=3 if status == RunStatus.SUCCEEDED else 2,
            items_failed=0 if status == RunStatus.SUCCEEDED else 2,
        )
    newest = HandlerRunFactory(
        handler=jobs,
        status=RunStatus.FAILED,
        started_at=base + timedelta(minutes=10),
        items_fetched=0,
        items_succeeded=0,
    )
    HandlerRunFactory(
        handler=jobs, status=RunStatus.CANCELLED, started_at=base, items_failed=50
    )  # not rated

    page = admin_client.get(HANDLERS).content.decode()

    row = _row(page, ">jobs</a>")
    assert f'href="{run_url(newest)}"' in row
    assert "workitems-status-failed" in row and "ago" in row
    # Items-based: 3 + 3 + 2 of 3 + 3 + 4 items; the partial run counts for what it did, the
    # failed fetch is shown apart, the cancelled run is not rated.
    assert ">80%<" in row
    assert "1 fetch failed" in row
    assert "Items ok" in page
    assert row.count("<rect") == 5 * 3 and "<svg" in row
    assert 'aria-label="Last 5 runs: 2 of 4 succeeded"' in row
    assert "django_workitems/admin.css" in page
    # A handler without runs says so instead of drawing an empty chart.
    assert "never" in _row(page, ">slow-jobs</a>")


def test_the_stylesheet_is_found_by_staticfiles():
    assert finders.find("django_workitems/admin.css")


def test_an_unregistered_handler_is_shown_as_such_not_deleted(admin_client):
    HandlerFactory(name="gone", is_registered=True)
    synced()  # the code no longer registers "gone"
    gone = Handler.objects.get(name="gone")
    assert not gone.is_registered

    page = admin_client.get(HANDLERS).content.decode()
    assert "no longer registered" in _row(page, "gone")
    assert "no longer registered" not in _row(page, ">jobs</a>")


def test_handler_filters_and_search(admin_client):
    handlers = synced()
    Handler.objects.filter(name="slow-jobs").update(is_enabled=False)
    HandlerFactory(name="retired", is_registered=False)

    def names(query: str) -> set[str]:
        page = admin_client.get(HANDLERS + query).content.decode()
        return {name for name in [*handlers, "retired"] if re.search(f">{name}[ <]", page)}

    assert names("?purpose__exact=export") == {"slow-jobs"}
    assert names("?purpose__exact=ingestion") == {"broken-fetch"}
    assert names("?is_enabled__exact=0") == {"slow-jobs"}
    assert names("?is_registered__exact=0") == {"retired"}
    assert names("?q=slow") == {"slow-jobs"}
    assert "retired" in names("")


def test_handler_changelist_costs_the_same_queries_for_3_or_300_handlers(admin_client):
    def make(count: int) -> int:
        Handler.objects.all().delete()
        worker = Worker.objects.create(hostname="h", pid=1)
        handlers = Handler.objects.bulk_create(
            Handler(name=f"h-{i:03d}", purpose="internal") for i in range(count)
        )
        now = timezone.now()
        HandlerRun.objects.bulk_create(
            HandlerRun(
                handler=h,
                worker=worker,
                status=status,
                started_at=now - timedelta(minutes=j),
                finished_at=now,
                items_fetched=4,
                items_succeeded=3,
                items_failed=1,
            )
            for h in handlers
            for j, status in enumerate([RunStatus.PARTIAL, RunStatus.SUCCEEDED, RunStatus.FAILED])
        )
        HandlerRun.objects.bulk_create(  # every handler is running now, twice
            HandlerRun(handler=h, worker=worker, status=RunStatus.RUNNING, started_at=now)
            for h in handlers
            for _ in range(2)
        )
        with CaptureQueriesContext(connection) as ctx:
            response = admin_client.get(HANDLERS)
        assert response.status_code == 200
        page = response.content.decode()
        assert page.count('class="workitems-chart"') == min(count, 100)
        assert page.count("on h:1</a>") == min(count, 100)
        assert page.count(">and 1 more</a>") == min(count, 100)
        return len(ctx.captured_queries)

    assert make(3) == make(300)


def test_handler_page_shows_backlog_totals_and_a_link_to_its_runs(admin_client):
    tasks = synced()["tasks"]
    Task.objects.bulk_create([Task(), Task(), Task(status="succeeded")])
    Handler.objects.filter(pk=tasks.pk).update(
        total_runs=1234, total_items_succeeded=50000, total_items_failed=12
    )

    page = admin_client.get(handler_url(tasks)).content.decode()

    assert "2 waiting, the oldest since just now" in page
    assert "1234" in page and "50000" in page
    assert f"{RUNS}?handler__id__exact={tasks.pk}" in page


def test_handler_page_shows_a_backlog_that_cannot_be_read(admin_client, monkeypatch):
    from tests.testapp.handlers import TaskHandler

    def broken(self):
        raise ConnectionError("the queue is unreachable")

    monkeypatch.setattr(TaskHandler, "backlog", broken)
    page = admin_client.get(handler_url(synced()["tasks"])).content.decode()
    assert "ConnectionError: the queue is unreachable" in page


def test_a_handler_without_a_backlog_says_it_does_not_report_one(admin_client):
    page = admin_client.get(handler_url(synced()["jobs"])).content.decode()
    assert "not reported by the handler" in page


def test_only_is_enabled_can_be_edited_on_a_handler(admin_client):
    jobs = synced()["jobs"]
    response = admin_client.post(
        handler_url(jobs), {"name": "renamed", "max_items_per_cycle": "99", "_save": "Save"}
    )
    assert response.status_code == 302
    jobs.refresh_from_db()
    assert jobs.is_enabled is False  # the unchecked box
    assert (jobs.name, jobs.max_items_per_cycle) == ("jobs", 10)


def test_handlers_are_neither_added_nor_deleted_while_registered(admin_client):
    jobs = synced()["jobs"]
    retired = HandlerFactory(name="retired", is_registered=False)
    assert admin_client.get(reverse("admin:django_workitems_handler_add")).status_code == 403
    delete = "admin:django_workitems_handler_delete"
    assert admin_client.get(reverse(delete, args=[jobs.pk])).status_code == 403
    assert admin_client.post(reverse(delete, args=[retired.pk]), {"post": "yes"}).status_code == 302
    assert not Handler.objects.filter(name="retired").exists()
    assert 'value="delete_selected"' not in admin_client.get(HANDLERS).content.decode()


def test_handler_list_shows_what_is_running_now_and_where_and_the_backlog(admin_client):
    handlers = synced()
    worker = WorkerFactory(hostname="box-3", pid=77)
    started = timezone.now() - timedelta(minutes=3)
    running = HandlerRunFactory(
        handler=handlers["jobs"], status=RunStatus.RUNNING, worker=worker, started_at=started
    )
    HandlerRunFactory(handler=handlers["slow-jobs"], status=RunStatus.SUCCEEDED)
    Task.objects.bulk_create([Task(), Task(), Task(status="succeeded")])

    page = admin_client.get(HANDLERS).content.decode()

    jobs = _row(page, ">jobs</a>")
    assert f'href="{run_url(running)}"' in jobs and "on box-3:77</a>" in jobs
    assert f'title="{started:%Y-%m-%d %H:%M:%S} UTC"' in jobs
    assert "workitems-status-running" in jobs
    assert "on box-" not in _row(page, ">slow-jobs</a>")  # finished: not running
    assert re.search(
        r'class="field-backlog_summary"><span title="the oldest waiting since '
        r'[-\d]+ [:\d]+ UTC">2</span>',
        _row(page, ">tasks</a>"),
    )

    detail = admin_client.get(handler_url(handlers["jobs"])).content.decode()
    assert "on box-3:77</a>" in detail


# Actions ---------------------------------------------------------------------------------


def _action(client, action: str, *handlers: Handler):
    return client.post(
        HANDLERS,
        {"action": action, "_selected_action": [h.pk for h in handlers]},
        follow=True,
    )


def test_enable_and_disable_actions_are_logged(admin_client):
    handlers = synced()
    response = _action(admin_client, "disable", handlers["jobs"], handlers["tasks"])
    assert "Disabled 2 handlers." in response.content.decode()
    assert set(Handler.objects.filter(is_enabled=False).values_list("name", flat=True)) == {
        "jobs",
        "tasks",
    }
    assert LogEntry.objects.filter(object_id=str(handlers["jobs"].pk)).count() == 1

    response = _action(admin_client, "enable", handlers["jobs"], handlers["slow-jobs"])
    assert "Enabled 1 handler." in response.content.decode()  # slow-jobs already was
    assert list(Handler.objects.filter(is_enabled=False).values_list("name", flat=True)) == [
        "tasks"
    ]


def test_run_now_takes_the_notify_path(admin_client, monkeypatch):
    handlers = synced()
    called = []
    original = django_workitems.background.notify

    def spy(name, **kwargs):
        called.append(name)
        original(name, **kwargs)

    monkeypatch.setattr(django_workitems.background, "notify", spy)
    Handler.objects.filter(name="slow-jobs").update(is_enabled=False)

    response = _action(admin_client, "run_now", handlers["jobs"], handlers["slow-jobs"])

    page = response.content.decode()
    assert called == ["jobs", "slow-jobs"]
    assert "Asked the workers to run now: jobs, slow-jobs." in page
    assert "Disabled, so they will not run until enabled: slow-jobs." in page
    requested = dict(Handler.objects.values_list("name", "run_requested_at"))
    assert requested["jobs"] is not None and requested["slow-jobs"] is not None
    assert requested["tasks"] is None


def test_run_now_warns_when_no_live_worker_will_see_the_request(admin_client):
    handlers = synced()
    WorkerFactory(hostname="stale", last_heartbeat_at=timezone.now() - timedelta(hours=1))
    WorkerFactory(hostname="stopped", stopped_at=timezone.now())

    page = _action(admin_client, "run_now", handlers["jobs"]).content.decode()
    assert "Asked the workers to run now: jobs." in page
    assert "No worker is alive" in page and "it runs when a worker starts" in page
    assert re.search(r'class="warning"[^>]*>No worker is alive', page)

    WorkerFactory(hostname="alive")
    page = _action(admin_client, "run_now", handlers["jobs"]).content.decode()
    assert "Asked the workers to run now: jobs." in page
    assert "No worker is alive" not in page


def test_run_now_refuses_a_handler_the_code_no_longer_registers(admin_client):
    synced()
    retired = HandlerFactory(name="retired", is_registered=False)
    page = _action(admin_client, "run_now", retired).content.decode()
    assert "Not registered in this code, so they cannot run: retired." in page
    retired.refresh_from_db()
    assert retired.run_requested_at is None


# Permissions -----------------------------------------------------------------------------


def test_a_view_only_user_sees_but_cannot_act(viewer):
    handlers = synced()
    run = ItemFailureFactory(run__handler=handlers["jobs"]).run

    page = viewer.get(HANDLERS).content.decode()
    assert ">jobs</a>" in page
    assert 'name="action"' not in page  # every action needs the change permission
    response = _action(viewer, "disable", handlers["jobs"])
    assert Handler.objects.get(name="jobs").is_enabled
    assert response.status_code == 200

    change_page = viewer.get(handler_url(handlers["jobs"])).content.decode()
    assert 'name="_save"' not in change_page
    assert viewer.post(handler_url(handlers["jobs"]), {"_save": "Save"}).status_code == 403
    assert Handler.objects.get(name="jobs").is_enabled

    assert viewer.get(run_url(run)).status_code == 200
    assert viewer.get(WORKERS).status_code == 200


def test_an_operator_acts_but_only_a_superuser_deletes_runs(operator, admin_client):
    handlers = synced()
    run = HandlerRunFactory(handler=handlers["jobs"])
    delete = reverse("admin:django_workitems_handlerrun_delete", args=[run.pk])

    _action(operator, "disable", handlers["jobs"])
    assert not Handler.objects.get(name="jobs").is_enabled
    assert operator.post(delete, {"post": "yes"}).status_code == 403
    assert operator.get(reverse("admin:django_workitems_handlerrun_add")).status_code == 403

    assert admin_client.post(delete, {"post": "yes"}).status_code == 302
    assert not HandlerRun.objects.filter(pk=run.pk).exists()


def test_anonymous_users_are_sent_to_the_login_page(client):
    for url in (HANDLERS, RUNS, WORKERS):
        response = client.get(url)
        assert response.status_code == 302 and "/login/" in response["Location"]


# Runs ------------------------------------------------------------------------------------


def test_run_list_is_newest_first_with_status_duration_counts_and_worker(admin_client):
    jobs = synced()["jobs"]
    worker = WorkerFactory(hostname="box-7", pid=4242)
    start = timezone.now() - timedelta(hours=2)
    older = HandlerRunFactory(
        handler=jobs, started_at=start, finished_at=start + timedelta(seconds=75), worker=worker
    )
    newer = HandlerRunFactory(
        handler=jobs,
        status=RunStatus.PARTIAL,
        started_at=start + timedelta(hours=1),
        finished_at=start + timedelta(hours=1, seconds=2.5),
        items_fetched=7,
        items_succeeded=5,
        items_failed=2,
    )

    page = admin_client.get(RUNS).content.decode()

    assert page.index(f">#{newer.pk}<") < page.index(f">#{older.pk}<")
    assert "workitems-status-partial" in _row(page, f"#{newer.pk}")
    assert "1 min 15 s" in _row(page, f"#{older.pk}") and "box-7:4242" in page
    assert "2.50 s" in _row(page, f"#{newer.pk}")
    assert re.search(r'class="field-failed">2<', page)


def test_run_filters_date_hierarchy_and_search(admin_client):
    handlers = synced()
    a = HandlerRunFactory(handler=handlers["jobs"], status=RunStatus.SUCCEEDED)
    b = HandlerRunFactory(handler=handlers["tasks"], status=RunStatus.PARTIAL)
    ItemFailureFactory(run=b, item_id="order-77")
    old = HandlerRunFactory(
        handler=handlers["jobs"], started_at=timezone.now() - timedelta(days=400)
    )

    def ids(query: str) -> set[int]:
        page = admin_client.get(RUNS + query).content.decode()
        return {run.pk for run in (a, b, old) if f">#{run.pk}<" in page}

    assert ids("") == {a.pk, b.pk, old.pk}
    assert ids("?status__exact=partial") == {b.pk}
    assert ids(f"?handler__id__exact={handlers['jobs'].pk}") == {a.pk, old.pk}
    assert ids(f"?started_at__year={old.started_at.year}") >= {old.pk}
    assert a.pk not in ids(f"?started_at__year={old.started_at.year}")
    assert ids("?q=tasks") == {b.pk}
    assert ids("?q=order-77") == {b.pk}
    assert ids("?q=order-7") == set()  # item ids match exactly
    assert ids("?q=ORDER-77") == set()  # and case-sensitively, on the item_id index
    assert ids("?q=TASKS") == {b.pk}  # handler names do not care about case


def test_run_changelist_costs_the_same_queries_for_3_or_300_runs(admin_client):
    handlers = list(synced().values())

    def make(count: int) -> int:
        HandlerRun.objects.all().delete()
        workers = [Worker.objects.create(hostname="h", pid=i) for i in range(3)]
        HandlerRun.objects.bulk_create(
            HandlerRun(
                handler=handlers[i % len(handlers)],
                worker=workers[i % 3],
                status=RunStatus.PARTIAL,
                finished_at=timezone.now(),
                items_failed=1,
            )
            for i in range(count)
        )
        with CaptureQueriesContext(connection) as ctx:
            response = admin_client.get(RUNS)
        assert response.status_code == 200
        return len(ctx.captured_queries)

    assert make(3) == make(300)


def test_run_page_lists_its_failures_with_escaped_tracebacks_read_only(admin_client):
    failure = ItemFailureFactory(
        item_id="item-9",
        traceback='Traceback (most recent call last):\n  File "x.py"\nValueError: <b>bad</b>\n',
    )
    run = failure.run
    HandlerRun.objects.filter(pk=run.pk).update(error="RuntimeError: fetch <down>")

    response = admin_client.get(run_url(run))
    page = response.content.decode()

    assert response.status_code == 200
    assert "item-9" in page
    assert re.search(
        r'<pre class="workitems-traceback">Traceback \(most recent call last\):\n'
        r"  File &quot;x.py&quot;\nValueError: &lt;b&gt;bad&lt;/b&gt;\n</pre>",
        page,
    )
    assert "RuntimeError: fetch &lt;down&gt;" in page
    assert f"Run #{run.pk} of {run.handler.name}" in page
    assert 'name="_save"' not in page
    assert admin_client.post(run_url(run), {"_save": "Save"}).status_code == 403


def test_a_run_page_lists_20_failures_and_sums_up_the_rest_by_error_type(admin_client):
    run = HandlerRunFactory(status=RunStatus.PARTIAL, items_failed=500)
    now = timezone.now()
    ItemFailure.objects.bulk_create(
        ItemFailure(
            run=run,
            item_id=f"item-{i:03d}",
            error_type="builtins.ValueError" if i % 5 else "myapp.errors.Timeout<x>",
            occurred_at=now + timedelta(seconds=i),
            traceback=f"Traceback\nValueError: number {i}",
        )
        for i in range(500)
    )
    other = ItemFailureFactory(item_id="elsewhere", error_type="other.Error")  # another run's

    page = admin_client.get(run_url(run)).content.decode()

    shown = set(re.findall(r"item-\d{3}", page))
    assert len(shown) == 20 and "item-000" in shown and "item-020" not in shown
    assert other.item_id not in page and "other.Error" not in page
    assert "Item failures (the first 20)" in page
    # The summary: counts per error type, most frequent first, each linking to the failure
    # list filtered to this run and that type.
    values = f"{FAILURES}?run__id__exact={run.pk}&amp;error_type=builtins.ValueError"
    timeouts = f"{FAILURES}?run__id__exact={run.pk}&amp;error_type=myapp.errors.Timeout%3Cx%3E"
    assert page.index(f'<a href="{values}">400 &times;') < page.index(
        f'<a href="{timeouts}">100 &times; <code>myapp.errors.Timeout&lt;x&gt;</code>'
    )
    assert f'href="{FAILURES}?run__id__exact={run.pk}">All failures of this run' in page
    # Tracebacks are collapsed until opened.
    assert re.search(
        r'<details class="workitems-details"><summary>ValueError: number 0</summary>'
        r'<pre class="workitems-traceback">Traceback\nValueError: number 0</pre></details>',
        page,
    )

    # The links work: the filtered list shows that run's failures of that type only.
    listed = admin_client.get(values.replace("&amp;", "&")).content.decode()
    assert ">item-499<" in listed and ">item-498<" in listed  # newest first
    assert ">item-495<" not in listed and "elsewhere" not in listed


def test_run_list_shows_start_and_finish_to_the_second_with_the_zone(admin_client):
    start = timezone.now().replace(microsecond=0) - timedelta(hours=1)
    run = HandlerRunFactory(started_at=start, finished_at=start + timedelta(seconds=7))
    running = HandlerRunFactory(status=RunStatus.RUNNING, started_at=start)

    page = admin_client.get(RUNS).content.decode()

    row = _row(page, f">#{run.pk}<")
    assert f"{start:%Y-%m-%d %H:%M:%S} UTC" in row
    assert f'title="finished {start + timedelta(seconds=7):%Y-%m-%d %H:%M:%S} UTC">7' in row
    assert "running for" in _row(page, f">#{running.pk}<")


# Item failures ---------------------------------------------------------------------------


def test_failure_list_shows_time_handler_item_error_message_and_run(admin_client):
    jobs = synced()["jobs"]
    moment = timezone.now().replace(microsecond=0) - timedelta(minutes=5)
    failure = ItemFailureFactory(
        run__handler=jobs,
        item_id="order-42",
        error_type="builtins.KeyError",
        message="x" * 300,
        occurred_at=moment,
    )

    page = admin_client.get(FAILURES).content.decode()

    row = _row(page, "order-42")
    assert f"{moment:%Y-%m-%d %H:%M:%S} UTC" in row
    assert f'href="{handler_url(jobs)}">jobs</a>' in row
    assert "builtins.KeyError" in row
    assert "x" * 99 + "…" in row and "x" * 101 not in row  # truncated
    assert f'href="{run_url(failure.run)}">#{failure.run.pk}</a>' in row
    # Nothing sorts but the default (newest first on the primary key).
    assert "sortable" not in page.split('id="result_list"')[1].split("</thead>")[0]


def test_failure_filters_and_search(admin_client):
    handlers = synced()
    old = timezone.now() - timedelta(days=40)
    a = ItemFailureFactory(run__handler=handlers["jobs"], item_id="a-1", error_type="x.A")
    b = ItemFailureFactory(run__handler=handlers["tasks"], item_id="a-12", error_type="x.B")
    c = ItemFailureFactory(
        run__handler=handlers["jobs"], item_id="c-3", error_type="x.B", occurred_at=old
    )

    def items(query: str) -> set[str]:
        page = admin_client.get(FAILURES + query).content.decode()
        return {f.item_id for f in (a, b, c) if f">{f.item_id}<" in page}

    assert items("") == {"a-1", "a-12", "c-3"}
    assert items(f"?run__handler__id__exact={handlers['jobs'].pk}") == {"a-1", "c-3"}
    assert items("?error_type=x.B") == {"a-12", "c-3"}
    assert items(f"?run__id__exact={b.run.pk}") == {"a-12"}
    since = timezone.now() - timedelta(days=7)
    assert items("?" + urlencode({"occurred_at__gte": str(since)})) == {"a-1", "a-12"}
    assert items("?q=a-1") == {"a-1"}  # exact: not a-12
    assert items("?q=+c-3+") == {"c-3"}
    assert items("?q=A-1") == set()  # exact, on the index: not case-folded

    page = admin_client.get(FAILURES).content.decode()
    assert "?error_type=x.A" in page and "?error_type=x.B" in page  # the filter's choices
    assert "Past 7 days" in page


def test_failure_page_collapses_the_traceback_and_is_read_only(admin_client, operator):
    failure = ItemFailureFactory(
        message="bad <item>", traceback="Traceback\n  File <x>\nValueError: bad <item>\n"
    )
    url = reverse("admin:django_workitems_itemfailure_change", args=[failure.pk])

    page = admin_client.get(url).content.decode()
    assert (
        '<details class="workitems-details"><summary>ValueError: bad &lt;item&gt;</summary>'
        '<pre class="workitems-traceback">Traceback\n  File &lt;x&gt;\nValueError: bad '
        "&lt;item&gt;\n</pre></details>"
    ) in page
    assert 'name="_save"' not in page
    assert admin_client.post(url, {"_save": "Save"}).status_code == 403
    assert admin_client.get(reverse("admin:django_workitems_itemfailure_add")).status_code == 403

    delete = reverse("admin:django_workitems_itemfailure_delete", args=[failure.pk])
    assert operator.post(delete, {"post": "yes"}).status_code == 403
    assert ItemFailure.objects.filter(pk=failure.pk).exists()
    assert admin_client.post(delete, {"post": "yes"}).status_code == 302
    assert not ItemFailure.objects.filter(pk=failure.pk).exists()


def test_a_view_only_user_sees_the_failures(viewer):
    failure = ItemFailureFactory(item_id="seen-1")
    assert ">seen-1<" in viewer.get(FAILURES).content.decode()
    url = reverse("admin:django_workitems_itemfailure_change", args=[failure.pk])
    assert viewer.get(url).status_code == 200


def test_failure_changelist_costs_the_same_queries_and_never_counts_the_table(
    admin_client, monkeypatch
):
    from django_workitems.admin import CappedCountPaginator

    monkeypatch.setattr(CappedCountPaginator, "cap", 250)
    handlers = list(synced().values())
    runs = [HandlerRunFactory(handler=h, status=RunStatus.PARTIAL) for h in handlers]

    def make(count: int, query: str = "") -> tuple[int, str]:
        ItemFailure.objects.all().delete()
        ItemFailure.objects.bulk_create(
            ItemFailure(run=runs[i % len(runs)], item_id=f"i-{i}", error_type=f"e.E{i % 4}")
            for i in range(count)
        )
        with CaptureQueriesContext(connection) as ctx:
            response = admin_client.get(FAILURES + query)
        assert response.status_code == 200
        counts = [q["sql"].upper() for q in ctx.captured_queries if "COUNT(" in q["sql"].upper()]
        assert counts  # the paginator counts...
        for sql in counts:
            assert "LIMIT" in sql, sql  # ...but over a capped subquery, never the whole table
        return len(ctx.captured_queries), response.content.decode()

    small, page = make(3)
    assert "More than" not in page and "3 item failures" in page
    big, page = make(300)
    assert small == big
    assert "More than 250 failures match" in page  # the cap is said, not hidden
    assert page.count('class="field-occurred"') == 100  # a page of the newest
    assert ">i-299<" in page and ">i-199<" not in page
    filtered = make(3, "?error_type=e.E1&occurred_at__gte=2000-01-01+00%3A00%3A00%2B00%3A00")[0]
    assert (
        filtered
        == make(300, "?error_type=e.E1&occurred_at__gte=2000-01-01+00%3A00%3A00%2B00%3A00")[0]
    )


# Workers ---------------------------------------------------------------------------------


def test_workers_are_alive_stale_or_stopped(admin_client):
    now = timezone.now()
    alive = WorkerFactory(hostname="alive-host")
    stale = WorkerFactory(hostname="stale-host", last_heartbeat_at=now - timedelta(minutes=5))
    stopped = WorkerFactory(hostname="stopped-host", stopped_at=now)

    page = admin_client.get(WORKERS).content.decode()
    assert "workitems-status-succeeded" in _row(page, str(alive))
    assert f"{stopped.stopped_at:%Y-%m-%d %H:%M:%S} UTC" in _row(page, str(stopped))
    assert ">stale<" in _row(page, str(stale))
    assert ">stopped<" in _row(page, str(stopped))

    def shown(query: str) -> set[str]:
        page = admin_client.get(f"{WORKERS}?{query}").content.decode()
        return {w.hostname for w in (alive, stale, stopped) if f">{w}<" in page}

    for state, expected in (("alive", alive), ("stale", stale), ("stopped", stopped)):
        assert shown(f"state={state}") == {expected.hostname}, state
    assert shown("q=stale-host") == {"stale-host"}
    assert shown(f"q={stopped.pid}") == {"stopped-host"}


def test_worker_changelist_costs_the_same_queries_for_3_or_300_workers(admin_client):
    def make(count: int) -> int:
        Worker.objects.all().delete()
        Worker.objects.bulk_create(Worker(hostname=f"h{i}", pid=i) for i in range(count))
        with CaptureQueriesContext(connection) as ctx:
            assert admin_client.get(WORKERS).status_code == 200
        return len(ctx.captured_queries)

    assert make(3) == make(300)


# Helpers ---------------------------------------------------------------------------------


def test_format_duration():
    assert format_duration(None) == "-"
    assert format_duration(timedelta(seconds=0.25)) == "0.25 s"
    assert format_duration(timedelta(seconds=12.34)) == "12.3 s"
    assert format_duration(timedelta(seconds=245)) == "4 min 05 s"
    assert format_duration(timedelta(hours=2, minutes=3)) == "2 h 03 min"


def test_the_chart_keeps_a_single_failure_visible_among_many_successes():
    run = HandlerRunFactory.build(
        pk=1, status=RunStatus.PARTIAL, items_succeeded=1000, items_failed=1
    )
    svg = str(recent_runs_chart([run]))
    assert re.search(r'class="workitems-bar-failed" x="0" y="\d+" width="5" height="1"', svg)
    assert str(recent_runs_chart([])).count("<svg") == 0


def test_one_huge_run_does_not_flatten_the_others_and_the_large_chart_has_a_legend():
    huge = HandlerRunFactory.build(pk=1, status=RunStatus.SUCCEEDED, items_succeeded=10_000)
    small = HandlerRunFactory.build(pk=2, status=RunStatus.SUCCEEDED, items_succeeded=100)
    svg = str(recent_runs_chart([small, huge], bar=12, height=48))  # newest first
    heights = [int(h) for h in re.findall(r'class="workitems-bar-ok" [^>]*height="(\d+)"', svg)]
    assert heights == [48, 5]  # a linear scale would give the small run 0 px
    assert "workitems-legend" not in svg
    large = str(recent_runs_chart([small, huge], bar=12, height=48, legend=True))
    assert "items succeeded" in large and "square root" in large


def _row(page: str, text: str) -> str:
    """The changelist table row that contains ``text``."""
    for row in re.findall(r"<tr[^>]*>.*?</tr>", page, flags=re.S):
        if text in row:
            return row
    raise AssertionError(f"no row with {text!r}")


def test_handler_page_shows_its_schedule_in_words_next_slot_and_settings(admin_client, monkeypatch):
    from tests.testapp.handlers import ScheduledHandler

    nightly = (
        type(registry)()
        .add_handler(ScheduledHandler, name="nightly", schedule="0 3 * * *", max_concurrency=2)
        .get("nightly")
    )
    monkeypatch.setitem(registry._registrations, "nightly", nightly)
    rows = synced()
    slot = timezone.now().replace(hour=3, minute=0, second=0, microsecond=0) + timedelta(days=1)
    Handler.objects.filter(name="nightly").update(next_slot_at=slot)

    page = admin_client.get(handler_url(rows["nightly"])).content.decode()
    assert "<code>0 3 * * *</code> (At 03:00 every day, time zone UTC)" in page
    assert f"{slot:%Y-%m-%d} 03:00:00 UTC" in page
    assert "<dt>max concurrency</dt><dd>2</dd>" in page
    assert "<dt>exclusive</dt><dd>yes</dd>" in page

    interval = admin_client.get(handler_url(rows["jobs"])).content.decode()
    assert "every 0:" in interval and "when a worker starts" in interval

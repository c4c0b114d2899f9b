"""The admin: handler, run and worker lists, filters, actions, permissions, query counts."""

from __future__ import annotations

import re
from datetime import timedelta

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
        HandlerRunFactory(handler=jobs, status=status, started_at=base + timedelta(minutes=i))
    newest = HandlerRunFactory(
        handler=jobs,
        status=RunStatus.FAILED,
        started_at=base + timedelta(minutes=10),
        items_fetched=0,
        items_succeeded=0,
    )
    HandlerRunFactory(handler=jobs, status=RunStatus.CANCELLED, started_at=base)  # not rated

    page = admin_client.get(HANDLERS).content.decode()

    row = _row(page, ">jobs</a>")
    assert f'href="{run_url(newest)}"' in row
    assert "workitems-status-failed" in row and "ago" in row
    assert ">50%<" in row  # 2 of the 4 rated runs succeeded; the cancelled one is not rated
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
        with CaptureQueriesContext(connection) as ctx:
            response = admin_client.get(HANDLERS)
        assert response.status_code == 200
        assert response.content.decode().count('class="workitems-chart"') == min(count, 100)
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


def test_a_run_page_lists_at_most_100_failures(admin_client):
    run = HandlerRunFactory(status=RunStatus.PARTIAL, items_failed=105)
    now = timezone.now()
    ItemFailure.objects.bulk_create(
        ItemFailure(
            run=run,
            item_id=f"item-{i:03d}",
            error_type="builtins.ValueError",
            occurred_at=now + timedelta(seconds=i),
        )
        for i in range(105)
    )
    other = ItemFailureFactory(item_id="elsewhere")  # another run's failure

    page = admin_client.get(run_url(run)).content.decode()

    shown = set(re.findall(r"item-\d{3}", page))
    assert len(shown) == 100 and "item-000" in shown and "item-104" not in shown
    assert other.item_id not in page


# Workers ---------------------------------------------------------------------------------


def test_workers_are_alive_stale_or_stopped(admin_client):
    now = timezone.now()
    alive = WorkerFactory(hostname="alive-host")
    stale = WorkerFactory(hostname="stale-host", last_heartbeat_at=now - timedelta(minutes=5))
    stopped = WorkerFactory(hostname="stopped-host", stopped_at=now)

    page = admin_client.get(WORKERS).content.decode()
    assert "workitems-status-succeeded" in _row(page, str(alive))
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

"""The admin and GraphiQL in a real browser: headless Chromium (Debian's) driven by Playwright.

Screenshots of every page visited are saved in ``build/screenshots/``, so anyone can look at
what the operator sees. ``.ci/run`` installs Chromium and sets ``WORKITEMS_REQUIRE_BROWSER=1``
so that in CI a missing browser fails the test instead of skipping it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.contrib.auth.models import Permission
from django.db import connections
from django.utils import timezone

import django_workitems as workitems
from django_workitems.models import Handler, HandlerRun, RunStatus
from tests.conftest import ROOT
from tests.factories import WorkerFactory
from tests.testapp.models import Job, Task

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = ROOT / "build" / "screenshots"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _missing_browser() -> str:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed"
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    return ""


@pytest.fixture
def page(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    missing = _missing_browser()
    if missing:
        if os.environ.get("WORKITEMS_REQUIRE_BROWSER") == "1":
            pytest.fail(f"browser test required but {missing}")
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an event loop on this thread; the ORM calls the test makes
    # between page actions are still plain synchronous calls.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1600, "height": 1000})
            tab = context.new_page()
            tab.set_default_timeout(15_000)
            yield tab
        finally:
            browser.close()
            # The test's ORM calls ran inside Playwright's sync API, whose greenlet has its own
            # context and so its own database connection: close it, or PostgreSQL refuses to
            # drop the test database at the end of the session ("being accessed by other users").
            connections.close_all()


def history() -> None:
    """A few real cycles: successes, an item that keeps failing, a fetch that fails."""
    Job.objects.create(action="fail")
    for batch in range(4):
        Job.objects.bulk_create([Job() for _ in range(batch + 2)])
        Task.objects.bulk_create([Task() for _ in range(3 * batch + 1)])
        workitems.run_once(handlers=["jobs", "broken-fetch", "tasks"])
    Job.objects.create(queue="slow")
    workitems.run_once(handlers=["slow-jobs"])
    # Five tasks that wait (scheduled for later), queued two hours ago: the tasks backlog.
    now = timezone.now()
    later = Task.objects.bulk_create(
        [Task(available_at=now + timedelta(hours=1)) for _ in range(5)]
    )
    Task.objects.filter(pk__in=[t.pk for t in later]).update(created=now - timedelta(hours=2))
    WorkerFactory(hostname="worker-a")  # alive; the run_once workers have stopped


def test_an_operator_runs_a_handler_and_reads_a_failure(page, live_server, django_user_model):
    django_user_model.objects.create_superuser("operator", "op@example.com", "s3cret-pass")
    history()
    base = live_server.url

    page.goto(f"{base}/admin/login/?next=/admin/django_workitems/handler/")
    page.fill("#id_username", "operator")
    page.fill("#id_password", "s3cret-pass")
    page.click("input[type=submit]")
    page.wait_for_selector("#result_list")
    jobs_row = page.locator("#result_list tr", has=page.locator("a", has_text=re.compile("^jobs$")))
    assert jobs_row.locator(".workitems-status-partial").count() == 1
    assert jobs_row.locator("svg.workitems-chart a").count() == 4
    # Items, not runs: 2 + 3 + 4 + 5 jobs succeeded beside the one failing in each of 4 runs.
    assert jobs_row.locator(".field-recent_success_rate").inner_text() == f"{100 * 14 // 18}%"
    broken_row = page.locator("#result_list tr", has_text="broken-fetch")
    assert broken_row.locator(".workitems-status-failed").count() == 1
    page.screenshot(path=SCREENSHOTS / "01-handlers.png", full_page=True)

    # Run now, through the admin action.
    jobs = Handler.objects.get(name="jobs")
    assert jobs.run_requested_at is None
    jobs_row.locator("input.action-select").check()
    page.select_option("select[name=action]", "run_now")
    page.click("button[name=index]")
    message = page.locator(".messagelist .success")
    message.wait_for()
    assert message.inner_text() == "Asked the workers to run now: jobs."
    jobs.refresh_from_db()
    assert jobs.run_requested_at is not None
    page.screenshot(path=SCREENSHOTS / "02-run-now.png", full_page=True)

    # The handler's page: backlog and all-time totals.
    page.click("#result_list a:text-is('tasks')")
    page.wait_for_selector(".field-backlog")
    backlog = page.locator(".field-backlog .readonly").inner_text().replace("\xa0", " ")
    assert backlog == "5 waiting, the oldest since 2 hours ago"
    assert page.locator(".field-recent_runs_large svg a").count() == 4
    page.screenshot(path=SCREENSHOTS / "03-handler.png", full_page=True)

    # From the run history to a run with a failure, and its traceback.
    page.goto(f"{base}/admin/django_workitems/handlerrun/")
    page.click("#changelist-filter a:has-text('Partial')")
    page.wait_for_selector("#result_list")
    page.screenshot(path=SCREENSHOTS / "04-runs.png", full_page=True)
    newest_partial = HandlerRun.objects.filter(status=RunStatus.PARTIAL).first()
    assert newest_partial is not None
    page.click(f"#result_list a:text-is('#{newest_partial.pk}')")
    traceback = page.locator("pre.workitems-traceback").first
    assert not traceback.is_visible()  # collapsed until opened
    page.locator("details.workitems-details summary").first.click()
    traceback.wait_for()
    text = traceback.inner_text()
    assert text.startswith("Traceback (most recent call last):")
    assert re.search(r"ValueError: job \d+ is set to fail", text)
    page.screenshot(path=SCREENSHOTS / "05-run-with-failure.png", full_page=True)

    # The lists at a laptop's width and a phone's: nothing wider than the window.
    for width, height in ((1400, 900), (390, 844)):
        page.set_viewport_size({"width": width, "height": height})
        for name, path in (("handlers", "handler"), ("runs", "handlerrun")):
            page.goto(f"{base}/admin/django_workitems/{path}/")
            page.wait_for_selector("#result_list")
            page.screenshot(path=SCREENSHOTS / f"06-{name}-{width}px.png", full_page=True)
            overflow = page.evaluate(
                "document.documentElement.scrollWidth - document.documentElement.clientWidth"
            )
            assert overflow <= 0, f"at {width}px the {name} page is {overflow}px too wide"
            if width >= 1400:  # every column in view, no scrolling inside the table
                hidden = page.evaluate(
                    "(() => { const r = document.querySelector('.results');"
                    " return r.scrollWidth - r.clientWidth; })()"
                )
                assert hidden <= 0, f"at {width}px the {name} list hides {hidden}px of columns"

    page.goto(f"{base}/admin/django_workitems/worker/")
    assert (
        page.locator("#result_list tr", has_text="worker-a")
        .locator(".workitems-status-succeeded")
        .inner_text()
        == "alive"
    )
    page.screenshot(path=SCREENSHOTS / "06-workers.png", full_page=True)

    page.emulate_media(color_scheme="dark")
    page.goto(f"{base}/admin/django_workitems/handler/")
    badge = page.locator(".workitems-status-failed").first
    assert badge.evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(229, 57, 53)"
    page.screenshot(path=SCREENSHOTS / "07-handlers-dark.png", full_page=True)


LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


def test_graphiql_works_offline(page, live_server, django_user_model):
    """GraphiQL's page needs nothing but the live server: every other request is aborted."""
    user = django_user_model.objects.create_user("viewer", "viewer@example.com", "s3cret-pass")
    user.is_staff = True  # to log in through the admin's login page
    user.save()
    user.user_permissions.add(Permission.objects.get(codename="view_handler"))
    base = live_server.url

    aborted: list[str] = []

    def offline(route):
        url = route.request.url
        parts = urlsplit(url)
        if parts.scheme in {"http", "https", "ws", "wss"} and parts.hostname not in LOOPBACK_HOSTS:
            aborted.append(url)
            route.abort("internetdisconnected")
        else:
            route.continue_()

    page.route("**/*", offline)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))

    page.goto(f"{base}/admin/login/?next=/graphql/")
    page.fill("#id_username", "viewer")
    page.fill("#id_password", "s3cret-pass")
    page.click("input[type=submit]")
    page.wait_for_url(f"{base}/graphql/")

    editor = page.locator(".graphiql-query-editor .CodeMirror")
    result = page.locator(".graphiql-response .CodeMirror")

    def run(query: str, expected: str) -> str:
        """Type ``query`` into GraphiQL's editor, replacing what is there, and run it."""
        editor.click()
        page.keyboard.press("Control+A")
        page.keyboard.press("Delete")
        page.keyboard.type(query)
        page.locator(".graphiql-execute-button").click()
        result.filter(has_text=expected).wait_for()
        return result.inner_text()

    editor.wait_for()
    text = run("{ availableHandlers(purpose: INGESTION) }", "broken-fetch")
    page.screenshot(path=SCREENSHOTS / "08-graphiql-offline.png", full_page=True)
    assert '"availableHandlers"' in text
    assert '"broken-fetch"' in text
    assert '"jobs"' not in text  # a processing handler, not an ingestion one

    # The depth limit holds for what GraphiQL sends too.
    deep = "{ handlerRuns { handler { runs { handler { runs { handler { runs { id } } } } } } } }"
    text = run(deep, "maximum operation depth")
    assert "exceeds maximum operation depth" in text
    assert '"data"' not in text

    assert aborted == []
    assert errors == []

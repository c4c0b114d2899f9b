"""System checks of ``settings.WORKITEMS``: one test per check id."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.checks import Error, Warning, run_checks
from django.core.checks.registry import registry as check_registry
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import override_settings
from django.test.utils import isolate_apps

from django_workitems.checks import TAG, check_settings


def _ours(messages):
    return [m for m in messages if (m.id or "").startswith("django_workitems.")]


@pytest.mark.parametrize(
    ("check_id", "key", "value"),
    [
        ("django_workitems.E002", "POLL_INTERVAL", "every minute"),
        ("django_workitems.E002", "POLL_INTERVAL", 0),
        ("django_workitems.E003", "WORKERS", 0),
        ("django_workitems.E003", "WORKERS", "0"),
        ("django_workitems.E004", "QUEUE_SIZE", -10),
        ("django_workitems.E004", "QUEUE_SIZE", True),
        ("django_workitems.E005", "SHUTDOWN_TIMEOUT", -1),
        ("django_workitems.E005", "SHUTDOWN_TIMEOUT", "00:00:xx"),
        ("django_workitems.E006", "LEASE_TIMEOUT", "00:00:00"),
        ("django_workitems.E006", "LEASE_TIMEOUT", float("inf")),
        ("django_workitems.E007", "RUN_RETENTION", "thirty days"),
        ("django_workitems.E007", "RUN_RETENTION", float("nan")),
        # bounds (SPEC section 3)
        ("django_workitems.E002", "POLL_INTERVAL", 0.05),
        ("django_workitems.E002", "POLL_INTERVAL", "PT0.01S"),
        ("django_workitems.E003", "WORKERS", "-2"),
        ("django_workitems.E003", "WORKERS", "4.5"),
        ("django_workitems.E004", "QUEUE_SIZE", "0"),
        ("django_workitems.E005", "SHUTDOWN_TIMEOUT", "3000000.00:00:00"),
        ("django_workitems.E006", "LEASE_TIMEOUT", 0.5),
        ("django_workitems.E006", "LEASE_TIMEOUT", "1.00:00:01"),
        ("django_workitems.E006", "LEASE_TIMEOUT", "3000000.00:00:00"),
        ("django_workitems.E007", "RUN_RETENTION", "3000000.00:00:00"),
        ("django_workitems.E007", "RUN_RETENTION", "P3000000D"),
        ("django_workitems.E007", "RUN_RETENTION", timedelta(days=3_000_000)),
        ("django_workitems.E008", "ITEM_TIMEOUT", "3000000 00:00:00"),
        ("django_workitems.E009", "FETCH_TIMEOUT", 0),
        ("django_workitems.E010", "ASYNC_CONCURRENCY", "0"),
        ("django_workitems.E010", "ASYNC_CONCURRENCY", "many"),
    ],
)
def test_bad_value_is_an_error_naming_key_and_value(check_id, key, value):
    with override_settings(WORKITEMS={key: value}):
        messages = check_settings()
    assert len(messages) == 1
    [message] = messages
    assert isinstance(message, Error)
    assert message.id == check_id
    assert key in message.msg
    assert repr(value) in message.msg
    assert message.hint  # says what the default is


def test_e001_workitems_not_a_dict():
    with override_settings(WORKITEMS=["WORKERS", 4]):
        messages = check_settings()
    assert [m.id for m in messages] == ["django_workitems.E001"]
    [message] = messages
    assert isinstance(message, Error)
    assert "WORKITEMS" in message.msg
    assert "['WORKERS', 4]" in message.msg
    assert "dict" in message.msg


@pytest.mark.parametrize("value", ["00:05:00", 5, ("WORKERS", 4)])
def test_e001_for_other_non_mappings(value):
    with override_settings(WORKITEMS=value):
        assert [m.id for m in check_settings()] == ["django_workitems.E001"]


def test_w001_unknown_key():
    with override_settings(WORKITEMS={"WORKER": 4, "POLL_INTERVAL": "00:00:05"}):
        messages = check_settings()
    assert len(messages) == 1
    [message] = messages
    assert isinstance(message, Warning)
    assert message.id == "django_workitems.W001"
    assert "'WORKER'" in message.msg
    assert "WORKERS" in message.hint  # lists the known keys, so the typo is obvious


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("POLL_INTERVAL", "PT5M"),
        ("POLL_INTERVAL", "0.1"),
        ("WORKERS", "4"),
        ("QUEUE_SIZE", "100"),
        ("ASYNC_CONCURRENCY", "100"),
        ("LEASE_TIMEOUT", "P1D"),
        ("LEASE_TIMEOUT", "1"),
        ("RUN_RETENTION", "3 00:00:00"),
        ("RUN_RETENTION", "P3D"),
        ("RUN_RETENTION", "2592000"),
        ("ITEM_TIMEOUT", None),
        ("FETCH_TIMEOUT", timedelta(minutes=5)),
    ],
)
def test_accepted_forms_pass_the_check(key, value):
    with override_settings(WORKITEMS={key: value}):
        assert check_settings() == []


def test_manage_py_check_refuses_a_huge_retention_naming_key_and_value():
    out, err = StringIO(), StringIO()
    with (
        override_settings(WORKITEMS={"RUN_RETENTION": "3000000.00:00:00"}),
        pytest.raises(SystemCheckError) as info,
    ):
        call_command("check", stdout=out, stderr=err)
    text = str(info.value)
    assert "django_workitems.E007" in text
    assert "RUN_RETENTION" in text
    assert "'3000000.00:00:00'" in text
    assert "too large" in text


def test_shutdown_timeout_zero_is_fine():
    with override_settings(WORKITEMS={"SHUTDOWN_TIMEOUT": 0}):
        assert check_settings() == []


def test_valid_settings_have_no_messages():
    valid = {
        "POLL_INTERVAL": "00:05:00",
        "WORKERS": 4,
        "QUEUE_SIZE": 100,
        "SHUTDOWN_TIMEOUT": "00:00:30",
        "LEASE_TIMEOUT": "00:01:00",
        "RUN_RETENTION": "30.00:00:00",
    }
    with override_settings(WORKITEMS=valid):
        assert check_settings() == []
    with override_settings(WORKITEMS={}):
        assert check_settings() == []
    with override_settings(WORKITEMS=None):
        assert check_settings() == []


def test_every_bad_key_is_reported_at_once():
    bad = {"WORKERS": 0, "QUEUE_SIZE": 0, "LEASE_TIMEOUT": "x", "TYPO": 1}
    with override_settings(WORKITEMS=bad):
        ids = sorted(m.id for m in check_settings())
    assert ids == [
        "django_workitems.E003",
        "django_workitems.E004",
        "django_workitems.E006",
        "django_workitems.W001",
    ]


def test_the_check_is_registered_under_its_tag():
    assert TAG in check_registry.tags_available()
    assert check_settings in check_registry.get_checks()


def test_run_checks_returns_the_error():
    with override_settings(WORKITEMS={"WORKERS": 0}):
        messages = _ours(run_checks())
        tagged = _ours(run_checks(tags=[TAG]))
    assert [m.id for m in messages] == ["django_workitems.E003"]
    assert [m.id for m in tagged] == ["django_workitems.E003"]


def test_run_checks_is_clean_with_valid_settings():
    with override_settings(WORKITEMS={"WORKERS": 2}):
        assert _ours(run_checks()) == []


def test_manage_py_check_fails_with_the_id_key_and_value():
    with (
        override_settings(WORKITEMS={"QUEUE_SIZE": "lots"}),
        pytest.raises(SystemCheckError) as info,
    ):
        call_command("check", stdout=StringIO(), stderr=StringIO())
    text = str(info.value)
    assert "django_workitems.E004" in text
    assert "QUEUE_SIZE" in text
    assert "'lots'" in text


def test_manage_py_check_with_the_tag_fails_too():
    with (
        override_settings(WORKITEMS={"WORKERS": -2}),
        pytest.raises(SystemCheckError, match=r"django_workitems\.E003"),
    ):
        call_command("check", "--tag", TAG, stdout=StringIO(), stderr=StringIO())


def test_manage_py_check_shows_warnings_without_failing():
    out, err = StringIO(), StringIO()
    with override_settings(WORKITEMS={"WORKRS": 4}):
        call_command("check", stdout=out, stderr=err)
    assert "django_workitems.W001" in out.getvalue() + err.getvalue()


@isolate_apps("tests.testapp")
def test_w002_a_work_item_model_without_the_claim_index():
    from django.db import models

    from django_workitems.checks import check_work_item_indexes
    from django_workitems.models import WorkItemModel

    class LostIndexes(WorkItemModel):
        class Meta:  # not Meta(WorkItemModel.Meta): the inherited indexes are gone
            app_label = "testapp"

    class KeptIndexes(WorkItemModel):
        class Meta(WorkItemModel.Meta):
            app_label = "testapp"

    class Plain(models.Model):
        class Meta:
            app_label = "testapp"

        def __str__(self) -> str:
            return "plain"

    messages = check_work_item_indexes(models=[LostIndexes, KeptIndexes, Plain])

    assert [(m.id, m.obj) for m in messages] == [("django_workitems.W002", LostIndexes)]
    assert "testapp.LostIndexes" in messages[0].msg
    assert "Meta(WorkItemModel.Meta)" in messages[0].hint


def test_w002_is_registered_and_quiet_for_the_test_models():
    ids = [m.id for m in run_checks()]
    assert "django_workitems.W002" not in ids

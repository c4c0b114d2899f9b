"""Unit tests of django_workitems.conf: duration parsing and the lazy ``app_settings``."""

from __future__ import annotations

import math
import threading
from datetime import timedelta

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings
from django.utils import timezone

from django_workitems import ConfigurationError
from django_workitems.conf import (
    SETTINGS,
    SettingProblem,
    app_settings,
    max_date_offset,
    max_wait,
    parse_duration,
)

# -- parse_duration: accepted values ---------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("00:05:00", timedelta(minutes=5)),
        ("00:00:30", timedelta(seconds=30)),
        ("01:02:03", timedelta(hours=1, minutes=2, seconds=3)),
        ("1:2:3", timedelta(hours=1, minutes=2, seconds=3)),
        ("25:00:00", timedelta(hours=25)),
        ("30.00:00:00", timedelta(days=30)),
        ("1.02:03:04", timedelta(days=1, hours=2, minutes=3, seconds=4)),
        ("00:00:01.5", timedelta(seconds=1.5)),
        ("00:00:00.250", timedelta(milliseconds=250)),
        ("2.00:00:00.5", timedelta(days=2, milliseconds=500)),
        ("  00:01:00\n", timedelta(minutes=1)),
        ("90", timedelta(seconds=90)),
        ("0.5", timedelta(milliseconds=500)),
        (" 12 ", timedelta(seconds=12)),
        (30, timedelta(seconds=30)),
        (1.25, timedelta(seconds=1.25)),
        (timedelta(hours=3), timedelta(hours=3)),
        (timedelta(microseconds=1), timedelta(microseconds=1)),
        # anything django.utils.dateparse.parse_duration reads
        ("3 00:00:00", timedelta(days=3)),
        ("1 day, 0:00:00", timedelta(days=1)),
        ("2 days 01:00:00", timedelta(days=2, hours=1)),
        ("3 days", timedelta(days=3)),
        ("P3D", timedelta(days=3)),
        ("PT5M", timedelta(minutes=5)),
        ("P1DT2H", timedelta(days=1, hours=2)),
        ("PT0.5S", timedelta(milliseconds=500)),
        ("00:05", timedelta(seconds=5)),
        ("00:60:00", timedelta(hours=1)),
        ("00:00:60", timedelta(minutes=1)),
    ],
)
def test_parse_duration_accepts(value, expected):
    assert parse_duration(value) == expected


def test_parse_duration_returns_a_timedelta_for_numbers():
    result = parse_duration(5)
    assert isinstance(result, timedelta)
    assert result.total_seconds() == 5.0


def test_parse_duration_days_are_days_not_hours():
    assert parse_duration("30.00:00:00").days == 30
    assert parse_duration("30.00:00:00") == parse_duration(30 * 24 * 3600)


# -- parse_duration: rejected values ---------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "",
        "   ",
        "abc",
        "5m",
        "1h",
        "00:05:00:00",
        "-00:05:00",
        "-5",
        "-P3D",
        "P",
        "PT",
        "5 minutes",
        "1e3",
        "5.",
        ".5",
        "00:05:00\nrm -rf",
        "nan",
        "inf",
        "Infinity",
        "-inf",
        "\u0661\u0662",  # Arabic-Indic digits: only ASCII digits are a number here
        "\u0660\u0660:\u0660\u0665:\u0660\u0660",
        "\u0661 00:00:00",  # Django's patterns alone would read these digits
        "P\u0663D",
        None,
        [],
        {},
        [1, 2],
        b"00:05:00",
        object(),
    ],
)
def test_parse_duration_rejects_garbage(value):
    with pytest.raises(ValueError, match="must be"):
        parse_duration(value)


@pytest.mark.parametrize("value", [True, False])
def test_parse_duration_rejects_bools(value):
    with pytest.raises(ValueError, match="bool"):
        parse_duration(value)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_parse_duration_rejects_nan_and_infinity(value):
    with pytest.raises(ValueError, match="finite"):
        parse_duration(value)


@pytest.mark.parametrize("value", [-1, -0.5, timedelta(seconds=-1), timedelta(days=-3)])
def test_parse_duration_rejects_negatives(value):
    with pytest.raises(ValueError, match="must be positive"):
        parse_duration(value)


@pytest.mark.parametrize("value", [-1, "-00:00:01", timedelta(seconds=-1)])
def test_parse_duration_rejects_negatives_even_when_zero_is_allowed(value):
    with pytest.raises(ValueError, match="must"):
        parse_duration(value, allow_zero=True)


@pytest.mark.parametrize("value", [0, 0.0, "0", "00:00:00", "0.00:00:00", timedelta(0)])
def test_parse_duration_rejects_zero_by_default(value):
    with pytest.raises(ValueError, match="must be positive"):
        parse_duration(value)


@pytest.mark.parametrize("value", [0, 0.0, "0", "00:00:00", timedelta(0)])
def test_parse_duration_allows_zero_when_asked(value):
    assert parse_duration(value, allow_zero=True) == timedelta(0)


def test_parse_duration_zero_allowed_still_parses_positive_values():
    assert parse_duration("00:00:30", allow_zero=True) == timedelta(seconds=30)


@pytest.mark.parametrize("value", [1e20, 10**30, "99999999999.00:00:00", "9" * 400])
def test_parse_duration_too_large_is_a_value_error(value):
    # timedelta raises OverflowError for these; callers only catch ValueError.
    with pytest.raises(ValueError, match="too large"):
        parse_duration(value)


def test_parse_duration_error_names_the_type_of_an_unsupported_value():
    with pytest.raises(ValueError, match="list"):
        parse_duration([1])


# -- app_settings ------------------------------------------------------------------------------

DEFAULTS = {
    "poll_interval": timedelta(minutes=5),
    "workers": 4,
    "queue_size": 100,
    "shutdown_timeout": timedelta(seconds=30),
    "lease_timeout": timedelta(minutes=1),
    "run_retention": timedelta(days=30),
}


@override_settings(WORKITEMS={})
@pytest.mark.parametrize(("attribute", "expected"), list(DEFAULTS.items()))
def test_defaults_with_an_empty_dict(attribute, expected):
    assert getattr(app_settings, attribute) == expected


@pytest.mark.parametrize(("attribute", "expected"), list(DEFAULTS.items()))
def test_defaults_without_the_setting(settings, attribute, expected):
    del settings.WORKITEMS
    assert getattr(app_settings, attribute) == expected


@override_settings(WORKITEMS=None)
def test_none_means_all_defaults():
    assert app_settings.workers == 4
    assert app_settings.problems() == []
    assert app_settings.unknown_keys() == []


def test_every_setting_spec_default_is_valid():
    for spec in SETTINGS:
        spec.parse(spec.default)


@override_settings(
    WORKITEMS={
        "POLL_INTERVAL": "00:00:02",
        "WORKERS": 7,
        "QUEUE_SIZE": 3,
        "SHUTDOWN_TIMEOUT": 0,
        "LEASE_TIMEOUT": timedelta(seconds=9),
        "RUN_RETENTION": "2.00:00:00",
    }
)
def test_values_are_read_and_converted():
    assert app_settings.poll_interval == timedelta(seconds=2)
    assert app_settings.workers == 7
    assert app_settings.queue_size == 3
    assert app_settings.shutdown_timeout == timedelta(0)
    assert app_settings.lease_timeout == timedelta(seconds=9)
    assert app_settings.run_retention == timedelta(days=2)


def test_app_settings_is_read_on_every_access():
    with override_settings(WORKITEMS={"WORKERS": 2}):
        assert app_settings.workers == 2
        with override_settings(WORKITEMS={"WORKERS": 9}):
            assert app_settings.workers == 9
        assert app_settings.workers == 2
    with override_settings(WORKITEMS={}):
        assert app_settings.workers == 4


def test_app_settings_follows_the_settings_fixture(settings):
    settings.WORKITEMS = {"QUEUE_SIZE": 17}
    assert app_settings.queue_size == 17
    settings.WORKITEMS = {"QUEUE_SIZE": 18}
    assert app_settings.queue_size == 18


@pytest.mark.parametrize(
    ("key", "attribute", "value"),
    [
        ("POLL_INTERVAL", "poll_interval", "soon"),
        ("POLL_INTERVAL", "poll_interval", 0),
        ("WORKERS", "workers", 0),
        ("WORKERS", "workers", -1),
        ("WORKERS", "workers", "four"),
        ("WORKERS", "workers", "4.0"),
        ("WORKERS", "workers", True),
        ("WORKERS", "workers", 2.0),
        ("QUEUE_SIZE", "queue_size", 0),
        ("QUEUE_SIZE", "queue_size", None),
        ("SHUTDOWN_TIMEOUT", "shutdown_timeout", -5),
        ("LEASE_TIMEOUT", "lease_timeout", "00:00:00"),
        ("RUN_RETENTION", "run_retention", math.nan),
    ],
)
def test_bad_value_raises_configuration_error_naming_key_and_value(key, attribute, value):
    with override_settings(WORKITEMS={key: value}), pytest.raises(ConfigurationError) as info:
        getattr(app_settings, attribute)
    message = str(info.value)
    assert key in message
    assert repr(value) in message
    assert isinstance(info.value, ImproperlyConfigured)


@override_settings(WORKITEMS=["WORKERS", 4])
def test_not_a_mapping_raises_configuration_error():
    with pytest.raises(
        ConfigurationError, match=r"WORKITEMS must be a dict \(got \['WORKERS', 4\]\)"
    ):
        _ = app_settings.workers


@override_settings(WORKITEMS={"WORKERS": 0})
def test_a_bad_key_does_not_break_the_others():
    assert app_settings.queue_size == 100
    with pytest.raises(ConfigurationError):
        _ = app_settings.workers


def test_shutdown_timeout_allows_zero_but_the_other_durations_do_not():
    with override_settings(WORKITEMS={"SHUTDOWN_TIMEOUT": "00:00:00"}):
        assert app_settings.shutdown_timeout == timedelta(0)
    for key, attribute in [
        ("POLL_INTERVAL", "poll_interval"),
        ("LEASE_TIMEOUT", "lease_timeout"),
        ("RUN_RETENTION", "run_retention"),
    ]:
        with (
            override_settings(WORKITEMS={key: "00:00:00"}),
            pytest.raises(ConfigurationError, match="must be positive"),
        ):
            getattr(app_settings, attribute)


# -- problems() and unknown_keys() -------------------------------------------------------------


@override_settings(WORKITEMS={"POLL_INTERVAL": "00:00:01", "WORKERS": 2})
def test_no_problems_when_valid():
    assert app_settings.problems() == []
    assert app_settings.unknown_keys() == []


@override_settings(WORKITEMS={"WORKERS": 0, "QUEUE_SIZE": "x", "LEASE_TIMEOUT": "00:00:10"})
def test_problems_lists_every_bad_entry_with_its_check_id():
    problems = app_settings.problems()
    assert [(p.check_id, p.key, p.value) for p in problems] == [
        ("django_workitems.E003", "WORKERS", 0),
        ("django_workitems.E004", "QUEUE_SIZE", "x"),
    ]
    assert all(p.reason for p in problems)


@override_settings(WORKITEMS=42)
def test_problems_of_a_non_mapping():
    assert app_settings.problems() == [
        SettingProblem("django_workitems.E001", "WORKITEMS", 42, "must be a dict")
    ]
    assert app_settings.unknown_keys() == []


@override_settings(WORKITEMS={"WORKER": 4, "POLL_INTERVAL": 5, "queue_size": 1})
def test_unknown_keys_sorted():
    assert app_settings.unknown_keys() == ["WORKER", "queue_size"]


@override_settings(WORKITEMS={"POLL_INTERVAL": 1e20})
def test_problems_report_an_overflowing_duration_instead_of_crashing():
    [problem] = app_settings.problems()
    assert problem.check_id == "django_workitems.E002"
    assert "too large" in str(problem)


def test_setting_problem_str_names_key_and_value():
    text = str(SettingProblem("django_workitems.E003", "WORKERS", "four", "must be an int >= 1"))
    assert text == "settings.WORKITEMS['WORKERS'] = 'four' is invalid: it must be an int >= 1"


# -- accepted forms and bounds of each setting (SPEC section 3) ----------------------------------

DURATION_SETTINGS = [
    ("POLL_INTERVAL", "poll_interval"),
    ("SHUTDOWN_TIMEOUT", "shutdown_timeout"),
    ("LEASE_TIMEOUT", "lease_timeout"),
    ("RUN_RETENTION", "run_retention"),
    ("ITEM_TIMEOUT", "item_timeout"),
    ("FETCH_TIMEOUT", "fetch_timeout"),
]
DURATION_FORMS = [
    ("00:05:00", timedelta(minutes=5)),
    ("0.00:05:00", timedelta(minutes=5)),
    ("0 00:05:00", timedelta(minutes=5)),
    ("PT5M", timedelta(minutes=5)),
    ("P0DT300S", timedelta(minutes=5)),
    (timedelta(minutes=5), timedelta(minutes=5)),
    (300, timedelta(minutes=5)),
    (300.0, timedelta(minutes=5)),
    ("300", timedelta(minutes=5)),
    (" 300.0 ", timedelta(minutes=5)),
]


@pytest.mark.parametrize(("key", "attribute"), DURATION_SETTINGS)
@pytest.mark.parametrize(("value", "expected"), DURATION_FORMS)
def test_every_duration_setting_accepts_every_form(key, attribute, value, expected):
    with override_settings(WORKITEMS={key: value}):
        assert getattr(app_settings, attribute) == expected
        assert app_settings.problems() == []


@pytest.mark.parametrize(
    ("key", "attribute", "value", "expected"),
    [
        ("RUN_RETENTION", "run_retention", "P3D", timedelta(days=3)),
        ("RUN_RETENTION", "run_retention", "3 00:00:00", timedelta(days=3)),
        ("RUN_RETENTION", "run_retention", "3.00:00:00", timedelta(days=3)),
        ("RUN_RETENTION", "run_retention", timedelta(days=365 * 100), timedelta(days=36500)),
        ("POLL_INTERVAL", "poll_interval", "00:00:00.1", timedelta(milliseconds=100)),
        ("POLL_INTERVAL", "poll_interval", 0.1, timedelta(milliseconds=100)),
        ("POLL_INTERVAL", "poll_interval", "P1D", timedelta(days=1)),
        ("LEASE_TIMEOUT", "lease_timeout", 1, timedelta(seconds=1)),
        ("LEASE_TIMEOUT", "lease_timeout", "1.00:00:00", timedelta(days=1)),
        ("LEASE_TIMEOUT", "lease_timeout", "P1D", timedelta(days=1)),
        ("LEASE_TIMEOUT", "lease_timeout", "86400", timedelta(days=1)),
        ("SHUTDOWN_TIMEOUT", "shutdown_timeout", "0", timedelta(0)),
        ("SHUTDOWN_TIMEOUT", "shutdown_timeout", "PT0S", timedelta(0)),
        ("ITEM_TIMEOUT", "item_timeout", None, None),
        ("FETCH_TIMEOUT", "fetch_timeout", None, None),
    ],
)
def test_duration_setting_at_its_bounds(key, attribute, value, expected):
    with override_settings(WORKITEMS={key: value}):
        assert getattr(app_settings, attribute) == expected
        assert app_settings.problems() == []


INTEGER_SETTINGS = [
    ("WORKERS", "workers"),
    ("QUEUE_SIZE", "queue_size"),
    ("ASYNC_CONCURRENCY", "async_concurrency"),
]


@pytest.mark.parametrize(("key", "attribute"), INTEGER_SETTINGS)
@pytest.mark.parametrize(
    ("value", "expected"), [(1, 1), (100, 100), ("1", 1), ("100", 100), (" 100 ", 100), ("+7", 7)]
)
def test_integer_settings_accept_ints_and_numeric_strings(key, attribute, value, expected):
    with override_settings(WORKITEMS={key: value}):
        assert getattr(app_settings, attribute) == expected
        assert app_settings.problems() == []


@pytest.mark.parametrize(("key", "attribute"), INTEGER_SETTINGS)
@pytest.mark.parametrize(
    "value", [0, -1, "0", "-1", "", "1.5", "100.0", "1e2", "ten", "\u0661", 2.0, True, None]
)
def test_integer_settings_refuse(key, attribute, value):
    with override_settings(WORKITEMS={key: value}):
        [problem] = app_settings.problems()
        assert problem.key == key
        assert problem.value == value
        with pytest.raises(ConfigurationError, match=key):
            getattr(app_settings, attribute)


HUGE = timedelta(days=3_000_000)


@pytest.mark.parametrize(
    ("key", "attribute", "value", "reason"),
    [
        ("LEASE_TIMEOUT", "lease_timeout", "00:00:00.999", "at least 1 second)"),
        ("LEASE_TIMEOUT", "lease_timeout", 0.5, "at least 1 second)"),
        ("LEASE_TIMEOUT", "lease_timeout", "1.00:00:01", "too large"),
        ("LEASE_TIMEOUT", "lease_timeout", "P2D", "too large"),
        ("LEASE_TIMEOUT", "lease_timeout", 86401, "too large"),
        ("LEASE_TIMEOUT", "lease_timeout", "3000000.00:00:00", "too large"),
        ("LEASE_TIMEOUT", "lease_timeout", HUGE, "too large"),
        ("POLL_INTERVAL", "poll_interval", 0.09, "at least 0.1 seconds"),
        ("POLL_INTERVAL", "poll_interval", "00:00:00.05", "at least 0.1 seconds"),
        ("POLL_INTERVAL", "poll_interval", timedelta(microseconds=1), "at least 0.1 seconds"),
        ("POLL_INTERVAL", "poll_interval", "PT0.01S", "at least 0.1 seconds"),
        ("POLL_INTERVAL", "poll_interval", HUGE, "too large"),
        ("RUN_RETENTION", "run_retention", "3000000.00:00:00", "too large"),
        ("RUN_RETENTION", "run_retention", "3000000 00:00:00", "too large"),
        ("RUN_RETENTION", "run_retention", "P3000000D", "too large"),
        ("RUN_RETENTION", "run_retention", HUGE, "too large"),
        ("RUN_RETENTION", "run_retention", 3_000_000 * 86400, "too large"),
        ("RUN_RETENTION", "run_retention", "259200000000", "too large"),
        ("RUN_RETENTION", "run_retention", timedelta.max, "too large"),
        ("RUN_RETENTION", "run_retention", "P999999999999D", "too large"),
        ("SHUTDOWN_TIMEOUT", "shutdown_timeout", HUGE, "too large"),
        ("ITEM_TIMEOUT", "item_timeout", HUGE, "too large"),
        ("FETCH_TIMEOUT", "fetch_timeout", HUGE, "too large"),
        ("ITEM_TIMEOUT", "item_timeout", 0, "must be positive"),
        ("FETCH_TIMEOUT", "fetch_timeout", "PT0S", "must be positive"),
        ("RUN_RETENTION", "run_retention", "-P3D", "must be positive"),
        ("SHUTDOWN_TIMEOUT", "shutdown_timeout", "-1 00:00:00", "must not be negative"),
    ],
)
def test_duration_setting_out_of_bounds_is_refused(key, attribute, value, reason):
    with override_settings(WORKITEMS={key: value}):
        [problem] = app_settings.problems()
        assert (problem.key, problem.value) == (key, value)
        assert reason in problem.reason
        with pytest.raises(ConfigurationError, match=key) as info:
            getattr(app_settings, attribute)
    assert repr(value) in str(info.value)


def test_the_largest_run_retention_can_be_added_to_and_subtracted_from_now():
    largest = max_date_offset()
    with override_settings(WORKITEMS={"RUN_RETENTION": largest}):
        assert app_settings.run_retention == largest
    now = timezone.now()
    assert now + largest > now > now - largest
    assert timezone.localtime(now - largest) < now
    with (
        override_settings(WORKITEMS={"RUN_RETENTION": largest + timedelta(days=1)}),
        pytest.raises(ConfigurationError, match="too large"),
    ):
        _ = app_settings.run_retention


@pytest.mark.parametrize(
    ("key", "attribute"),
    [
        ("POLL_INTERVAL", "poll_interval"),
        ("SHUTDOWN_TIMEOUT", "shutdown_timeout"),
        ("ITEM_TIMEOUT", "item_timeout"),
        ("FETCH_TIMEOUT", "fetch_timeout"),
    ],
)
def test_the_largest_accepted_wait_is_a_valid_thread_timeout_and_date_offset(key, attribute):
    largest = max_wait()
    with override_settings(WORKITEMS={key: largest}):
        assert getattr(app_settings, attribute) == largest
    lock = threading.Lock()
    assert lock.acquire(timeout=largest.total_seconds())  # OverflowError past TIMEOUT_MAX
    now = timezone.now()
    assert now + largest > now > now - largest
    with (
        override_settings(WORKITEMS={key: largest + timedelta(seconds=1)}),
        pytest.raises(ConfigurationError, match="too large"),
    ):
        getattr(app_settings, attribute)


def test_messages_count_in_the_right_number():
    from django_workitems.log import plural

    assert [plural(1, "row"), plural(2, "row"), plural(0, "success", "successes")] == [
        "1 row",
        "2 rows",
        "0 successes",
    ]

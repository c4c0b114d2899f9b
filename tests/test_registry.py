"""Unit tests of django_workitems.registry: registration, validation and look-up."""

from __future__ import annotations

import functools
from abc import abstractmethod
from datetime import timedelta

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

import django_workitems as workitems
from django_workitems import registry as default_registry
from django_workitems.registry import HandlerRegistry, Registration


class Handler(workitems.WorkItemHandler[int]):
    def fetch_next(self, max_items, cancel):
        return list(range(max_items))

    def process(self, item, cancel):
        pass


class OtherHandler(Handler):
    pass


class NonExclusiveHandler(Handler):
    exclusive_by_default = False


class DuckHandler:
    """Not a subclass of WorkItemHandler, but has the two methods: that is enough."""

    def fetch_next(self, max_items, cancel):
        return []

    def process(self, item, cancel):
        pass


# Classes for the error-message tests live at module level: a class defined inside a test has
# the test's name in its __qualname__, and that could satisfy a message assertion by accident.


class NoFetch:
    def process(self, item, cancel):
        pass


class NoProc:
    def fetch_next(self, max_items, cancel):
        return []


class Nothing:
    pass


class AttrNotMethod:
    fetch_next = None

    def process(self, item, cancel):
        pass


class Half(workitems.WorkItemHandler[int]):
    def fetch_next(self, max_items, cancel):
        return []


class AbstractBase(Handler):
    @abstractmethod
    def url(self): ...


class Old:
    def fetch_work_items(self, max_items, cancel):
        return []

    def process(self, item, cancel):
        pass


class OldStyle(workitems.WorkItemHandler[int]):
    def fetch_work_items(self, max_items, cancel):
        return []

    def process(self, item, cancel):
        pass


class NeedsArg(Handler):
    def __init__(self, url):
        self.url = url


def factory_with_argument(url):
    return Handler()


@pytest.fixture
def reg():
    return HandlerRegistry()


def raises_config(*fragments):
    """pytest.raises(ImproperlyConfigured) whose message must contain every fragment."""
    return _Raises(fragments)


class _Raises:
    def __init__(self, fragments):
        self.fragments = fragments
        self._ctx = pytest.raises(ImproperlyConfigured)

    def __enter__(self):
        self.info = self._ctx.__enter__()
        return self.info

    def __exit__(self, *exc):
        suppressed = self._ctx.__exit__(*exc)
        message = str(self.info.value)
        for fragment in self.fragments:
            assert fragment in message, f"{fragment!r} not in {message!r}"
        return suppressed


# -- add_handler ---------------------------------------------------------------------------


def test_add_handler_returns_the_registry_for_chaining(reg):
    result = reg.add_handler(Handler, name="a")
    assert result is reg
    reg.add_handler(Handler, name="b").add_handler(OtherHandler, name="c")
    assert reg.names() == ["a", "b", "c"]


def test_defaults(reg):
    reg.add_handler(Handler, name="a")
    registration = reg.get("a")
    assert registration == Registration(
        name="a",
        factory=Handler,
        max_items_per_cycle=10,
        purpose=workitems.Purpose.INTERNAL,
        exclusive=True,
        poll_interval=None,
        max_concurrency=None,
    )


def test_all_options_are_stored(reg):
    reg.add_handler(
        Handler,
        name="all.options-1_x",
        max_items_per_cycle=25,
        purpose=workitems.Purpose.EXPORT,
        exclusive=False,
        poll_interval="00:00:30",
        max_concurrency=3,
    )
    r = reg.get("all.options-1_x")
    assert r.max_items_per_cycle == 25
    assert r.purpose is workitems.Purpose.EXPORT
    assert r.exclusive is False
    assert r.poll_interval == timedelta(seconds=30)
    assert r.max_concurrency == 3


@pytest.mark.parametrize("value", [5, 2.5, timedelta(minutes=2), "1.00:00:00"])
def test_poll_interval_forms(reg, value):
    from django_workitems.conf import parse_duration

    reg.add_handler(Handler, name="h", poll_interval=value)
    assert reg.get("h").poll_interval == parse_duration(value)


@pytest.mark.parametrize(
    ("purpose", "expected"),
    [
        (workitems.Purpose.INGESTION, workitems.Purpose.INGESTION),
        ("ingestion", workitems.Purpose.INGESTION),
        ("export", workitems.Purpose.EXPORT),
        ("internal", workitems.Purpose.INTERNAL),
    ],
)
def test_purpose_as_enum_or_string_value(reg, purpose, expected):
    reg.add_handler(Handler, name="h", purpose=purpose)
    stored = reg.get("h").purpose
    assert stored is expected
    assert isinstance(stored, workitems.Purpose)


def test_duck_typed_class_is_accepted(reg):
    reg.add_handler(DuckHandler, name="duck")
    assert isinstance(reg.get("duck").create_handler(), DuckHandler)


def test_module_level_add_handler_and_get_handlers_use_the_default_registry():
    assert workitems.registry is default_registry
    name = "test-registry-module-level"
    result = workitems.add_handler(Handler, name=name, purpose="export")
    try:
        assert result is default_registry
        assert name in default_registry
        assert name in workitems.get_handlers()
        assert name in workitems.get_handlers(workitems.Purpose.EXPORT)
        assert name not in workitems.get_handlers("ingestion")
        assert workitems.get_handlers() == sorted(workitems.get_handlers())
    finally:
        default_registry.remove(name)
    assert name not in workitems.get_handlers()


# -- validation: every error names the handler and the bad value ----------------------------


def test_duplicate_name(reg):
    reg.add_handler(Handler, name="dup")
    with raises_config("'dup'", "already registered", "Handler"):
        reg.add_handler(OtherHandler, name="dup")
    assert reg.get("dup").factory is Handler  # the first registration stands


@pytest.mark.parametrize(
    "name",
    [
        "",
        "x" * 101,
        "has space",
        "with/slash",
        "tab\tname",
        "trailing-newline\n",
        "ümlaut",
        "semi;colon",
        None,
        42,
    ],
)
def test_bad_names(reg, name):
    with raises_config(repr(name), "invalid"):
        reg.add_handler(Handler, name=name)
    assert len(reg) == 0


@pytest.mark.parametrize("name", ["a", "x" * 100, "My.Handler-2_b", "0"])
def test_good_names(reg, name):
    reg.add_handler(Handler, name=name)
    assert reg.names() == [name]


@pytest.mark.parametrize("value", [0, -1, "10", True, False, 1.5, 10.0, None])
def test_bad_max_items_per_cycle(reg, value):
    with raises_config("'h'", "max_items_per_cycle", repr(value)):
        reg.add_handler(Handler, name="h", max_items_per_cycle=value)
    assert "h" not in reg


@pytest.mark.parametrize("value", ["INTERNAL", "import", "", None, 1, ["export"]])
def test_unknown_purpose(reg, value):
    with raises_config("'h'", "purpose", repr(value), "ingestion"):
        reg.add_handler(Handler, name="h", purpose=value)


def test_class_without_fetch_next(reg):
    with raises_config("'h'", "NoFetch", "fetch_next"):
        reg.add_handler(NoFetch, name="h")


def test_class_without_process(reg):
    with raises_config("'h'", "NoProc", "process"):
        reg.add_handler(NoProc, name="h")


def test_class_with_neither_method(reg):
    with raises_config("'h'", "Nothing", "fetch_next", "process"):
        reg.add_handler(Nothing, name="h")


def test_non_callable_attribute_does_not_count(reg):
    with raises_config("'h'", "AttrNotMethod", "fetch_next"):
        reg.add_handler(AttrNotMethod, name="h")


def test_subclass_leaving_process_abstract(reg):
    with raises_config("'h'", "Half", "process"):
        reg.add_handler(Half, name="h")


def test_subclass_leaving_its_own_abstract_method(reg):
    with raises_config("'h'", "AbstractBase", "abstract", "url"):
        reg.add_handler(AbstractBase, name="h")


def test_old_fetch_work_items_is_reported_as_renamed(reg):
    with raises_config("'h'", "Old", "fetch_work_items", "renamed", "fetch_next"):
        reg.add_handler(Old, name="h")


def test_old_fetch_work_items_on_a_workitemhandler_subclass_is_reported_as_renamed(reg):
    # The base class declares fetch_next abstract, so the class *has* a fetch_next: still the
    # rename must be what the message says, not "abstract method".
    with raises_config("'h'", "OldStyle", "fetch_work_items", "renamed", "fetch_next"):
        reg.add_handler(OldStyle, name="h")


def test_class_with_both_old_and_new_methods_is_fine(reg):
    class Both(Handler):
        def fetch_work_items(self, max_items, cancel):
            return []

    reg.add_handler(Both, name="h")
    assert "h" in reg


@pytest.mark.parametrize("value", [0, -1, "soon", True, "-00:00:01", float("nan"), 1e20])
def test_bad_poll_interval(reg, value):
    with raises_config("'h'", "poll_interval", repr(value)):
        reg.add_handler(Handler, name="h", poll_interval=value)


@pytest.mark.parametrize("value", [0, -3, "2", True, 1.5])
def test_bad_max_concurrency(reg, value):
    with raises_config("'h'", "max_concurrency", repr(value)):
        reg.add_handler(Handler, name="h", max_concurrency=value)


@pytest.mark.parametrize("value", [1, 0, "yes", "False"])
def test_exclusive_must_be_a_bool(reg, value):
    with raises_config("'h'", "exclusive", repr(value)):
        reg.add_handler(Handler, name="h", exclusive=value)


def test_not_a_class_nor_callable(reg):
    with raises_config("'h'", "42"):
        reg.add_handler(42, name="h")


def test_a_handler_instance_is_not_a_factory(reg):
    with raises_config("'h'", "factory"):
        reg.add_handler(Handler(), name="h")


def test_class_whose_init_needs_arguments(reg):
    with raises_config("'h'", "NeedsArg", "no arguments"):
        reg.add_handler(NeedsArg, name="h")


def test_factory_that_needs_arguments(reg):
    with raises_config("'h'", "factory_with_argument", "no arguments"):
        reg.add_handler(factory_with_argument, name="h")


def test_configuration_errors_are_workitems_errors(reg):
    with pytest.raises(workitems.ConfigurationError):
        reg.add_handler(Handler, name="")
    with pytest.raises(workitems.WorkItemsError):
        reg.add_handler(Handler, name="h", max_items_per_cycle=0)


# -- exclusive default --------------------------------------------------------------------


def test_exclusive_default_true(reg):
    reg.add_handler(Handler, name="h")
    assert reg.get("h").exclusive is True


def test_exclusive_by_default_class_attribute(reg):
    reg.add_handler(NonExclusiveHandler, name="h")
    assert reg.get("h").exclusive is False


def test_explicit_exclusive_overrides_class_attribute(reg):
    reg.add_handler(NonExclusiveHandler, name="a", exclusive=True)
    reg.add_handler(Handler, name="b", exclusive=False)
    assert reg.get("a").exclusive is True
    assert reg.get("b").exclusive is False


# -- factories ----------------------------------------------------------------------------


def test_zero_argument_factory(reg):
    calls = []

    def make():
        calls.append(1)
        return Handler()

    reg.add_handler(make, name="f")
    assert calls == []  # not called at registration
    handler = reg.get("f").create_handler()
    assert isinstance(handler, Handler)
    assert calls == [1]


def test_lambda_factory(reg):
    reg.add_handler(lambda: OtherHandler(), name="lam")
    assert isinstance(reg.get("lam").create_handler(), OtherHandler)


def test_partial_factory_and_its_handler_class(reg):
    def make(kind):
        return {"other": OtherHandler, "plain": Handler}[kind]()

    reg.add_handler(functools.partial(make, "other"), name="p")
    registration = reg.get("p")
    assert isinstance(registration.create_handler(), OtherHandler)
    assert registration.handler_class.endswith("make")
    assert registration.handler_class.startswith(__name__)


def test_callable_object_factory(reg):
    class Factory:
        def __call__(self):
            return Handler()

    reg.add_handler(Factory(), name="obj")
    registration = reg.get("obj")
    assert isinstance(registration.create_handler(), Handler)
    assert registration.handler_class == f"{__name__}.{Factory.__qualname__}"


def test_handler_class_is_the_dotted_path(reg):
    reg.add_handler(Handler, name="h")
    assert reg.get("h").handler_class == f"{__name__}.Handler"


def test_create_handler_returns_a_fresh_instance_each_call(reg):
    reg.add_handler(Handler, name="h")
    registration = reg.get("h")
    first, second = registration.create_handler(), registration.create_handler()
    assert isinstance(first, Handler)
    assert isinstance(second, Handler)
    assert first is not second


def test_create_handler_with_a_factory_is_fresh_too(reg):
    reg.add_handler(lambda: Handler(), name="h")
    registration = reg.get("h")
    assert registration.create_handler() is not registration.create_handler()


@pytest.mark.parametrize("returned", [None, 42, "handler", Handler])
def test_create_handler_rejects_a_factory_returning_a_non_handler(reg, returned):
    def make():
        return returned

    reg.add_handler(make, name="bad-factory")
    with raises_config("'bad-factory'", "make", "fetch_next"):
        reg.get("bad-factory").create_handler()


def test_create_handler_reports_a_factory_returning_an_old_style_handler(reg):
    reg.add_handler(lambda: Old(), name="old")
    with raises_config("'old'", "fetch_work_items", "renamed", "fetch_next"):
        reg.get("old").create_handler()


def test_factory_exclusive_default_is_true(reg):
    reg.add_handler(lambda: NonExclusiveHandler(), name="h")
    assert reg.get("h").exclusive is True


# -- poll interval --------------------------------------------------------------------------


def test_effective_poll_interval_own_value(reg):
    reg.add_handler(Handler, name="h", poll_interval="00:00:07")
    with override_settings(WORKITEMS={"POLL_INTERVAL": "00:10:00"}):
        assert reg.get("h").effective_poll_interval() == timedelta(seconds=7)


def test_effective_poll_interval_falls_back_to_the_setting(reg):
    reg.add_handler(Handler, name="h")
    with override_settings(WORKITEMS={"POLL_INTERVAL": "00:10:00"}):
        assert reg.get("h").effective_poll_interval() == timedelta(minutes=10)
    with override_settings(WORKITEMS={"POLL_INTERVAL": 3}):
        assert reg.get("h").effective_poll_interval() == timedelta(seconds=3)


# -- look-up -----------------------------------------------------------------------------------


@pytest.fixture
def filled(reg):
    reg.add_handler(Handler, name="zeta", purpose="ingestion")
    reg.add_handler(Handler, name="alpha", purpose=workitems.Purpose.EXPORT)
    reg.add_handler(Handler, name="mid")
    reg.add_handler(Handler, name="beta", purpose="ingestion")
    return reg


def test_names_sorted(filled):
    assert filled.names() == ["alpha", "beta", "mid", "zeta"]


@pytest.mark.parametrize(
    ("purpose", "expected"),
    [
        (workitems.Purpose.INGESTION, ["beta", "zeta"]),
        ("ingestion", ["beta", "zeta"]),
        ("export", ["alpha"]),
        (workitems.Purpose.INTERNAL, ["mid"]),
        (None, ["alpha", "beta", "mid", "zeta"]),
    ],
)
def test_names_by_purpose(filled, purpose, expected):
    assert filled.names(purpose) == expected


def test_names_of_an_unknown_purpose(filled):
    with raises_config("'nonsense'"):
        filled.names("nonsense")


def test_empty_registry(reg):
    assert reg.names() == []
    assert reg.names("export") == []
    assert list(reg) == []
    assert len(reg) == 0
    assert reg.select() == []


def test_iteration_is_sorted_registrations(filled):
    assert [r.name for r in filled] == ["alpha", "beta", "mid", "zeta"]
    assert all(isinstance(r, Registration) for r in filled)
    assert len(filled) == 4
    assert "mid" in filled
    assert "nope" not in filled
    assert "alpha" in repr(filled)


def test_select_all(filled):
    assert [r.name for r in filled.select()] == ["alpha", "beta", "mid", "zeta"]


def test_select_by_names_sorted_and_deduplicated(filled):
    selected = filled.select(["zeta", "alpha", "zeta"])
    assert [r.name for r in selected] == ["alpha", "zeta"]


def test_select_by_names_and_purpose(filled):
    assert [r.name for r in filled.select(["zeta", "alpha", "mid"], "ingestion")] == ["zeta"]


def test_select_empty_list_selects_nothing(filled):
    assert filled.select([]) == []


def test_select_unknown_name_lists_the_known_ones(filled):
    with pytest.raises(workitems.UnknownHandlerError) as info:
        filled.select(["alpha", "gamma"])
    message = str(info.value)
    assert "'gamma'" in message
    for name in ["alpha", "beta", "mid", "zeta"]:
        assert name in message
    assert info.value.name == "gamma"
    assert isinstance(info.value, LookupError)


def test_get_unknown_name(reg):
    with pytest.raises(workitems.UnknownHandlerError, match=r"'x'.*\(none\)"):
        reg.get("x")


def test_remove(filled):
    filled.remove("mid")
    assert filled.names() == ["alpha", "beta", "zeta"]
    assert "mid" not in filled
    with pytest.raises(workitems.UnknownHandlerError):
        filled.get("mid")
    filled.add_handler(OtherHandler, name="mid")  # the name is free again
    assert filled.get("mid").factory is OtherHandler


def test_remove_unknown(filled):
    with pytest.raises(workitems.UnknownHandlerError, match="'nope'"):
        filled.remove("nope")
    assert len(filled) == 4


def test_registries_are_independent(reg):
    other = HandlerRegistry()
    reg.add_handler(Handler, name="h")
    assert "h" not in other
    other.add_handler(Handler, name="h")  # no clash across registries
    assert reg.get("h") is not other.get("h")


def test_registering_the_very_same_handler_again_is_harmless(reg):
    # AppConfig.ready() can run twice when tests rebuild the app registry.
    reg.add_handler(Handler, name="again", max_items_per_cycle=5)
    assert reg.add_handler(Handler, name="again", max_items_per_cycle=5) is reg
    with raises_config("'again'", "already registered"):
        reg.add_handler(Handler, name="again", max_items_per_cycle=6)
    assert reg.get("again").max_items_per_cycle == 5


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"max_items_per_cycle": 2**31}, "max_items_per_cycle must be from 1 to 2147483647"),
        ({"max_concurrency": 2**31}, "max_concurrency must be None or an int from 1 to"),
        ({"poll_interval": 0.05}, "poll_interval 0.05 is too small (at least"),
        ({"poll_interval": 10**12}, "poll_interval 1000000000000 is too large"),
        ({"item_timeout": "999999999 00:00:00"}, "item_timeout '999999999 00:00:00' is too large"),
    ],
)
def test_registration_values_are_bounded_by_what_the_table_and_the_clock_hold(
    registry, options, expected
):
    from tests.testapp.handlers import JobHandler

    with pytest.raises(ImproperlyConfigured, match="Handler 'bounded'") as caught:
        registry.add_handler(JobHandler, name="bounded", **options)
    assert expected in str(caught.value)


def test_a_handler_class_path_longer_than_the_table_stores_is_refused(registry):
    from tests.testapp.handlers import JobHandler

    long = type("H" * 300, (JobHandler,), {})
    with pytest.raises(ImproperlyConfigured, match="longer than 255 characters"):
        registry.add_handler(long, name="long")

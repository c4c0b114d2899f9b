"""System checks: a bad ``WORKITEMS`` setting fails ``manage.py check`` and the worker start."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.apps import AppConfig, apps
from django.core.checks import CheckMessage, Error, Warning, register

from .conf import SETTINGS, app_settings
from .models import WorkItemModel

TAG = "django_workitems"


@register(TAG)
def check_settings(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """Report every invalid ``WORKITEMS`` value, and keys that are probably typos."""
    messages: list[CheckMessage] = [
        Error(str(problem), hint=_hint(problem.key), id=problem.check_id)
        for problem in app_settings.problems()
    ]
    messages.extend(
        Warning(
            f"settings.WORKITEMS has an unknown key {key!r}; it is ignored.",
            hint="Known keys: " + ", ".join(spec.key for spec in SETTINGS),
            id="django_workitems.W001",
        )
        for key in app_settings.unknown_keys()
    )
    return messages


def _hint(key: str) -> str:
    for spec in SETTINGS:
        if spec.key == key:
            return f"The default is {spec.default!r}."
    return "Set WORKITEMS to a dict, e.g. {'WORKERS': 4}."


@register(TAG, "models")
def check_work_item_indexes(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """Warn about ``WorkItemModel`` subclasses that lost the index their claims need.

    A subclass declaring ``class Meta:`` of its own (instead of ``Meta(WorkItemModel.Meta)``)
    drops the inherited indexes, and every claim then scans the whole table.
    """
    candidates = kwargs.get("models")
    if candidates is None:
        configs = app_configs if app_configs is not None else apps.get_app_configs()
        candidates = [model for config in configs for model in config.get_models()]
    return [
        Warning(
            f"{model._meta.label} has no index starting with (status, available_at): claiming "
            "its rows scans the whole table.",
            hint="Declare its Meta as `class Meta(WorkItemModel.Meta):` to keep the indexes.",
            obj=model,
            id="django_workitems.W002",
        )
        for model in candidates
        if issubclass(model, WorkItemModel)
        and not model._meta.abstract
        and not any(
            list(index.fields[:2]) == ["status", "available_at"] for index in model._meta.indexes
        )
    ]

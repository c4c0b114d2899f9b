"""System checks: a bad ``WORKITEMS`` setting fails ``manage.py check`` and the worker start."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.apps import AppConfig
from django.core.checks import CheckMessage, Error, Warning, register

from .conf import SETTINGS, app_settings

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

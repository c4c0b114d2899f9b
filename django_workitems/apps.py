from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class WorkItemsConfig(AppConfig):
    name = "django_workitems"
    label = "django_workitems"
    verbose_name = _("Work items")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import checks  # noqa: F401 - registers the system checks
        from .housekeeping import register

        register()  # the built-in run-retention handler

from django.db import models

from django_workitems.models import WorkItemModel, WorkItemQuerySet


class BenchItem(WorkItemModel):
    """A database-backed work item; no Meta of its own, so it keeps WorkItemModel's indexes."""

    handled = models.PositiveIntegerField(default=0, db_default=0)
    """Times a handler did this row's work (workloads 13 and 14: one ORM UPDATE each), so a row
    processed twice shows. A database default, so the bulk inserts need not name it."""

    # WorkItemModel's manager, declared again so that type checks know `handled`.
    objects = WorkItemQuerySet.as_manager()

    def __str__(self) -> str:
        return f"bench item {self.pk} ({self.status})"

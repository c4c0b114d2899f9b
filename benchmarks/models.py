from django_workitems.models import WorkItemModel


class BenchItem(WorkItemModel):
    """A database-backed work item; no Meta of its own, so it keeps WorkItemModel's indexes."""

    def __str__(self) -> str:
        return f"bench item {self.pk} ({self.status})"

from django.db import models

from django_workitems.models import WorkItemModel


class Job(models.Model):
    """A row of work for the test handlers; ``action`` says what processing it does."""

    queue = models.CharField(max_length=50, default="jobs")
    action = models.CharField(max_length=20, default="ok")  # ok | fail | sleep | stubborn
    seconds = models.FloatField(default=0)
    status = models.CharField(max_length=20, default="queued")
    times_processed = models.PositiveIntegerField(default=0)
    started_at = models.DateTimeField(null=True)
    finished_at = models.DateTimeField(null=True)

    class Meta:
        app_label = "testapp"
        ordering = ["id"]

    def __str__(self) -> str:
        return f"job {self.pk} ({self.queue}, {self.action})"


class Task(WorkItemModel):
    """A database-backed work item for the QuerySetHandler tests."""

    action = models.CharField(max_length=20, default="ok")  # ok | fail | crash | sleep
    seconds = models.FloatField(default=0)
    # Fields the database hands back raw, for Django to convert on read.
    payload = models.JSONField(default=dict)
    price = models.DecimalField(max_digits=8, decimal_places=2, default=0)

    class Meta(WorkItemModel.Meta):
        app_label = "testapp"

    def __str__(self) -> str:
        return f"task {self.pk} ({self.action})"


class ProcessLog(models.Model):
    """One row per call of handle(): how often each task was processed, and by which process."""

    task_id = models.BigIntegerField(db_index=True)
    pid = models.PositiveIntegerField()
    at = models.DateTimeField(auto_now_add=True)

    class Meta:
        app_label = "testapp"

    def __str__(self) -> str:
        return f"task {self.task_id} by {self.pid}"


class Activity(models.Model):
    """Start and end of each activation of the exclusive-handler test, per process."""

    pid = models.PositiveIntegerField()
    started = models.DateTimeField()
    ended = models.DateTimeField()

    class Meta:
        app_label = "testapp"

    def __str__(self) -> str:
        return f"{self.pid}: {self.started} - {self.ended}"

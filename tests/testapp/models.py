from django.db import models


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

"""Prometheus metrics of a worker process (optional: ``pip install django-workitems[metrics]``).

The engine calls the ``record_*`` / ``set_*`` functions below; without prometheus-client they do
nothing. (Implementation pending: this module fixes the API the engine calls.)
"""

from __future__ import annotations


def record_item(handler: str, outcome: str, seconds: float) -> None:
    """One item ended: ``outcome`` is ``succeeded``, ``failed`` or ``released``."""


def record_run(handler: str, status: str) -> None:
    """One run ended with ``status`` (a ``RunStatus`` value)."""


def set_given_up_threads(count: int) -> None:
    """Pool threads given up on hung ``process`` calls in this process."""


def set_worker_up(up: bool) -> None:
    """1 while this worker's loop runs."""


def serve(port: int) -> None:
    """Serve this process's metrics over HTTP on ``port`` (``runworkitems --metrics-port``)."""

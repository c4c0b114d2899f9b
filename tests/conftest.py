"""Fixtures shared by the suite: fresh registries, in-memory handlers, worker subprocesses."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import connection

import django_workitems as workitems
from django_workitems.registry import HandlerRegistry

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def registry() -> HandlerRegistry:
    """A registry of the test's own, so tests never see each other's handlers."""
    return HandlerRegistry()


def wait_for(
    condition: Callable[[], Any], timeout: float = 20.0, message: str = "condition"
) -> Any:
    """Poll ``condition`` until it is truthy; fail the test after a generous deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


class Recorder:
    """Thread-safe log of what handlers did, for assertions."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[str, Any]] = []

    def add(self, kind: str, value: Any = None) -> None:
        with self.lock:
            self.events.append((kind, value))

    def of(self, kind: str) -> list[Any]:
        with self.lock:
            return [value for k, value in self.events if k == kind]

    def count(self, kind: str) -> int:
        return len(self.of(kind))


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


_serials = itertools.count(1)


class ListHandler(workitems.WorkItemHandler[dict[str, Any]]):
    """Hands out dicts from a shared list, claiming them under a lock (like SKIP LOCKED)."""

    def __init__(
        self,
        source: list[dict[str, Any]],
        recorder: Recorder,
        name: str,
        delay: float = 0.0,
        fail: Callable[[dict[str, Any]], bool] | None = None,
    ) -> None:
        self.source, self.recorder, self.name, self.delay = source, recorder, name, delay
        self.fail = fail or (lambda item: False)
        self.serial = next(_serials)  # unlike id(), never reused by a later instance
        recorder.add(f"{name}:instance", self.serial)

    def fetch_next(
        self, max_items: int, cancel: workitems.CancellationToken
    ) -> list[dict[str, Any]]:
        with self.recorder.lock:
            batch = self.source[:max_items]
            del self.source[:max_items]
        self.recorder.add(f"{self.name}:fetch", (max_items, len(batch)))
        self.recorder.add(f"{self.name}:fetched-by", self.serial)
        return batch

    def process(self, item: dict[str, Any], cancel: workitems.CancellationToken) -> None:
        self.recorder.add(f"{self.name}:start", item["id"])
        if self.delay:
            time.sleep(self.delay)
        if self.fail(item):
            raise ValueError(f"item {item['id']} is bad")
        self.recorder.add(f"{self.name}:done", item["id"])

    def close(self) -> None:
        self.recorder.add(f"{self.name}:close", self.serial)


@pytest.fixture
def list_handler(recorder: Recorder) -> Callable[..., Callable[[], ListHandler]]:
    """Build a handler factory over ``count`` dict items; the list is shared by activations."""

    def build(name: str, count: int, **options: Any) -> Callable[[], ListHandler]:
        source = [{"id": f"{name}-{i}"} for i in range(count)]

        def factory() -> ListHandler:
            return ListHandler(source, recorder, name, **options)

        factory.__qualname__ = f"ListHandler[{name}]"
        factory.source = source  # type: ignore[attr-defined]
        return factory

    return build


def database_url() -> str:
    """The URL of the test database, for worker subprocesses."""
    settings = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{Path(settings['NAME']).resolve()}"
    return (
        f"postgres://{settings['USER']}@{settings['HOST'] or '127.0.0.1'}"
        f":{settings['PORT'] or 5432}/{settings['NAME']}"
    )


@pytest.fixture
def worker_env() -> Callable[..., dict[str, str]]:
    def build(**extra: str) -> dict[str, str]:
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "PYTHONPATH": str(ROOT),
            "DATABASE_URL": database_url(),
            "WORKITEMS_LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("PYTHONDEVMODE", None)
        env.update(extra)
        return env

    return build


class WorkerProcess:
    """A ``manage.py runworkitems`` subprocess with its output captured to a file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log_path = log
        self._log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "django", "runworkitems", *args],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        return self.log_path.read_text()

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def start_worker(
    worker_env: Callable[..., dict[str, str]], tmp_path: Path
) -> Iterator[Callable[..., WorkerProcess]]:
    workers: list[WorkerProcess] = []

    def start(*args: str, **env: str) -> WorkerProcess:
        worker = WorkerProcess(
            list(args), worker_env(**env), tmp_path / f"worker-{len(workers)}.log"
        )
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.kill()


@pytest.fixture
def run_in_background() -> Iterator[Callable[..., Any]]:
    """Start a BackgroundProcessingService on a thread; it is stopped at the end of the test."""
    from django_workitems.background import BackgroundProcessingService

    running: list[tuple[BackgroundProcessingService, threading.Thread]] = []

    def start(**options: Any) -> BackgroundProcessingService:
        service = BackgroundProcessingService(**options)
        thread = threading.Thread(target=service.run, name="test-coordinator")
        thread.start()
        assert service.started.wait(20), "the service did not start"
        running.append((service, thread))
        return service

    yield start
    for service, thread in running:
        service.stop()
        thread.join(60)
        assert not thread.is_alive(), "the service did not stop"


@pytest.fixture(autouse=True)
def _fresh_claim_state() -> Iterator[None]:
    """QuerySetHandler keeps per-process claim state (like a cache); each test starts clean."""
    from django_workitems.claims import reset_local_book

    reset_local_book()
    yield

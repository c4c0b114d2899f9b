"""The plain loop of workloads 13 and 14: ``python -m benchmarks.plainloop [--threads 4] [--wait]``.

What one would write without the engine, on PostgreSQL: a loop that claims 100 rows with one
statement, ``UPDATE ... WHERE id IN (SELECT id ... FOR UPDATE SKIP LOCKED) RETURNING id``, and
hands their work to a ``ThreadPoolExecutor``, until a claim finds nothing. It writes what the
engine writes, statement for statement: the claim sets the columns ``QuerySetHandler``'s claim
sets (status, token, ``claimed_at``, ``modified``, ``attempts + 1``); each item's work is
:func:`~benchmarks.handlers.orm_work`, the engine handler's one ORM UPDATE; and the successes of
each batch are marked in one UPDATE fenced by the claim's token, as ``QuerySetHandler`` writes
its successes (in batches of up to 100). One more batch is claimed and queued behind the one in
process, so the pool never waits for a claim (the engine fetches ahead too).

Started by the benchmark with its ``DJANGO_SETTINGS_MODULE`` and ``DATABASE_URL``. With
``--wait`` it sets itself up, says ``bench-ready`` and waits for SIGUSR1, so that several
processes begin together. It ends saying ``bench-plain <rows done>``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import django


def claim_sql() -> str:
    """The claim: one statement, the same candidates in the same order as the engine's."""
    from django.db import connection

    from .models import BenchItem
    from .workloads import CLAIM_BATCH  # the engine handler's max_items_per_cycle too

    table = connection.ops.quote_name(BenchItem._meta.db_table)
    return (
        f"UPDATE {table} SET status = %s, claimed_by_id = NULL, claim_token = %s,"  # noqa: S608
        " claimed_at = STATEMENT_TIMESTAMP(), modified = STATEMENT_TIMESTAMP(),"
        " attempts = attempts + 1"
        f" WHERE id IN (SELECT id FROM {table} WHERE status = %s"
        " AND available_at <= STATEMENT_TIMESTAMP() ORDER BY available_at, id"
        f" LIMIT {CLAIM_BATCH} FOR UPDATE SKIP LOCKED) RETURNING id"
    )


def drain(threads: int) -> int:
    """Claim, work and mark done until a claim finds nothing; the number of rows done."""
    from django.db import connection

    from django_workitems.models import db_now

    from .handlers import orm_work
    from .models import BenchItem

    status = BenchItem.STATUS
    sql = claim_sql()
    batches: deque[tuple[list[int], uuid.UUID, list[Future[None]]]] = deque()

    def finish() -> int:
        ids, token, futures = batches.popleft()
        for future in futures:
            future.result()
        BenchItem.objects.filter(pk__in=ids, claim_token=token, status=status.processing).update(
            status=status.succeeded, last_error="", modified=db_now()
        )
        return len(ids)

    done = 0
    with ThreadPoolExecutor(threads, thread_name_prefix="plain") as pool:
        while True:
            token = uuid.uuid4()
            with connection.cursor() as cursor:
                cursor.execute(sql, [status.processing, token, status.queued])
                ids = [row[0] for row in cursor.fetchall()]
            if ids:
                batches.append((ids, token, [pool.submit(orm_work, pk) for pk in ids]))
            while len(batches) > 1 or (batches and not ids):
                done += finish()
            if not ids:
                return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plainloop")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--wait", action="store_true", help="begin on SIGUSR1")
    args = parser.parse_args(argv)
    if args.wait:  # blocked first, so a signal sent before sigwait waits for it
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    django.setup()
    from django.db import connection

    connection.ensure_connection()
    print("bench-ready", flush=True)
    if args.wait:
        signal.sigwait({signal.SIGUSR1})
    done = drain(args.threads)
    print("bench-plain", done, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

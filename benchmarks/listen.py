"""A bare LISTEN loop, the baseline of workload 4: prints when each notification arrives.

Run by the benchmark with ``DATABASE_URL`` pointing at its PostgreSQL database.
"""

import os
import time

import psycopg


def main() -> None:
    with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
        conn.execute("LISTEN bench_raw")
        print("bench-ready", flush=True)
        for note in conn.notifies():
            print("bench-raw", note.payload, f"{time.monotonic():.6f}", flush=True)


if __name__ == "__main__":
    main()

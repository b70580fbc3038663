"""The event log: events written per second, and ``sender events`` over a big log.

    python bench/events.py [--events 1000000]

Writes ``--events`` events (a realistic mix: accepted, delivered, deferred with replies,
bounced; 50 customers, 5 providers, 8 sources) through ``EventLog`` into a temporary folder,
over several hourly files, and prints events per second and bytes per event. Then times
``python -m sender events`` (a process of its own, as an operator runs it) over that log:

  - a narrow filter (one customer's deferrals toward one provider), printed as JSON lines;
  - a count by provider and category of everything;
  - the same narrow filter with ``grep -c`` (the peer: a C program that only searches bytes).

Everything is bounded by the event count and ends by itself; the folder is removed.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sender.events import Event, EventLog  # noqa: E402

PROVIDERS = ["google", "microsoft", "yahoo", "apple", "other"]
REPLIES = {"deferred": ("421 4.7.28 Our system has detected an unusual rate of unsolicited mail", "rate_limited"),
           "bounced": ("550 5.1.1 The email account that you tried to reach does not exist", "invalid_recipient")}
T0 = 1_795_500_000.0


def write(folder: str, n: int) -> float:
    """Write ``n`` events; returns the seconds it took (emit and flush, no fsync)."""
    rng = random.Random(7)
    clock = [T0]
    log = EventLog(folder, now=lambda: clock[0], recent=10_000)
    kinds = ["accepted"] * 40 + ["delivered"] * 40 + ["deferred"] * 15 + ["bounced"] * 5
    start = time.perf_counter()
    for i in range(n):
        clock[0] = T0 + i * 0.01                    # 100 events a second: a file per 360,000
        kind = kinds[i % 100]
        reply, category = REPLIES.get(kind, ("", ""))
        log.emit(Event(time=clock[0], event=kind, id=f"{i:017X}", customer=f"c{rng.randrange(50)}",
                       rcpts=[f"u{i}@d{i % 997}.test"], domain=f"d{i % 997}.test",
                       provider=PROVIDERS[i % 5], site=f"mx.{PROVIDERS[i % 5]}.test",
                       source=f"127.0.0.{2 + i % 8}", reply=reply, category=category))
        if i % 2500 == 2499:                        # the writer task flushes every quarter second
            log.flush()
    log.close()
    return time.perf_counter() - start


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600).stdout
    return time.perf_counter() - start, out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--events", type=int, default=1_000_000)
    args = p.parse_args()
    folder = tempfile.mkdtemp(prefix="sender-events-bench-")
    try:
        seconds = write(folder, args.events)
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        print(f"setup:   {os.cpu_count()} CPUs, Python {sys.version.split()[0]}; {args.events:,} events in "
              f"{len(os.listdir(folder))} hourly files, {size / 1e6:.0f} MB ({size / args.events:.0f} bytes/event)")
        print(f"write:   {args.events / seconds:,.0f} events/s ({seconds * 1e6 / args.events:.2f} µs per event, "
              "JSON lines, flushed every 2,500, no fsync)")
        sender = [sys.executable, "-m", "sender", "events", "--dir", folder]
        narrow = ["--customer", "c7", "--event", "deferred", "--provider", "microsoft"]
        t, out = timed(sender + narrow + ["--json"])
        found = len(out.splitlines())
        print(f"filter:  sender events {' '.join(narrow)} --json: {t:.2f} s, {found:,} events")
        t, out = timed(sender + ["--group-by", "provider,category", "--json"])
        print(f"count:   sender events --group-by provider,category: {t:.2f} s, {len(out.splitlines())} groups")
        files = sorted(os.path.join(folder, f) for f in os.listdir(folder))
        grep = shutil.which("grep")
        if grep:
            needle = '"customer":"c7"'
            start = time.perf_counter()
            p1 = subprocess.Popen([grep, "-h", "-F", needle, *files], stdout=subprocess.PIPE)
            p2 = subprocess.Popen([grep, "-F", '"event":"deferred"'], stdin=p1.stdout, stdout=subprocess.PIPE)
            p3 = subprocess.run([grep, "-c", "-F", '"provider":"microsoft"'], stdin=p2.stdout,
                                capture_output=True, text=True, timeout=600)
            p1.wait()
            p2.wait()
            t_grep = time.perf_counter() - start
            print(f"peer:    grep -F (three in a pipe) for the same filter: {t_grep:.2f} s, "
                  f"{int(p3.stdout.strip() or 0):,} lines")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

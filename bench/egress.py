"""Cost of choosing a source per delivery (``Egress.choose``), against pool size.

    python bench/egress.py [--choices 200000]

Prints choices per second and microseconds per choice for: no pools (the default source),
and pools of 1, 4 and 16 sources, each with a warmup plan, a reputation window with history
toward the provider, and automation rules loaded (no action in force).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sender.config import parse_config  # noqa: E402
from sender.model import Delivery  # noqa: E402
from sender.routing import Egress  # noqa: E402


def egress(n_sources: int) -> Egress:
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    sources = {f"s{i}": {"address": f"127.0.{i // 250}.{i % 250 + 2}", "warmup": "default", "warmup_start": today}
               for i in range(n_sources)}
    data = {"source": sources, "pool": {"p": {"sources": list(sources)}}, "egress": {"default_pool": "p"}} \
        if n_sources else {}
    e = Egress(parse_config(data))
    e.start(time.time())
    return e


def run(n_sources: int, choices: int) -> tuple[float, float]:
    e = egress(n_sources)
    now = time.time()
    for s in e.sources.values():
        for i in range(200):
            e.reputation.record(s.address, "google", "delivered" if i % 10 else "deferred", "rate_limited", now)
    d = Delivery("0", "a@x.test", "gmail.test", ["u@gmail.test"], 0, 0, 0, now)
    t0 = time.perf_counter()
    for _ in range(choices):
        e.choose(d, "google", "mx.google.com:25", now)
    dt = time.perf_counter() - t0
    return choices / dt, dt / choices * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--choices", type=int, default=200_000)
    args = p.parse_args()
    print(f"Egress.choose, {args.choices:,} choices each (one process, one core)")
    print(f"{'sources in the pool':<22}{'choices/s':>12}{'µs/choice':>12}")
    for n in (0, 1, 4, 16):
        rate, us = run(n, args.choices)
        print(f"{'none (default source)' if n == 0 else n:<22}{rate:>12,.0f}{us:>12.2f}")


if __name__ == "__main__":
    main()

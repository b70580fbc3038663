"""Compare the compiled and pure-Python scheduler twins; prints ops/s and the ratio.

Usage: python bench/scheduler_twins.py [N]   (default N=50_000: about 1,000,000
operations in all, a few seconds). Runs alternate between twins and each figure
is the best of REPEAT, so load from other processes skews both sides alike.
"""

import importlib
import os
import random
import sys
import time

N = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
REPEAT = 5


def bench_heap(mod, dues):
    """push N timers, then drain them with pop_due in 100 clock steps, as a retry loop would."""
    h = mod.TimerHeap()
    push = h.push
    t0 = time.perf_counter()
    for i, due in enumerate(dues):
        push(due, i, i & 3)
    step = max(dues) / 100
    now = 0.0
    popped = 0
    while h:
        now += step
        popped += len(h.pop_due(now))
    elapsed = time.perf_counter() - t0
    assert popped == len(dues)
    return 2 * len(dues) / elapsed


def bench_bucket(mod, n):
    """try_take on a bucket that is sometimes empty, clock advancing 0.1 ms per call."""
    b = mod.TokenBucket(5000.0, 50.0)
    take = b.try_take
    t0 = time.perf_counter()
    for i in range(n):
        take(i * 1e-4)
    return n / (time.perf_counter() - t0)


def main():
    rng = random.Random(42)
    dues = [rng.uniform(0.0, 3600.0) for _ in range(N)]
    twins = ["py"]
    if os.environ.get("SENDER_NO_EXTENSIONS") != "1":
        try:
            importlib.import_module("sender._scheduler_c")
            twins.insert(0, "c")
        except ImportError as exc:
            print(f"compiled twin unavailable ({exc}); pure Python only")
    mods = {name: importlib.import_module(f"sender._scheduler_{name}") for name in twins}
    results = {name: [0.0, 0.0] for name in twins}
    for _ in range(REPEAT):
        for name, mod in mods.items():
            best = results[name]
            best[0] = max(best[0], bench_heap(mod, dues))
            best[1] = max(best[1], bench_bucket(mod, N))
    print(f"N={N}, best of {REPEAT}, ops/s")
    print(f"{'':12}{'push+pop_due':>16}{'try_take':>16}")
    for name, (heap, bucket) in results.items():
        print(f"{name:12}{heap:16,.0f}{bucket:16,.0f}")
    if "c" in results:
        c, py = results["c"], results["py"]
        print(f"{'c/py':12}{c[0] / py[0]:15.1f}x{c[1] / py[1]:15.1f}x")


if __name__ == "__main__":
    main()

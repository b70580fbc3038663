"""The Scheduler twins under a mail-shaped load: push + pop operations per second, CPU and RSS.

Usage:
  python bench/scheduler.py [--messages 1000000] [--py-messages 200000] [--domains 100000]
                            [--customers 50] [--providers 200] [--ips 8] [--rate 5000]
                            [--repeat 3] [--budget 100] [--seed 1]

The load: N messages to recipient domains drawn Zipf-like (a few big domains, a long tail),
with buckets at four levels: customer, recipient domain (one each), mailbox provider and
sending IP. Each domain belongs to one customer, one provider and one IP (drawn from a seeded
RNG), and there is one queue per (customer, domain) pair in use, limited by those four
buckets. Priorities are 0, 1 and 5 (80, 15 and 5 %); 2 % of the messages are pushed with a
``due`` up to five minutes ahead.

Messages arrive in batches of 100, ``--rate`` per second of virtual time on average, in waves
(1.5 times that rate for 5 s of every 40 s). After each batch the loop pops until ``pop``
returns None, then moves the clock to the next arrival or to ``next_wakeup()``, whichever
comes first, as the dispatcher's task sleeps. Each bucket's rate is its expected share of the
arrivals times 1.2 to 1.3 depending on the level (at least 0.5/s), with one second of tokens
as burst (at least 5 for a domain), so random bursts and the waves make buckets of every level
hold messages now and then while most pops succeed; the output shows how often.

Each run is a fresh process, so its peak RSS (VmHWM) belongs to one twin; runs alternate
between twins and each figure is the best of ``--repeat``, so load from other processes skews
both sides alike. The Python twin is slow, so it runs the first ``--py-messages`` messages of
the same stream (same buckets, same arrival rate). ops/s counts push and pop calls (including
pops that return None) over the wall time of the loop; building buckets and queues is not
timed. A separate short run feeds both twins the same messages and checks that they pop the
same items at the same times. The whole run stays within ``--budget`` seconds: repeats that
would not fit are skipped, and the output says so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import subprocess
import sys
import time
from array import array
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BATCH = 100                 # messages per arrival
WAVE = (1.5, 5.0, 40.0)     # arrivals at 1.5x the mean rate for 5 s of every 40 s, a little below it otherwise
# Per level: rate as a multiple of the expected load, burst in seconds of tokens, least burst.
LEVELS = {
    "customer": (1.3, 1.0, 1.0),
    "domain": (1.25, 1.0, 5.0),
    "provider": (1.3, 1.0, 1.0),
    "ip": (1.2, 1.0, 1.0),
}
MIN_RATE = 0.5              # tokens per second, for the long tail of domains
PRIORITIES = ((0, 80), (1, 15), (5, 5))
LATER_SHARE = 0.02          # pushed with a due in the future
LATER_MAX = 300.0           # seconds
CHECK_MESSAGES = 20_000
TWINS = {"c": "compiled", "py": "Python"}


def proc_status_mb(field: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource                                  # not Linux: peak only, in KiB

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if field == "VmHWM" else math.nan


class Load:
    """The domains, their buckets and the message stream, all from one seed.

    Each stream has its own RNG, so the first K messages are the same whatever N is: the
    Python twin's shorter run and the agreement check see a prefix of the compiled run's load.
    """

    def __init__(self, args: argparse.Namespace, messages: int) -> None:
        d, rate = args.domains, args.rate
        weights = [1.0 / (k + 1) for k in range(d)]            # Zipf, s = 1: rank k's share
        total = sum(weights)
        share = [w / total for w in weights]
        rng = random.Random(args.seed)
        cust_w = [1.0 / (c + 1) for c in range(args.customers)]
        prov_w = [1.0 / (p + 1) for p in range(args.providers)]
        self.customer = rng.choices(range(args.customers), cust_w, k=d)
        self.provider = rng.choices(range(args.providers), prov_w, k=d)
        self.ip = [rng.randrange(args.ips) for _ in range(d)]

        def rates(level: str, owner: list[int], n: int) -> list[float]:
            """Each bucket's rate: its expected share of the arrivals, times the level's headroom."""
            load = [0.0] * n
            for dom, o in enumerate(owner):
                load[o] += share[dom]
            return [max(MIN_RATE, LEVELS[level][0] * x * rate) for x in load]

        self.rates = {"customer": rates("customer", self.customer, args.customers),
                      "domain": rates("domain", list(range(d)), d),
                      "provider": rates("provider", self.provider, args.providers),
                      "ip": rates("ip", self.ip, args.ips)}
        self.domain = array("l", random.Random(args.seed + 1).choices(range(d), cum_weights=_cumulative(weights),
                                                                      k=messages))
        prio_rng = random.Random(args.seed + 2)
        self.priority = array("b", prio_rng.choices([p for p, _ in PRIORITIES], [w for _, w in PRIORITIES],
                                                    k=messages))
        later_rng = random.Random(args.seed + 3)
        self.later = array("d", (later_rng.uniform(1.0, LATER_MAX) if later_rng.random() < LATER_SHARE else 0.0
                                 for _ in range(messages)))
        # Arrival time of each batch, then inf.
        high, high_s, period = WAVE
        low = (period - high * high_s) / (period - high_s)      # so the mean rate is ``rate``
        self.arrivals = array("d")
        t = 0.0
        for _ in range(0, messages, BATCH):
            self.arrivals.append(t)
            t += BATCH / (rate * (high if t % period < high_s else low))
        self.arrivals.append(math.inf)

    def build(self, mod):
        """A Scheduler with every bucket and one queue per domain in the stream.

        Returns:
          the scheduler, the queue id of each message, the number of queues and of buckets.
        """
        s = mod.Scheduler()
        ids = {}
        for level, rates in self.rates.items():
            _, burst_s, least = LEVELS[level]
            ids[level] = [s.add_bucket(f"{level}:{i}", r, max(least, r * burst_s), 0.0) for i, r in enumerate(rates)]
        queue_of: dict[int, int] = {}
        qids = array("l", [0]) * len(self.domain)
        for j, dom in enumerate(self.domain):
            q = queue_of.get(dom)
            if q is None:
                q = queue_of[dom] = s.add_queue([ids["customer"][self.customer[dom]], ids["domain"][dom],
                                                 ids["provider"][self.provider[dom]], ids["ip"][self.ip[dom]]])
            qids[j] = q
        return s, qids, len(queue_of), sum(len(v) for v in ids.values())


def _cumulative(weights: list[float]) -> list[float]:
    out, acc = [], 0.0
    for w in weights:
        acc += w
        out.append(acc)
    return out


def drive(s, qids, priority, later, arrivals, record: list | None = None) -> dict:
    """Push batches as they arrive and pop until held, on a virtual clock; returns counts."""
    push, pop, next_wakeup = s.push, s.pop, s.next_wakeup
    n = len(qids)
    now = 0.0
    i = batch = popped = nones = jumps = 0
    while popped < n:
        if arrivals[batch] <= now:
            end = min(i + BATCH, n)
            for j in range(i, end):
                push(qids[j], j, now, priority[j], now + later[j])
            i = end
            batch += 1
        got = pop(now)
        if got is not None:
            popped += 1
            if record is not None:
                record.append((now, *got))
            continue
        nones += 1
        if arrivals[batch] <= now:
            continue
        wake = next_wakeup()
        if arrivals[batch] < wake:
            now = arrivals[batch]
        elif wake < math.inf:
            now = wake
            jumps += 1
        else:
            raise RuntimeError(f"{len(s)} messages held with no wake-up at t={now}")
    return {"pushes": n, "pops": popped + nones, "nones": nones, "jumps": jumps, "virtual_s": now}


def child(args: argparse.Namespace) -> None:
    """One measurement in this process: print its figures as JSON."""
    import importlib

    mod = importlib.import_module(f"sender._scheduler_{args.child}")
    messages = args.messages if args.child == "c" else args.py_messages
    load = Load(args, messages)
    s, qids, queues, buckets = load.build(mod)
    rss_before = proc_status_mb("VmRSS")
    cpu0, t0 = time.process_time(), time.perf_counter()
    counts = drive(s, qids, load.priority, load.later, load.arrivals)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    print(json.dumps({**counts, "messages": messages, "queues": queues, "buckets": buckets, "wall_s": wall,
                      "cpu_s": cpu, "ops_per_s": (counts["pushes"] + counts["pops"]) / wall,
                      "rss_before_mb": rss_before, "peak_rss_mb": proc_status_mb("VmHWM")}), flush=True)


def run_child(twin: str, argv: list[str], timeout: float) -> dict | str:
    """Figures from a fresh process, or why there are none."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    try:
        r = subprocess.run([sys.executable, __file__, *argv, "--child", twin], capture_output=True, text=True,
                           timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return f"stopped after {timeout:.0f} s (--budget)"
    if r.returncode != 0:
        return f"exited {r.returncode}: {r.stderr.strip()[-500:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def check_agreement(args: argparse.Namespace, n: int) -> str:
    """Both twins on the same first ``n`` messages: every pop must match, time included."""
    import sender._scheduler_c as c
    import sender._scheduler_py as py

    load = Load(args, n)
    pops = []
    for mod in (c, py):
        s, qids, _, _ = load.build(mod)
        pops.append([])
        drive(s, qids, load.priority, load.later, load.arrivals, pops[-1])
    if pops[0] == pops[1]:
        return f"same (time, queue, item) for all {n:,} pops"
    first = next(k for k, (a, b) in enumerate(zip(pops[0], pops[1])) if a != b)
    return f"DIFFER at pop {first:,}: compiled {pops[0][first]}, Python {pops[1][first]}"


def compiled_status() -> str | None:
    """None if the compiled twin can run, else why not."""
    if os.environ.get("SENDER_NO_EXTENSIONS") == "1":
        return "not in use (SENDER_NO_EXTENSIONS=1)"
    try:
        import sender._scheduler_c  # noqa: F401
    except ImportError as exc:
        return f"not in use (does not import: {exc})"
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=1_000_000, help="messages for the compiled twin")
    p.add_argument("--py-messages", type=int, default=200_000,
                   help="messages for the Python twin (the first of the same stream)")
    p.add_argument("--domains", type=int, default=100_000)
    p.add_argument("--customers", type=int, default=50)
    p.add_argument("--providers", type=int, default=200)
    p.add_argument("--ips", type=int, default=8)
    p.add_argument("--rate", type=float, default=5000.0, help="arrivals per second of virtual time")
    p.add_argument("--repeat", type=int, default=3, help="runs per twin; the best counts")
    p.add_argument("--budget", type=float, default=100.0, help="seconds for the whole run")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--child", choices=TWINS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if min(args.messages, args.py_messages, args.domains, args.customers, args.providers, args.ips,
           args.repeat) < 1 or not args.rate > 0:
        p.error("counts and --rate must be positive")
    if args.child:
        child(args)
        return 0

    start = time.perf_counter()
    argv = sys.argv[1:]
    why_not_c = compiled_status()
    twins = ["py"] if why_not_c else ["c", "py"]
    best: dict[str, dict] = {}
    peak: dict[str, float] = {}
    failed: dict[str, str] = {}
    rounds = 0
    round_s = 0.0
    for _ in range(args.repeat):
        left = args.budget - (time.perf_counter() - start)
        if rounds and left < round_s * 1.2:
            break
        t0 = time.perf_counter()
        for twin in twins:
            r = run_child(twin, argv, max(5.0, args.budget - (time.perf_counter() - start)))
            if isinstance(r, str):
                failed[twin] = r
                continue
            peak[twin] = max(peak.get(twin, 0.0), r["peak_rss_mb"])
            if twin not in best or r["ops_per_s"] > best[twin]["ops_per_s"]:
                best[twin] = r
        if failed:
            break
        rounds += 1
        round_s = max(round_s, time.perf_counter() - t0)

    check = None
    if not why_not_c and not failed:
        n = min(CHECK_MESSAGES, args.messages, args.py_messages)
        check = check_agreement(args, n)

    high, high_s, period = WAVE
    print(f"command: {shlex.join([os.path.relpath(__file__), *sys.argv[1:]])}")
    print(f"load:    {args.messages:,} messages to {args.domains:,} domains, Zipf-like; the Python twin "
          f"runs the first {args.py_messages:,} (it is slow)")
    print(f"         buckets: {args.customers} customers, {args.domains:,} domains, {args.providers} providers, "
          f"{args.ips} IPs;")
    print("         one queue per (customer, domain) in use, behind its four buckets")
    print(f"         {args.rate:,.0f} arrivals/s of virtual time on average, in batches of {BATCH}, "
          f"{high:g}x for {high_s:g} s of every {period:g} s")
    print("         priorities " + "/".join(str(p) for p, _ in PRIORITIES) + " = "
          + "/".join(str(w) for _, w in PRIORITIES) + f" %; {LATER_SHARE:.0%} pushed with a later due")
    print(f"runs:    {rounds} per twin, alternating, each a fresh process; the best ops/s counts"
          + ("" if rounds == args.repeat else f" ({args.repeat - rounds} more would not fit --budget)"))
    print()
    print(f"{'twin':<24}{'messages':>10}{'queues':>9}{'push+pop ops/s':>16}{'CPU s':>7}{'peak RSS':>10}"
          f"{'pops None':>11}{'clock jumps':>13}")
    for twin in ("c", "py"):
        label = f"{TWINS[twin]} (_scheduler_{twin})"
        if twin == "c" and why_not_c:
            print(f"{label:<24}  {why_not_c}")
        elif twin not in best:
            print(f"{label:<24}  failed: {failed[twin]}")
        else:
            r = best[twin]
            print(f"{label:<24}{r['messages']:>10,}{r['queues']:>9,}{r['ops_per_s']:>16,.0f}{r['cpu_s']:>7.2f}"
                  f"{peak[twin]:>7.0f} MB{r['nones'] / r['pops']:>10.1%}{r['jumps']:>13,}")
    if "c" in best and "py" in best:
        print(f"{'compiled / Python':<43}{best['c']['ops_per_s'] / best['py']['ops_per_s']:>15.1f}x")
    print()
    print("ops/s: push and pop calls over the wall time of the loop; CPU s: the loop's, in the best run.")
    print("pops None: pop calls that found every message held, after which the clock moves on;")
    print("clock jumps: moves to next_wakeup() rather than to the next arrival.")
    if best:
        twin, r = next(iter(best.items()))
        print(f"peak RSS: the whole process (VmHWM); {r['rss_before_mb']:.0f} MB before the first push in the "
              f"{TWINS[twin]} run")
        print("(interpreter, message stream, buckets and queues).")
    if check:
        print(f"twins agree on the first {min(CHECK_MESSAGES, args.messages, args.py_messages):,} messages: {check}")
    for twin, why in failed.items():
        print(f"{TWINS[twin]} twin: {why}", file=sys.stderr)
    print(f"total {time.perf_counter() - start:.0f} s")
    return 1 if failed or (check and check.startswith("DIFFER")) else 0


if __name__ == "__main__":
    sys.exit(main())

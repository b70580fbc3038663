"""Memory and restart cost of a big queue: peak RSS with N queued messages, and how long the
engine takes to replay their journal.

Usage:
  python bench/queue_memory.py [--messages 1000000] [--size 2048] [--dir /tmp] [--timeout 900]

Phase 1 writes a spool of N queued messages straight through ``sender.journal.Journal.append``
(fsync "never", one Accepted record per message, a distinct recipient each, spread over 100
domains), with ``next_at`` a day ahead so that no delivery is due when the engine starts.
That is the journal a daemon leaves behind with N messages waiting, without spending an hour
injecting them over SMTP.

Phase 2 starts a fresh process per measurement that builds an ``Engine`` on that spool
(route "*" to 127.0.0.1:9, where nothing is ever tried since nothing is due) and times
``await nursery.start(engine.run)``: journal replay plus queueing every message in the
scheduler. It reports replay seconds, live messages, RSS before and after, and VmHWM (peak
RSS). It runs twice: "cold" after evicting the spool's own pages from the page cache
(posix_fadvise DONTNEED on its segment files only, nothing machine-wide), then "warm".

Targets: 1,000,000 messages in under 600 MB RSS, replayed in under 15 s. The spool (about
2.2 GB for the defaults) is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DOMAINS = 100
RECORD_OVERHEAD = 120   # frame header + msgpack fields besides the body, bytes (measured ~100)


def proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_body(size: int) -> bytes:
    head = (b"From: <app@sender.test>\r\nSubject: queued\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=us-ascii\r\n\r\n")
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    return head + (line * (size // len(line) + 1))[: max(0, size - len(head))]


def write_spool(spool: str, messages: int, size: int) -> float:
    """Append N Accepted records, ids in the engine's format, due a day from now."""
    import trio
    from sender.journal import Journal
    from sender.model import Accepted

    body = make_body(size)
    now = time.time()
    base = int(now * 1_000_000)
    due = now + 86400

    async def fill() -> None:
        journal = Journal(spool, fsync="never")
        journal.replay()
        append = journal.append
        step = max(1, messages // 10)
        for i in range(messages):
            append(Accepted(id=f"{base + i:014X}{0:03X}", sender="app@sender.test",
                            rcpts=[f"user{i}@d{i % DOMAINS}.example"], received_at=now, body=body,
                            next_at=due))
            if i % step == step - 1:
                print(f"  written {i + 1:,}", file=sys.stderr, flush=True)
        journal.close()

    t0 = time.perf_counter()
    trio.run(fill)
    return time.perf_counter() - t0


def evict_page_cache(spool: str) -> None:
    """Drop only this spool's cached pages, so the next replay reads from disk."""
    for p in Path(spool).glob("*.seg"):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def replay_child(spool: str) -> None:
    """In a fresh process: start an Engine on the spool, time it, print JSON, stop."""
    import trio
    from sender.config import parse_config
    from sender.engine import Engine

    config = parse_config({
        "spool": {"path": spool, "fsync": "never"},
        "listen": {"smtp": ""},
        "route": [{"match": "*", "relay": "127.0.0.1:9"}],
    })
    out: dict = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            out["rss_before_mb"] = proc_status_mb("VmRSS")
            cpu0, t0 = time.process_time(), time.perf_counter()
            engine = await nursery.start(Engine(config).run)
            out["replay_seconds"] = time.perf_counter() - t0
            out["replay_cpu_seconds"] = time.process_time() - cpu0
            out["live_messages"] = len(engine._live)
            out["queued"] = engine.dispatcher.queued()
            out["rss_after_mb"] = proc_status_mb("VmRSS")
            out["peak_rss_mb"] = proc_status_mb("VmHWM")
            nursery.cancel_scope.cancel()

    trio.run(main)
    print(json.dumps(out), flush=True)


def run_replay(spool: str, timeout: float) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    try:
        r = subprocess.run([sys.executable, __file__, "--replay-child", spool], capture_output=True, text=True,
                           timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"queue_memory: replay did not finish within {timeout:.0f} s") from None
    if r.returncode != 0:
        raise SystemExit(f"queue_memory: replay process exited {r.returncode}:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=1_000_000)
    p.add_argument("--size", type=int, default=2048, help="message size in bytes")
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where to put the temporary spool")
    p.add_argument("--timeout", type=float, default=900.0, help="limit for each replay process, seconds")
    p.add_argument("--replay-child", metavar="SPOOL", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.replay_child:
        replay_child(args.replay_child)
        return 0
    if args.messages < 1 or args.size < 1:
        p.error("--messages and --size must be positive")
    cmdline = shlex.join([os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable,
                          os.path.relpath(__file__), *sys.argv[1:]])

    need = args.messages * (args.size + RECORD_OVERHEAD)
    free = shutil.disk_usage(args.dir).free
    if free < need * 1.1 + (512 << 20):
        print(f"queue_memory: not enough space in {args.dir}: the spool needs about {need / 1e9:.1f} GB "
              f"(plus margin), {free / 1e9:.1f} GB free. Use --dir or fewer --messages.", file=sys.stderr)
        return 2

    spool = tempfile.mkdtemp(prefix="sender-qmem-", dir=args.dir)
    try:
        print(f"queue_memory: writing {args.messages:,} messages of {args.size} bytes to {spool} ...",
              file=sys.stderr, flush=True)
        write_seconds = write_spool(spool, args.messages, args.size)
        segs = list(Path(spool).glob("*.seg"))
        spool_bytes = sum(s.stat().st_size for s in segs)
        print("queue_memory: replay, cold page cache ...", file=sys.stderr, flush=True)
        evict_page_cache(spool)
        cold = run_replay(spool, args.timeout)
        print("queue_memory: replay, warm page cache ...", file=sys.stderr, flush=True)
        warm = run_replay(spool, args.timeout)
    finally:
        shutil.rmtree(spool, ignore_errors=True)

    ok = True
    print()
    print(f"command: {cmdline}")
    print(f"spool:   {args.messages:,} queued messages of {args.size} bytes, {len(segs)} segments, "
          f"{spool_bytes / 1e9:.2f} GB on disk (written in {write_seconds:.1f} s, then deleted)")
    print()
    print(f"{'':<22}{'replay s':>10}{'CPU s':>8}{'live msgs':>12}{'RSS before':>12}{'RSS after':>11}"
          f"{'peak RSS':>10}{'bytes/msg':>11}")
    for name, r in (("cold page cache", cold), ("warm page cache", warm)):
        per_msg = (r["peak_rss_mb"] - r["rss_before_mb"]) * 2**20 / max(1, r["live_messages"])
        print(f"{name:<22}{r['replay_seconds']:>10.2f}{r['replay_cpu_seconds']:>8.2f}{r['live_messages']:>12,}"
              f"{r['rss_before_mb']:>9.0f} MB{r['rss_after_mb']:>8.0f} MB{r['peak_rss_mb']:>7.0f} MB{per_msg:>11,.0f}")
        ok &= r["live_messages"] == args.messages
    print()
    scale = 1_000_000 / args.messages
    worst_rss = max(cold["peak_rss_mb"], warm["peak_rss_mb"])
    worst_replay = max(cold["replay_seconds"], warm["replay_seconds"])
    note = "" if args.messages == 1_000_000 else f" (scaled linearly from {args.messages:,})"
    rss_1m = cold["rss_before_mb"] + (worst_rss - cold["rss_before_mb"]) * scale
    print(f"target: 1,000,000 messages under 600 MB peak RSS: {rss_1m:,.0f} MB{note} -> "
          f"{'met' if rss_1m < 600 else 'NOT met'}")
    print(f"target: replay under 15 s: {worst_replay * scale:.1f} s{note} -> "
          f"{'met' if worst_replay * scale < 15 else 'NOT met'}")
    if not ok:
        print("ERROR: the engine did not find every message written", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Durable messages/s through the HTTP API (POST /emails/batch and POST /emails).

Usage:
  python bench/http_inject.py [--clients 8] [--batch-size 100] [--batch-messages 20000]
                              [--single-messages 5000] [--seconds 60] [--fsync batch]
                              [--smtp] [--processes 2] [--drain-seconds 120] [--timeout 400]

Starts a ``sender sink`` on 127.0.0.1 and ``sender run`` with a temporary spool (``--fsync``
policy) and ``daemon.processes = --processes`` (one engine per core by default), the HTTP API
on a free port, the SMTP listener off (``--smtp``: on a free port), one
route ``*`` to the sink, one customer with one API key, STARTTLS never. Then two phases, each
with ``--clients`` concurrent keep-alive HTTP/1.1 connections (raw sockets on asyncio, requests
encoded before the clock starts, so the client stays light):

  1. batch:  POST /emails/batch, ``--batch-size`` emails per request, up to ``--batch-messages``;
  2. single: POST /emails, one email per request, up to ``--single-messages``.

Each phase stops at its count or after ``--seconds``. A 200 from the API means the message is
durable in the spool, so accepted msgs/s is counted from 200s (every response must be 200 with
one id per email, ids unique). After each phase the script waits (at most ``--drain-seconds``)
until the sink has received every accepted message, so the next phase does not share the CPU
with the previous one's deliveries.

Printed per phase: accepted msgs/s, request latency p50/p99, daemon CPU seconds per 10,000
messages (during the accept window, and accept + delivery up to the drain), the daemon's peak
RSS, the client's own CPU, and at the end the target line for the batch rate.

Exit status: 0 when the target holds and every check passed, 1 otherwise, 3 on the global
timeout. Everything started is stopped by PID in ``finally``; the temporary directory is removed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

from procs import (
    REPO, BenchError, CLEANUP, stop_process, spawn, Deadline, GlobalTimeout, arm_timeout,
    disarm_timeout, child_env, read_line_until, proc_cpu_seconds, proc_peak_rss_mb, free_port
)

TARGET = 5000.0          # msgs/s through /emails/batch
API_KEY = "re_bench_0123456789abcdef"
CUSTOMER = "bench"
DOMAINS = ("example.com", "mail.example.org", "inbox.example.net", "corp.example.io", "post.example.de")

TEXT = (
    "Hello {name},\n\n"
    "Thanks for your order #{n}. We have received your payment and your items are being\n"
    "prepared for shipping. You will get another email with the tracking number as soon as\n"
    "the parcel leaves our warehouse, usually within one or two business days.\n\n"
    "Order summary:\n"
    "  1 x Ceramic mug, blue ............................ 12.00 EUR\n"
    "  2 x Notebook A5, dotted .......................... 9.50 EUR\n"
    "  Shipping ......................................... 4.90 EUR\n"
    "  Total ........................................... 35.90 EUR\n\n"
    "If anything about this order looks wrong, reply to this email or visit your account page\n"
    "at https://shop.example.com/account/orders/{n} and we will sort it out.\n\n"
    "Kind regards,\n"
    "The Example Shop team\n\n"
    "You receive this email because you placed an order at shop.example.com.\n"
)


def email(n: int) -> dict:
    name = f"user{n}"
    return {"from": "Example Shop <orders@shop.example.com>",
            "to": [f"{name}@{DOMAINS[n % len(DOMAINS)]}"],
            "subject": f"Your order #{n} is confirmed",
            "text": TEXT.format(name=name, n=n)}


def request_bytes(port: int, path: str, body: bytes) -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


# ---------------------------------------------------------------------------- client

async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = None
    for ln in lines[1:]:
        k, _, v = ln.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
        elif k.strip().lower() == b"transfer-encoding" and b"chunked" in v.lower():
            raise BenchError("chunked response: not expected from the API")
    if length is None:
        raise BenchError(f"response without Content-Length: {head[:200]!r}")
    return status, await reader.readexactly(length)


async def run_clients(port: int, requests: list[tuple[bytes, int]], clients: int, seconds: float) -> dict:
    """Send ``requests`` (bytes, emails in it) over ``clients`` keep-alive connections until
    all are answered or ``seconds`` have passed; every answer must be 200 with one id per email."""
    queue = iter(enumerate(requests))
    latencies: list[float] = []
    ids: set[str] = set()
    errors: list[str] = []
    sent = {"requests": 0, "emails": 0}
    t0 = time.monotonic()
    end = t0 + seconds

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.monotonic() < end and not errors:
                item = next(queue, None)
                if item is None:
                    return
                _i, (data, n) = item
                t = time.perf_counter()
                writer.write(data)
                status, body = await asyncio.wait_for(read_response(reader), max(0.1, end - time.monotonic() + 30))
                latencies.append(time.perf_counter() - t)
                if status != 200:
                    errors.append(f"HTTP {status}: {body[:300]!r}")
                    return
                got = json.loads(body)
                got_ids = [d["id"] for d in got["data"]] if "data" in got else [got["id"]]
                if len(got_ids) != n:
                    errors.append(f"{len(got_ids)} ids for {n} emails")
                    return
                ids.update(got_ids)
                sent["requests"] += 1
                sent["emails"] += n
        finally:
            writer.close()

    cpu0 = time.process_time()
    results = await asyncio.gather(*(client() for _ in range(clients)), return_exceptions=True)
    elapsed = time.monotonic() - t0
    for r in results:
        if isinstance(r, BaseException):
            errors.append(f"{type(r).__name__}: {r}")
    return {"seconds": elapsed, "latencies": sorted(latencies), "ids": ids, "errors": errors,
            "client_cpu": time.process_time() - cpu0, **sent}


def pct(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(p / 100 * len(sorted_values)))]


# ---------------------------------------------------------------------------- processes

def sink_count(log: str) -> int:
    try:
        with open(log, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def wait_sink(log: str, want: int, seconds: float, deadline: Deadline) -> tuple[int, float]:
    t0 = time.monotonic()
    end = t0 + min(seconds, deadline.left())
    n = sink_count(log)
    while n < want and time.monotonic() < end:
        time.sleep(0.1)
        n = sink_count(log)
    return n, time.monotonic() - t0


def write_config(path: str, spool: str, http_port: int, sink_port: int, args) -> None:
    smtp = f"127.0.0.1:{free_port()}" if args.smtp else ""
    with open(path, "w") as f:
        f.write(f'[spool]\npath = "{spool}"\nfsync = "{args.fsync}"\n\n'
                f'[listen]\nsmtp = "{smtp}"\nhttp = "127.0.0.1:{http_port}"\n\n'
                f'[delivery]\nstarttls = "never"\n\n[daemon]\nprocesses = {args.processes}\n\n'
                f'[[route]]\nmatch = "*"\nrelay = "127.0.0.1:{sink_port}"\n\n'
                f'[[customer]]\nid = "{CUSTOMER}"\napi_keys = ["{API_KEY}"]\n')


def phase(name: str, args, port: int, daemon, sink_log: str, base: int, deadline: Deadline) -> dict:
    """One measured phase; ``base`` is the sink count before it."""
    if name == "batch":
        total, per = args.batch_messages, args.batch_size
        path = "/emails/batch"
    else:
        total, per = args.single_messages, 1
        path = "/emails"
    offset = base + 1_000_000 * (name == "single")
    requests = []
    for start in range(0, total, per):
        n = min(per, total - start)
        payload = [email(offset + start + k) for k in range(n)] if name == "batch" else email(offset + start)
        requests.append((request_bytes(port, path, json.dumps(payload).encode()), n))
    print(f"http_inject: {name}: {len(requests):,} requests, {total:,} emails, {args.clients} clients ...",
          file=sys.stderr, flush=True)
    cpu0 = proc_cpu_seconds(daemon.pid)
    res = asyncio.run(asyncio.wait_for(run_clients(port, requests, args.clients, min(args.seconds, deadline.left())),
                                       min(args.seconds, deadline.left()) + 45))
    res["cpu_accept"] = proc_cpu_seconds(daemon.pid) - cpu0
    if daemon.poll() is not None:
        raise BenchError(f"sender run exited {daemon.returncode} during the {name} phase")
    res["delivered"], res["drain_wait"] = wait_sink(sink_log, base + len(res["ids"]), args.drain_seconds, deadline)
    res["delivered"] -= base
    res["cpu_total"] = proc_cpu_seconds(daemon.pid) - cpu0
    res["rss_mb"] = proc_peak_rss_mb(daemon.pid)
    res["per"] = per
    return res


def report(name: str, res: dict) -> tuple[list[str], float]:
    n = len(res["ids"])
    rate = n / res["seconds"] if res["seconds"] else 0.0
    lat = res["latencies"]
    per10k = lambda cpu: cpu / n * 10_000 if n else float("nan")  # noqa: E731
    lines = [
        f"{name}: {res['requests']:,} requests of {res['per']} email(s), {n:,} unique ids accepted in "
        f"{res['seconds']:.2f} s: {rate:,.0f} msgs/s ({res['requests'] / res['seconds']:,.0f} requests/s)",
        f"  request latency p50 {pct(lat, 50) * 1000:.1f} ms, p99 {pct(lat, 99) * 1000:.1f} ms",
        f"  daemon CPU per 10,000 msgs: {per10k(res['cpu_accept']):.2f} s during the accept window "
        f"({res['cpu_accept'] / res['seconds']:.0%} of one CPU), {per10k(res['cpu_total']):.2f} s accept + "
        f"delivery; peak RSS so far {res['rss_mb']:.0f} MB",
        f"  client CPU {res['client_cpu']:.2f} s ({res['client_cpu'] / res['seconds']:.0%} of one CPU; "
        f"one asyncio process, raw HTTP/1.1 keep-alive)",
        f"  sink received {res['delivered']:,} of {n:,} (waited {res['drain_wait']:.1f} s after the last answer)",
    ]
    for e in res["errors"][:3]:
        lines.append(f"  ERROR {e}")
    return lines, rate


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8, help="concurrent HTTP connections")
    p.add_argument("--batch-size", type=int, default=100, help="emails per /emails/batch request (1..100)")
    p.add_argument("--batch-messages", type=int, default=20_000)
    p.add_argument("--single-messages", type=int, default=5_000)
    p.add_argument("--seconds", type=float, default=60.0, help="time limit of each phase's sending")
    p.add_argument("--drain-seconds", type=float, default=120.0, help="wait at most this for the sink")
    p.add_argument("--fsync", choices=("always", "batch", "never"), default="batch")
    p.add_argument("--smtp", action="store_true", help="also run the SMTP listener on a free port")
    p.add_argument("--processes", type=int, default=2, help="daemon.processes (one engine per core)")
    p.add_argument("--timeout", type=float, default=400.0, help="global limit in seconds")
    a = p.parse_args(argv)
    if not 1 <= a.batch_size <= 100:
        p.error("--batch-size must be 1..100")
    if min(a.clients, a.batch_messages, a.single_messages, a.seconds, a.drain_seconds, a.timeout) <= 0:
        p.error("counts and times must be positive")
    return a


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    cmdline = shlex.join(["python", os.path.relpath(__file__, REPO), *argv])
    timer = arm_timeout(args.timeout)
    deadline = Deadline(args.timeout)
    results: dict = {}
    failure = None
    timed_out = False
    stop_line = ""
    try:
        workdir = tempfile.mkdtemp(prefix="sender-bench-http-")
        CLEANUP.add(lambda: shutil.rmtree(workdir, ignore_errors=True))
        sink_log = os.path.join(workdir, "sink.jsonl")
        sink = spawn([sys.executable, "-m", "sender", "sink", "--listen", "127.0.0.1:0", "--log", sink_log],
                     cwd=REPO, env=child_env(), stdout=subprocess.PIPE, text=True)
        sink_port = int(read_line_until(sink, "sink: listening on", deadline, "sender sink").rsplit(":", 1)[1])
        config = os.path.join(workdir, "sender.toml")
        write_config(config, os.path.join(workdir, "spool"), free_port(), sink_port, args)
        stderr_path = os.path.join(workdir, "sender.stderr")
        with open(stderr_path, "w") as stderr:
            daemon = spawn([sys.executable, "-m", "sender", "run", "--config", config, "--grace", "5"],
                           cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=stderr, text=True)
        try:
            line = read_line_until(daemon, "(HTTP", deadline, "sender run")
            port = int(re.search(r":(\d+) \(HTTP", line).group(1))
            base = 0
            for name in ("batch", "single"):
                try:
                    results[name] = phase(name, args, port, daemon, sink_log, base, deadline)
                except (BenchError, OSError, asyncio.TimeoutError) as e:
                    failure = f"{name}: {type(e).__name__}: {e}"
                    break
                base += results[name]["delivered"]
        finally:
            stop_process(daemon, wait=30)
            daemon.reader.join(2)
            stop_line = "\n        ".join(ln for ln in daemon.lines if "stopped;" in ln) or \
                f"(no stop line; exit status {daemon.returncode})"
            if daemon.returncode not in (0, None) and not failure:
                failure = f"sender run exited {daemon.returncode}; stderr: " + \
                          open(stderr_path, errors="replace").read()[-500:]
    except GlobalTimeout:
        timed_out = True
    except BenchError as e:
        failure = str(e)
    finally:
        disarm_timeout(timer)
        CLEANUP.run()

    print()
    print(f"command: {cmdline}")
    print(f"setup:   {os.cpu_count()} CPUs, Python {sys.version.split()[0]}; daemon.processes {args.processes}, spool fsync = \"{args.fsync}\", "
          f"SMTP listener {'on' if args.smtp else 'off'}, STARTTLS never, route * -> one sender sink; "
          f"{args.clients} HTTP clients; emails of one recipient at {len(DOMAINS)} domains, ~1 KB text")
    ok = not failure and not timed_out
    batch_rate = None
    for name in ("batch", "single"):
        if name in results:
            print()
            lines, rate = report(name, results[name])
            print("\n".join(lines))
            r = results[name]
            ok &= not r["errors"] and r["delivered"] >= len(r["ids"])
            if name == "batch":
                batch_rate = rate
                ok &= len(r["ids"]) == args.batch_messages
    print()
    print(stop_line)
    if failure:
        print(f"FAILED: {failure}")
    if timed_out:
        print(f"http_inject: global timeout of {args.timeout:g} s reached; stopped everything it started")
    passed = batch_rate is not None and batch_rate >= TARGET
    print(f"target: at least {TARGET:,.0f} msgs/s through batch on this {os.cpu_count()}-core machine: "
          f"{'PASS' if passed else 'FAIL'}" + (f" ({batch_rate:,.0f} msgs/s)" if batch_rate is not None else ""))
    if timed_out:
        return 3
    return 0 if ok and passed else 1


if __name__ == "__main__":
    sys.exit(main())

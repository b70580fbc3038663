"""Traffic shaping in real time: a provider limit and a customer limit hold, unthrottled mail runs free.

Usage:
  python bench/shaping.py [--seconds 60] [--baseline-seconds 20] [--quick] [--size 2048]
                          [--fsync batch] [--processes 1] [--timeout SECONDS]

Acceptance: against sinks that accept everything, a provider limited to 100 msg/s and a
customer limited to 50 msg/s stay within 5% of their limits, while traffic to an unthrottled
provider runs at full speed.

Three ``sender sink`` processes on one port, at 127.0.0.11, 127.0.0.12 and 127.0.0.13, stand
for the MX hosts of three mailbox providers; ``[[route]]`` blocks send each provider's
recipient domains (4 per provider) to its address, so no DNS is involved. The daemon runs with

  [shaping.provider.slowmail]  match = ["127.0.0.11"]  provider_max_message_rate = "100/s"
  [shaping.customer.acme]      max_message_rate = "50/s"

and one injector process (a pipelining trio SMTP client, raw SMTP over trio sockets) sends
three streams at once, each message naming its customer with ``X-Sender-Customer``:

  1. customer "bulk" (unlimited) -> slowmail (127.0.0.11):  paced at 1.5x the provider limit;
  2. customer "acme" (50/s)      -> fastmail (127.0.0.12):  paced at 1.5x the customer limit;
  3. customer "bulk"             -> othermail (127.0.0.13): as fast as its connections go.

Streams 1 and 2 are injected faster than their limits let mail out, so their queues grow for
the whole run (the report shows the smallest backlog seen) and what the sinks receive is set
by the limit alone. Stream 3 is measured twice: first alone, with no shaping config at all,
for ``--baseline-seconds``; then alongside the throttled streams for ``--seconds``. The ratio
of its two rates is the "full speed" figure.

Figures come from the sinks' JSON logs (one line per accepted message, with its arrival
time): msgs/s per provider and per customer over a steady window, from 5 s after the first
delivery to the end of the sending window (the first seconds hold the buckets' initial burst
and the connection set-up; after the sending window the queues drain, which is not
steady state); the most delivered in any 1 s window (sliding); the lowest and highest
whole-second counts; the error against each limit in percent; each stream's backlog (accepted
by the daemon, not yet at its sink). Also the daemon's CPU seconds (utime+stime from
/proc/PID/stat over the phase) and peak RSS (VmHWM), read before it is stopped, and the CPU
seconds of the injector, the sinks and every other process on the machine (/proc/stat), which
share the same cores: stream 3's rate is bounded by CPU, not by shaping.

Exit status: 0 when both limits hold within 5%, 1 when one does not or a phase failed, 3 on
the global timeout (``--timeout``). Everything started is stopped by PID in ``finally``
blocks; temporary directories are removed. All traffic stays on 127.0.0.0/8.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from procs import (
    REPO, BenchError, CLEANUP, stop_process, spawn, Deadline, GlobalTimeout, arm_timeout,
    disarm_timeout, child_env, read_line_until, proc_cpu_seconds, proc_peak_rss_mb
)

PROVIDER_LIMIT = 100.0      # msg/s, slowmail as a whole
CUSTOMER_LIMIT = 50.0       # msg/s, customer acme
TOLERANCE = 0.05
DOMAINS_PER_PROVIDER = 4

# provider name -> its "MX" address (one sink each, all on one port)
PROVIDERS = {"slowmail": "127.0.0.11", "fastmail": "127.0.0.12", "othermail": "127.0.0.13"}


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs of the machine spent busy since boot (first line of /proc/stat)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------- streams

def domains(provider: str) -> list[str]:
    return [f"d{k}.{provider}.test" for k in range(DOMAINS_PER_PROVIDER)]


def stream_specs(args, shaped: bool) -> list[dict]:
    """What the injector sends: name, customer, recipient domains, pace (msg/s or None for
    as fast as it goes), connections, and a hard cap on the count."""
    full = {"name": "3", "customer": "bulk", "provider": "othermail", "domains": domains("othermail"),
            "rate": None, "connections": args.connections, "cap": int(20_000 * args.seconds)}
    if not shaped:
        return [full]
    f = args.inject_factor
    return [
        {"name": "1", "customer": "bulk", "provider": "slowmail", "domains": domains("slowmail"),
         "rate": f * PROVIDER_LIMIT, "connections": 8, "cap": int(f * PROVIDER_LIMIT * args.seconds) + 1},
        {"name": "2", "customer": "acme", "provider": "fastmail", "domains": domains("fastmail"),
         "rate": f * CUSTOMER_LIMIT, "connections": 8, "cap": int(f * CUSTOMER_LIMIT * args.seconds) + 1},
        full,
    ]


# ---------------------------------------------------------------------------- injector (child process)

BIN = 0.1   # seconds per bin of the injector's accept-time histogram


def make_message(customer: str, rcpt: str, size: int, i: int) -> bytes:
    head = (f"From: <bench@sender.test>\r\nTo: <{rcpt}>\r\nSubject: shaping {i}\r\n"
            f"Message-ID: <shaping-{i}-{time.time_ns()}@sender.test>\r\n"
            f"X-Sender-Customer: {customer}\r\n\r\n").encode()
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdef\r\n"
    body = (line * (size // len(line) + 1))[:size]
    return head + body.rstrip(b"\r\n") + b"\r\n.\r\n"


def inject_worker(spec_path: str) -> None:
    """Child process: send every stream of the spec at once for ``seconds``, then print JSON:
    per stream the count accepted (250 after the dot), a histogram of accept times in
    ``BIN``-second bins from ``t0`` (wall clock), and the first error if any."""
    import trio

    with open(spec_path) as f:
        spec = json.load(f)
    port, seconds, size = spec["port"], spec["seconds"], spec["size"]
    nbins = int(seconds / BIN) + 2

    class Stream:
        def __init__(self, s: dict) -> None:
            self.__dict__.update(s)
            self.next = 0              # index of the next message to send
            self.sent = 0
            self.bins = [0] * nbins
            self.errors: list[str] = []
            # One message per recipient domain, sent again and again: neither the daemon nor
            # the sink minds a repeated Message-ID, and building none keeps the injector light.
            self.rcpts = [f"user{k}@{d}" for k, d in enumerate(self.domains)]
            self.messages = [make_message(self.customer, r, size, k) for k, r in enumerate(self.rcpts)]
            self.envelopes = [f"MAIL FROM:<bench@sender.test>\r\nRCPT TO:<{r}>\r\nDATA\r\n".encode()
                              for r in self.rcpts]

    streams = [Stream(s) for s in spec["streams"]]

    async def replies(sock, buf: bytearray, n: int) -> list[bytes]:
        """The next ``n`` final reply lines (continuation lines skipped)."""
        out: list[bytes] = []
        while True:
            while (i := buf.find(b"\r\n")) >= 0:
                line = bytes(buf[:i])
                del buf[: i + 2]
                if line[3:4] != b"-":
                    out.append(line)
                    if len(out) == n:
                        return out
            data = await sock.recv(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            buf += data

    async def send_all(sock, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[await sock.send(view):]

    def expect(got: list[bytes], codes: tuple[bytes, ...], what: str) -> None:
        for line, code in zip(got, codes):
            if not line.startswith(code):
                raise ConnectionError(f"{what}: expected {code.decode()}, got {line[:200]!r}")

    async def connection(st: Stream, t0: float, end: float) -> None:
        sock = trio.socket.socket()
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            buf = bytearray()
            with trio.fail_after(30):
                await sock.connect(("127.0.0.1", port))
                expect(await replies(sock, buf, 1), (b"220",), "greeting")
                await send_all(sock, b"EHLO injector.sender.test\r\n")
                expect(await replies(sock, buf, 1), (b"250",), "EHLO")
            while st.next < st.cap:
                i = st.next
                st.next += 1
                if st.rate:
                    due = t0 + i / st.rate      # behind schedule: send at once and catch up
                    if due >= end:
                        break
                    await trio.sleep_until(due)
                elif trio.current_time() >= end:
                    break
                k = i % len(st.rcpts)
                with trio.fail_after(30):
                    await send_all(sock, st.envelopes[k])
                    expect(await replies(sock, buf, 3), (b"250", b"250", b"354"), "MAIL/RCPT/DATA")
                    await send_all(sock, st.messages[k])
                    expect(await replies(sock, buf, 1), (b"250",), "end of data")
                now = trio.current_time()
                st.sent += 1
                st.bins[min(nbins - 1, int((now - t0) / BIN))] += 1
            with trio.move_on_after(2):
                await send_all(sock, b"QUIT\r\n")
                await replies(sock, buf, 1)
        except (OSError, ConnectionError, trio.TooSlowError) as e:
            st.errors.append(f"{type(e).__name__}: {e}")
        finally:
            sock.close()

    async def main() -> float:
        t0 = trio.current_time()
        wall0 = time.time() - (trio.current_time() - t0)
        end = t0 + seconds
        async with trio.open_nursery() as nursery:
            for st in streams:
                for _ in range(st.connections):
                    nursery.start_soon(connection, st, t0, end)
        return wall0

    cpu0 = time.process_time()
    wall0 = trio.run(main)
    print(json.dumps({"t0": wall0, "bin": BIN, "cpu": time.process_time() - cpu0,
                      "streams": {st.name: {"sent": st.sent, "bins": st.bins, "errors": st.errors[:3],
                                            "failed_connections": len(st.errors)} for st in streams}}),
          flush=True)


# ---------------------------------------------------------------------------- one phase

def start_sinks(workdir: str, deadline: Deadline) -> tuple[int, dict[str, tuple[subprocess.Popen, str]]]:
    """One ``sender sink`` per provider address, all on the port the first one picked."""
    sinks: dict[str, tuple[subprocess.Popen, str]] = {}
    port = 0
    for provider, addr in PROVIDERS.items():
        log = os.path.join(workdir, f"sink-{provider}.jsonl")
        proc = spawn([sys.executable, "-m", "sender", "sink", "--listen", f"{addr}:{port}", "--log", log],
                     cwd=REPO, env=child_env(), stdout=subprocess.PIPE, text=True)
        line = read_line_until(proc, "sink: listening on", deadline, f"sender sink on {addr}")
        port = int(line.rsplit(":", 1)[1])
        sinks[provider] = (proc, log)
    return port, sinks


def write_config(path: str, spool: str, sink_port: int, args, shaped: bool) -> None:
    lines = [f'[spool]\npath = "{spool}"\nfsync = "{args.fsync}"\n',
             '[listen]\nsmtp = "127.0.0.1:0"\n',
             '[delivery]\nstarttls = "never"\n',
             f'[daemon]\nprocesses = {args.processes}\n']
    for provider, addr in PROVIDERS.items():
        lines.append(f'[[route]]\nmatch = ".{provider}.test"\nrelay = "{addr}:{sink_port}"\n')
    if shaped:
        lines.append(f'[shaping.provider.slowmail]\nmatch = ["{PROVIDERS["slowmail"]}"]\n'
                     f'provider_max_message_rate = "{PROVIDER_LIMIT:g}/s"\n')
        lines.append(f'[shaping.customer.acme]\nmax_message_rate = "{CUSTOMER_LIMIT:g}/s"\n')
    with open(path, "w") as f:
        f.write("\n".join(lines))


def read_arrivals(log: str) -> list[float]:
    """Sorted arrival times ("at") of every message in a sink's JSON log."""
    times = []
    try:
        with open(log, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):      # still being written
                    break
                times.append(json.loads(line)["at"])
    except FileNotFoundError:
        pass
    times.sort()
    return times


def crash_summary(stderr_path: str) -> str:
    """Each distinct exception line of a daemon's stderr, with the innermost sender frame above it."""
    try:
        text = Path(stderr_path).read_text(errors="replace")
    except OSError:
        return "no stderr"
    lines = [ln.strip(" |+-") for ln in text.splitlines()]
    found: dict[str, str] = {}
    for i, ln in enumerate(lines):
        if re.match(r"\w+(Error|Exception)\b.*: ", ln) and ln not in found:
            frame = next((f for f in reversed(lines[:i]) if f.startswith('File "') and "/sender/" in f), "")
            m = re.search(r'/(sender/[^"]+)", line (\d+), in (\w+)', frame)
            found[ln] = f" (in {m.group(1)}:{m.group(2)} {m.group(3)})" if m else ""
    if not found:
        return f"stderr: {text.strip()[-300:]!r}"
    return "errors: " + "; ".join(f"{ln}{where}" for ln, where in list(found.items())[:3])


def what_reached(sinks: dict, t0: float) -> str:
    parts = []
    for provider, (_, log) in sinks.items():
        times = read_arrivals(log)
        last = f", last at +{times[-1] - t0:.1f} s" if times else ""
        parts.append(f"{provider} {len(times):,}{last}")
    return "delivered: " + ", ".join(parts)


def run_phase(name: str, args, workdir: str, seconds: float, shaped: bool, deadline: Deadline) -> dict:
    """Sinks, daemon and injector for ``seconds`` of sending; returns arrivals per provider,
    the injector's report, and the daemon's CPU, RSS and stop line."""
    workdir = tempfile.mkdtemp(prefix=f"{name}-", dir=workdir)
    sink_port, sinks = start_sinks(workdir, deadline)
    config = os.path.join(workdir, "sender.toml")
    write_config(config, os.path.join(workdir, "spool"), sink_port, args, shaped)
    stderr_path = os.path.join(workdir, "sender.stderr")
    res: dict = {"seconds": seconds}
    with open(stderr_path, "w") as stderr:
        daemon = spawn([sys.executable, "-m", "sender", "run", "--config", config, "--grace", "5"], cwd=REPO,
                       env=child_env(), stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        line = read_line_until(daemon, "listening on", deadline, "sender run")
        port = int(re.search(r":(\d+) ", line).group(1))
        spec_path = os.path.join(workdir, "inject.json")
        with open(spec_path, "w") as f:
            json.dump({"port": port, "seconds": seconds, "size": args.size,
                       "streams": stream_specs(args, shaped)}, f)
        sink_cpu0 = sum(proc_cpu_seconds(p.pid) for p, _ in sinks.values())
        cpu0 = proc_cpu_seconds(daemon.pid)
        busy0 = machine_busy_seconds()
        injector = spawn([sys.executable, __file__, "--inject-worker", spec_path], cwd=REPO, env=child_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = injector.communicate(timeout=min(deadline.left(), seconds + 60))
        except subprocess.TimeoutExpired:
            raise BenchError(f"injector still running {seconds + 60:g} s after it started") from None
        if injector.returncode != 0:
            raise BenchError(f"injector exited {injector.returncode}: {err.strip()[-800:]}")
        res["inject"] = json.loads(out.strip().splitlines()[-1])
        if daemon.poll() is not None:
            raise BenchError(f"sender run died during the sending window (exit status "
                             f"{daemon.returncode}); {what_reached(sinks, res['inject']['t0'])}; "
                             f"{crash_summary(stderr_path)}")
        # Read before stopping: the figures of the sending window, not of the shutdown.
        res["cpu"] = proc_cpu_seconds(daemon.pid) - cpu0
        res["rss_mb"] = proc_peak_rss_mb(daemon.pid)
        res["sink_cpu"] = sum(proc_cpu_seconds(p.pid) for p, _ in sinks.values()) - sink_cpu0
        # Whatever else ran on the machine meanwhile (the injector's start-up is in it too).
        res["other_cpu"] = max(0.0, machine_busy_seconds() - busy0 - res["cpu"] - res["sink_cpu"]
                               - res["inject"]["cpu"])
        res["cpu_at"] = time.time()
    finally:
        t = time.monotonic()
        stop_process(daemon, wait=30)
        res["stop_seconds"] = time.monotonic() - t
        for proc, _ in sinks.values():
            stop_process(proc)
    daemon.reader.join(2)
    stopped = [ln for ln in daemon.lines if "stopped;" in ln]
    totals: dict[str, int] = {}        # one stop line per shard with --processes > 1: add them up
    for ln in stopped:
        for part in ln.split("stopped;", 1)[1].split(","):
            what, n = part.strip().rsplit(" ", 1)
            totals[what] = totals.get(what, 0) + int(n)
    res["stop_line"] = ("sender: stopped; " + ", ".join(f"{what} {n}" for what, n in totals.items()) if stopped
                        else f"(no stop line; exit status {daemon.returncode})")
    if daemon.returncode != 0:
        raise BenchError(f"sender run exited {daemon.returncode} on SIGTERM; {crash_summary(stderr_path)}")
    for provider, (proc, log) in sinks.items():
        if proc.returncode != 0:
            raise BenchError(f"sink for {provider} exited {proc.returncode}")
    res["arrivals"] = {provider: read_arrivals(log) for provider, (_, log) in sinks.items()}
    errors = {f"stream {k}": f"{v['failed_connections']} connections failed, e.g. {v['errors']}"
              for k, v in res["inject"]["streams"].items() if v["errors"]}
    if errors:
        raise BenchError(f"injector errors: {errors}")
    return res


# ---------------------------------------------------------------------------- figures

def window_of(res: dict, warmup: float) -> tuple[float, float]:
    """From ``warmup`` s after the phase's first delivery to the end of the sending window."""
    first = min((a[0] for a in res["arrivals"].values() if a), default=None)
    if first is None:
        raise BenchError("no message reached any sink")
    start, end = first + warmup, res["inject"]["t0"] + res["seconds"]
    if end - start < 2:
        raise BenchError(f"steady window too short ({end - start:.1f} s): raise --seconds")
    return start, end


def count_in(times: list[float], a: float, b: float) -> int:
    return bisect.bisect_left(times, b) - bisect.bisect_left(times, a)


def stats(times: list[float], a: float, b: float) -> dict:
    """Rate over [a, b), the most in any 1 s (sliding) and the lowest/highest whole seconds."""
    inside = times[bisect.bisect_left(times, a): bisect.bisect_left(times, b)]
    n = len(inside)
    peak, j = 0, 0
    for i in range(n):                  # the most arrivals in [t, t + 1) for t an arrival
        while inside[i] - inside[j] >= 1.0:
            j += 1
        peak = max(peak, i - j + 1)
    seconds = [count_in(inside, a + k, a + k + 1) for k in range(int(b - a))]
    return {"n": n, "rate": n / (b - a), "peak1s": peak,
            "min_s": min(seconds, default=0), "max_s": max(seconds, default=0)}


def backlog(res: dict, stream: str, provider: str, a: float, b: float) -> tuple[int, int]:
    """The fewest and the most messages of ``stream`` accepted by the daemon but not yet at
    the sink, sampled every 0.1 s of [a, b). For a throttled stream, a low above zero means
    its queue never ran dry; for the unthrottled one, a high of a few dozen means its mail
    never waited in the queue (only in flight). The injector notes a message when it has read
    the 250, so one may reach the sink a moment earlier: small negatives are that."""
    inj = res["inject"]
    t0, width, bins = inj["t0"], inj["bin"], inj["streams"][stream]["bins"]
    arrivals = res["arrivals"][provider]
    seen, accepted = [], 0
    for k, c in enumerate(bins):
        accepted += c
        t = t0 + (k + 1) * width
        if a <= t < b:
            seen.append(accepted - bisect.bisect_right(arrivals, t))
    return (min(seen), max(seen)) if seen else (0, 0)


def fmt_stats(s: dict, a: float, b: float) -> str:
    return (f"{s['rate']:8.2f} msgs/s  ({s['n']:,} in {b - a:.1f} s; most in any 1 s: {s['peak1s']}; "
            f"whole seconds {s['min_s']}..{s['max_s']})")


def handled(res: dict, streams: tuple[str, ...] | None = None) -> float:
    """Messages the daemon handled while its CPU was measured: the mean of accepted and
    delivered (each message is both), for some streams or all."""
    sent = res["inject"]["streams"]
    names = streams or tuple(sent)
    by_stream = {"1": "slowmail", "2": "fastmail", "3": "othermail"}
    accepted = sum(sent[k]["sent"] for k in names)
    delivered = sum(count_in(res["arrivals"][by_stream[k]], 0.0, res["cpu_at"]) for k in names)
    return (accepted + delivered) / 2


def cpu_line(res: dict) -> str:
    seconds, cpu = res["seconds"], res["cpu"]
    return (f"daemon CPU {cpu:.1f} s ({cpu / seconds:.0%} of one CPU; {cpu / handled(res) * 1e6:.0f} µs per message "
            f"accepted and delivered), peak RSS {res['rss_mb']:.0f} MB\n"
            f"  other CPU: injector {res['inject']['cpu']:.1f} s, sinks {res['sink_cpu']:.1f} s, other processes on "
            f"the machine {res['other_cpu']:.1f} s (of {os.cpu_count()} CPUs x {seconds:g} s)")


def report(args, cmdline: str, base: dict | None, shaped: dict | None, errors: dict) -> bool:
    """Print the figures; returns whether both limits held."""
    print()
    print(f"command: {cmdline}")
    print(f"setup:   {os.cpu_count()} CPUs, Python {sys.version.split()[0]}; daemon.processes {args.processes}, "
          f"spool fsync = \"{args.fsync}\", delivery connection_limit 20 per site (default), STARTTLS off; "
          f"3 sender sinks on 127.0.0.11/.12/.13; {args.size}-byte bodies; injector: one trio process, "
          f"streams 1 and 2 paced at {args.inject_factor:g}x their limit over 8 connections each, stream 3 "
          f"unpaced over {args.connections} connections")
    for name, res in (("alone", base), ("shaped", shaped)):
        try:
            if res:
                window_of(res, args.warmup)
        except BenchError as e:
            errors[name] = str(e)
    base = base if "alone" not in errors else None
    shaped = shaped if "shaped" not in errors else None
    lines: list[str] = []
    s3_alone = None
    held = True
    if base:
        a, b = window_of(base, args.warmup)
        s3_alone = stats(base["arrivals"]["othermail"], a, b)
        inj = base["inject"]
        print()
        print(f"phase 1: stream 3 alone, no shaping config, {base['seconds']:g} s of sending")
        print(f"  window: {a - inj['t0']:.1f}..{b - inj['t0']:.1f} s after injection start "
              f"({args.warmup:g} s after the first delivery to the end of sending)")
        print(f"  stream 3 bulk -> othermail   {fmt_stats(s3_alone, a, b)}")
        print(f"  injected {inj['streams']['3']['sent']:,}; backlog (accepted, not yet delivered) in the window "
              f"at most {backlog(base, '3', 'othermail', a, b)[1]:,}")
        print(f"  {cpu_line(base)}")
        print(f"  {base['stop_line']} (stopped in {base['stop_seconds']:.1f} s)")
    if shaped:
        a, b = window_of(shaped, args.warmup)
        inj, arr = shaped["inject"], shaped["arrivals"]
        s1, s2, s3 = (stats(arr[p], a, b) for p in ("slowmail", "fastmail", "othermail"))
        print()
        print(f"phase 2: all three streams, shaping on, {shaped['seconds']:g} s of sending")
        print(f"  window: {a - inj['t0']:.1f}..{b - inj['t0']:.1f} s after injection start "
              f"({args.warmup:g} s after the first delivery to the end of sending)")
        print("  per provider (sink):")
        print(f"    slowmail  127.0.0.11 limit {PROVIDER_LIMIT:g}/s  {fmt_stats(s1, a, b)}")
        print(f"    fastmail  127.0.0.12 no limit   {fmt_stats(s2, a, b)}")
        print(f"    othermail 127.0.0.13 no limit   {fmt_stats(s3, a, b)}")
        print("  per customer:")
        print(f"    acme      limit {CUSTOMER_LIMIT:g}/s          {fmt_stats(s2, a, b)}")
        bulk = sorted(arr["slowmail"] + arr["othermail"])
        print(f"    bulk      no limit            {fmt_stats(stats(bulk, a, b), a, b)}")
        sent = {k: v["sent"] for k, v in inj["streams"].items()}
        print(f"  injected: stream 1 {sent['1']:,}, stream 2 {sent['2']:,}, stream 3 {sent['3']:,}")
        low1, low2 = backlog(shaped, "1", "slowmail", a, b)[0], backlog(shaped, "2", "fastmail", a, b)[0]
        high3 = backlog(shaped, "3", "othermail", a, b)[1]
        print(f"  backlog (accepted, not yet delivered) in the window: stream 1 never below {low1:,}, stream 2 "
              f"never below {low2:,}, stream 3 at most {high3:,}")
        print(f"  {cpu_line(shaped)}")
        print(f"  {shaped['stop_line']} (stopped in {shaped['stop_seconds']:.1f} s)")
        for what, st, limit in (("provider slowmail", s1, PROVIDER_LIMIT), ("customer acme", s2, CUSTOMER_LIMIT)):
            err = (st["rate"] - limit) / limit
            passed = abs(err) <= TOLERANCE
            held &= passed
            lines.append(f"{'PASS' if passed else 'FAIL'}  {what} within {TOLERANCE:.0%} of {limit:g}/s: "
                         f"{st['rate']:.2f} msgs/s, error {err:+.2%}; most in any 1 s {st['peak1s']} (the bucket "
                         f"allows {limit:g} + burst {limit / 10:g})")
        if s3_alone:
            lines.append(f"INFO  stream 3 (unthrottled) with shaping / alone: {s3['rate'] / s3_alone['rate']:.2f}x "
                         f"({s3['rate']:.0f} vs {s3_alone['rate']:.0f} msgs/s)")
            throttled = 1 - handled(shaped, ("3",)) / handled(shaped)
            share = {k: (r["cpu"] / r["seconds"], r["other_cpu"] / r["seconds"], r["cpu"] / handled(r) * 1e6)
                     for k, r in (("alone", base), ("with", shaped))}
            lines += [
                f"      stream 3 never waited in the queue (at most {high3:,} accepted and not yet delivered, i.e. "
                f"in flight):",
                "      shaping did not hold it back; its rate is how fast the daemon gets through its mail on shared "
                "CPUs.",
                f"      The daemon had {share['alone'][0]:.2f} of a CPU alone and {share['with'][0]:.2f} alongside "
                f"(the {os.cpu_count()} CPUs also ran the injector, the sinks",
                f"      and {share['alone'][1]:.2f} and {share['with'][1]:.2f} CPU of other processes); it spent "
                f"{share['alone'][2]:.0f} and {share['with'][2]:.0f} µs per message; and alongside,",
                f"      {throttled:.0%} of the messages it handled were the throttled streams' (accepted at "
                f"{args.inject_factor:g}x their limits).",
            ]
    for name, err in errors.items():
        print(f"\n{name}: FAILED: {err}")
    if lines:
        print()
        print("\n".join(lines))
    return bool(shaped) and held and not errors


# ---------------------------------------------------------------------------- main

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="sending time of the shaped run")
    p.add_argument("--baseline-seconds", type=float, default=None,
                   help="sending time of stream 3 alone (default 20, 10 with --quick)")
    p.add_argument("--quick", action="store_true", help="a fast check: --seconds 15 --baseline-seconds 10")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds after the first delivery left out")
    p.add_argument("--size", type=int, default=2048, help="message body bytes")
    p.add_argument("--connections", type=int, default=16, help="injection connections of stream 3")
    p.add_argument("--inject-factor", type=float, default=1.5,
                   help="streams 1 and 2 are injected at this multiple of their limit")
    p.add_argument("--fsync", choices=("always", "batch", "never"), default="batch")
    p.add_argument("--processes", type=int, default=1, help="sender's daemon.processes")
    p.add_argument("--timeout", type=float, default=None,
                   help="global limit in seconds (default: both sending times plus 90)")
    p.add_argument("--inject-worker", metavar="SPEC", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.seconds = 15.0
    if a.baseline_seconds is None:
        a.baseline_seconds = 10.0 if a.quick else 20.0
    if a.timeout is None:
        a.timeout = a.seconds + a.baseline_seconds + 90
    if min(a.seconds, a.baseline_seconds, a.size, a.connections, a.timeout, a.processes) <= 0 or a.warmup < 0:
        p.error("--seconds, --baseline-seconds, --size, --connections, --processes and --timeout must be positive")
    if a.inject_factor <= 1:
        p.error("--inject-factor must be above 1, or the limits are never reached")
    return a


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.inject_worker:
        inject_worker(args.inject_worker)
        return 0
    cmdline = shlex.join([os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable,
                          os.path.relpath(__file__), *argv])
    timer = arm_timeout(args.timeout)
    deadline = Deadline(args.timeout)
    results: dict = {}
    errors: dict = {}
    timed_out = False
    try:
        workdir = tempfile.mkdtemp(prefix="sender-bench-shaping-")
        CLEANUP.add(lambda: shutil.rmtree(workdir, ignore_errors=True))
        for name, seconds, shaped in (("alone", args.baseline_seconds, False), ("shaped", args.seconds, True)):
            print(f"shaping: {name}: {seconds:g} s of sending ...", file=sys.stderr, flush=True)
            try:
                results[name] = run_phase(name, args, workdir, seconds, shaped, deadline)
            except BenchError as e:
                errors[name] = str(e)
    except GlobalTimeout:
        timed_out = True
    finally:
        disarm_timeout(timer)
        CLEANUP.run()
    ok = report(args, cmdline, results.get("alone"), results.get("shaped"), errors)
    if not ok:
        print("\nFAIL  the acceptance was not shown" + ("" if "shaped" in results else ": the shaped phase did not complete"))
    if timed_out:
        print(f"shaping: global timeout of {args.timeout:g} s reached; stopped everything it started",
              file=sys.stderr)
        return 3
    return 0 if ok and "shaped" in results else 1


if __name__ == "__main__":
    sys.exit(main())

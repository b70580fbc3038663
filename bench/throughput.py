"""End-to-end throughput of ``sender run`` on loopback, optionally against Postfix.

Usage:
  python bench/throughput.py [--messages 20000] [--connections 20] [--size 2048]
                             [--fsync batch] [--processes 2] [--delivery-connections 8]
                             [--vs-postfix [--pairs 3]] [--timeout 600]

Default run: a sink (Postfix's C ``smtp-sink`` when installed, else ``sender sink``), the
daemon (``python -m sender run``) on a temporary spool relaying everything to the sink, and N
messages injected over K SMTP connections (``smtp-source -d -s K`` when installed, else a
Python injector). It reports:

- end-to-end msgs/s: from the first injection to the moment the sink has counted every
  message (smtp-sink's ``-c`` counter, or the sink's JSON log);
- accept latency p50/p99: from writing the end-of-data dot to reading the 250 reply. With
  smtp-source injecting, one extra Python "sampler" connection sends paced messages alongside
  it and is timed (its messages are delivered and counted too); with the Python injector
  every transaction is timed;
- daemon CPU seconds per 10,000 messages (utime+stime from /proc/PID/stat over the run, the
  supervisor and its shard processes added up);
- daemon peak RSS (VmHWM from /proc/PID/status, added up the same way).

The daemon runs with ``daemon.processes = 2`` (one engine per core) and a delivery
connection limit of 8: fewer, busier connections let the client pipeline each message's
body with the next message's envelope.

With ``--vs-postfix``, against the same smtp-sink: smtp-source straight into the sink (the
no-queue ceiling), a private loopback-only Postfix instance relaying the same load, and
aiosmtplib on uvloop sending straight into the sink; then the ratios. ``--pairs N`` runs
sender and Postfix N times, alternating, and adds the median of the N ratios: this machine's
speed drifts by ±15% within minutes, so single runs of either side are not comparable.

Everything it starts is stopped by PID in ``finally`` blocks, or by the global timeout, which
also makes the script exit non-zero. All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from procs import (
    REPO, BenchError, CLEANUP, stop_process, spawn, Deadline, GlobalTimeout, arm_timeout,
    disarm_timeout, child_env, read_line_until, proc_cpu_seconds, proc_peak_rss_mb, free_port
)
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])
SENDER_ADDR, RCPT_ADDR = "a@x.test", "b@y.test"


def wait_listening(port: int, deadline: Deadline, what: str, proc: subprocess.Popen | None = None) -> None:
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what} exited with status {proc.returncode} before listening")
        deadline.check(f"{what} to listen on port {port}")
        time.sleep(0.05)


# ---------------------------------------------------------------------------- postfix tools

PYTHON_ONLY = False   # --python-only: sender's sink and the Python injector stand in


def tool(name: str) -> str | None:
    if PYTHON_ONLY and name in ("smtp-source", "smtp-sink"):
        return None
    return shutil.which(name, path=SBIN_PATH)


def have_postfix_tools() -> bool:
    return all(tool(t) for t in ("smtp-source", "smtp-sink", "postfix"))


def install_postfix() -> bool:
    """apt-get install postfix with "No configuration", so no system instance is set up or
    started. Returns whether the tools are there afterwards."""
    if have_postfix_tools():
        return True
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        print("postfix tools missing and cannot install them (needs root and apt-get)", file=sys.stderr)
        return False
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    print("installing postfix (for smtp-source / smtp-sink) ...", file=sys.stderr, flush=True)
    subprocess.run(["debconf-set-selections"], input=b"postfix postfix/main_mailer_type select No configuration\n",
                   env=env, timeout=60, check=False)
    install = ["apt-get", "install", "-y", "-q", "postfix"]
    if subprocess.run(install, env=env, timeout=600, stdout=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, timeout=600, stdout=subprocess.DEVNULL)
        subprocess.run(install, env=env, timeout=600, stdout=subprocess.DEVNULL)
    return have_postfix_tools()


def postfix_version() -> str:
    try:
        out = subprocess.run([tool("postconf") or "postconf", "-dh", "mail_version"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        return f"Postfix {out}" if out else "Postfix"
    except (OSError, subprocess.TimeoutExpired):
        return "Postfix"


# ---------------------------------------------------------------------------- sinks

class SmtpSink:
    """Postfix's smtp-sink with its running counter (``-c``) parsed from stdout.

    ``-c`` rewrites "sess=.. quit=.. mesg=N" after every message, so the time at which the
    count last rose is the arrival time of the last message."""

    name = "smtp-sink"

    def __init__(self, deadline: Deadline) -> None:
        self.port = free_port()
        cmd = [tool("smtp-sink"), "-c"]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]          # smtp-sink refuses to run as root without it
        cmd += [f"127.0.0.1:{self.port}", "1024"]
        self.proc = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.count = 0
        self.changed_at = time.time()
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        wait_listening(self.port, deadline, "smtp-sink", self.proc)

    def _read(self) -> None:
        fd = self.proc.stdout.fileno()
        tail = b""
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            now = time.time()
            parts = re.split(rb"[\r\n]", tail + chunk)
            tail = parts.pop()
            counts = [int(m.group(1)) for p in parts if (m := re.search(rb"mesg=(\d+)", p))]
            if counts and max(counts) > self.count:
                with self._cond:
                    self.count, self.changed_at = max(counts), now
                    self._cond.notify_all()
            # Let updates pile up in the pipe: one read per few ms instead of one per message
            # keeps this reader's CPU out of the figures (arrival times are late by <= 5 ms).
            time.sleep(0.005)

    def wait_for(self, target: int, deadline: Deadline, what: str) -> float:
        """Block until ``target`` messages arrived; returns the arrival time of the last one."""
        with self._cond:
            while self.count < target:
                if self.proc.poll() is not None:
                    raise BenchError(f"smtp-sink exited while waiting for {what}")
                deadline.check(f"{what}: sink has {self.count} of {target} messages")
                self._cond.wait(min(0.5, deadline.left()))
            return self.changed_at


class SenderSink:
    """``sender sink --log FILE``: counts the JSON lines it writes (flushed every 0.2 s) and
    takes the last message's own "at" time as its arrival time."""

    name = "sender sink"

    def __init__(self, deadline: Deadline, workdir: str) -> None:
        self.log = os.path.join(workdir, "sink.jsonl")
        self.proc = spawn([sys.executable, "-m", "sender", "sink", "--listen", "127.0.0.1:0", "--log", self.log],
                          cwd=REPO, env=child_env(), stdout=subprocess.PIPE, text=True)
        line = read_line_until(self.proc, "sink: listening on", deadline, "sender sink")
        self.port = int(line.rsplit(":", 1)[1])
        self.count = 0
        self._last_at = time.time()
        self._offset = 0
        self._partial = b""

    def _poll(self) -> None:
        try:
            with open(self.log, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if lines:
            self.count += len(lines)
            self._last_at = max(self._last_at, json.loads(lines[-1])["at"])

    def wait_for(self, target: int, deadline: Deadline, what: str) -> float:
        while True:
            self._poll()
            if self.count >= target:
                return self._last_at
            if self.proc.poll() is not None:
                raise BenchError(f"sender sink exited while waiting for {what}")
            deadline.check(f"{what}: sink has {self.count} of {target} messages")
            time.sleep(0.1)


def make_message(size: int, i: int = 0) -> bytes:
    """Headers plus ``size`` bytes of body, CRLF lines, nothing to dot-stuff."""
    head = (f"From: <{SENDER_ADDR}>\r\nTo: <{RCPT_ADDR}>\r\nSubject: bench {i}\r\n"
            f"Message-ID: <bench-{i}-{time.time_ns()}@x.test>\r\n\r\n").encode()
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdef\r\n"
    body = (line * (size // len(line) + 1))[:size]
    return head + body.rstrip(b"\r\n") + b"\r\n"


class SmtpClient:
    """A blocking, pipelining SMTP client (MAIL+RCPT+DATA in one write), small enough to time
    exactly what is asked: end-of-data written -> final reply read."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rfile = self.sock.makefile("rb")
        self._expect(220, "greeting")
        self.sock.sendall(b"EHLO bench.localhost\r\n")
        self._expect(250, "EHLO")

    def _reply(self) -> tuple[int, bytes]:
        while True:
            line = self.rfile.readline(4096)
            if not line:
                raise BenchError("server closed the connection")
            if line[3:4] != b"-":
                return int(line[:3]), line.rstrip()

    def _expect(self, code: int, what: str) -> None:
        got, line = self._reply()
        if got != code:
            raise BenchError(f"{what}: expected {code}, got {line!r}")

    def send(self, message: bytes) -> float:
        """One transaction; returns seconds from end-of-data written to the 250 read."""
        self.sock.sendall(f"MAIL FROM:<{SENDER_ADDR}>\r\nRCPT TO:<{RCPT_ADDR}>\r\nDATA\r\n".encode())
        self._expect(250, "MAIL")
        self._expect(250, "RCPT")
        self._expect(354, "DATA")
        self.sock.sendall(message + b".\r\n")
        t = time.perf_counter()
        self._expect(250, "end of data")
        return time.perf_counter() - t

    def close(self) -> None:
        try:
            self.sock.sendall(b"QUIT\r\n")
            self._reply()
        except (OSError, BenchError):
            pass
        self.sock.close()


class Sampler(threading.Thread):
    """One paced extra connection timing accept latency while smtp-source loads the server.
    Bounded: at most ``limit`` messages, stops when told."""

    def __init__(self, port: int, size: int, limit: int, pause: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.port, self.size, self.limit, self.pause = port, size, limit, pause
        self.stop = threading.Event()
        self.latencies: list[float] = []
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            client = SmtpClient(self.port)
            try:
                while not self.stop.is_set() and len(self.latencies) < self.limit:
                    self.latencies.append(client.send(make_message(self.size, len(self.latencies))))
                    self.stop.wait(self.pause)
            finally:
                client.close()
        except Exception as e:
            self.error = e


def python_inject(port: int, messages: int, connections: int, size: int, deadline: Deadline) -> list[float]:
    """Fallback injector: K threads, each a reused connection; every transaction is timed."""
    lock = threading.Lock()
    next_i = [0]
    latencies: list[float] = []
    errors: list[Exception] = []

    def worker() -> None:
        try:
            client = SmtpClient(port)
            try:
                while deadline.left() > 0:
                    with lock:
                        i = next_i[0]
                        if i >= messages:
                            return
                        next_i[0] += 1
                    latencies.append(client.send(make_message(size, i)))
            finally:
                client.close()
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(deadline.left())
    if errors:
        raise BenchError(f"python injector: {errors[0]}")
    if len(latencies) < messages:
        raise BenchError(f"python injector sent {len(latencies)} of {messages} before the deadline")
    return latencies


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


# ---------------------------------------------------------------------------- one load run

def inject(port: int, args, sink, deadline: Deadline, what: str, sample: bool = True) -> dict:
    """Send args.messages to ``port`` and wait until the sink counted them all (plus the
    sampler's). Returns messages, seconds (first injection -> last arrival), latencies."""
    base = sink.count
    latencies: list[float] = []
    t0 = time.time()
    if tool("smtp-source"):
        cmd = [tool("smtp-source"), "-d", "-s", str(args.connections), "-m", str(args.messages),
               "-l", str(args.size), "-f", SENDER_ADDR, "-t", RCPT_ADDR, f"127.0.0.1:{port}"]
        sampler = Sampler(port, args.size, limit=args.messages) if sample else None
        src = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if sampler:
            sampler.start()
        try:
            out, _ = src.communicate(timeout=deadline.left())
        except subprocess.TimeoutExpired:
            raise BenchError(f"{what}: smtp-source still running at the global timeout") from None
        finally:
            if sampler:
                sampler.stop.set()
                sampler.join(60)
        if src.returncode != 0:
            raise BenchError(f"{what}: smtp-source exited {src.returncode}: {out.decode(errors='replace')[-500:]}")
        extra = 0
        if sampler:
            if sampler.error:
                raise BenchError(f"{what}: latency sampler failed: {sampler.error}")
            latencies, extra = sampler.latencies, len(sampler.latencies)
    else:
        latencies, extra = python_inject(port, args.messages, args.connections, args.size, deadline), 0
    total = args.messages + extra
    last = sink.wait_for(base + total, deadline, what)
    return {"messages": total, "seconds": last - t0, "latencies": latencies, "sampled": extra}


# ---------------------------------------------------------------------------- sender

def run_sender(args, sink, workdir: str, deadline: Deadline) -> dict:
    workdir = tempfile.mkdtemp(prefix="sender-", dir=workdir)     # a fresh spool for each run
    spool = os.path.join(workdir, "spool")
    config = os.path.join(workdir, "sender.toml")
    with open(config, "w") as f:
        f.write(f'[spool]\npath = "{spool}"\nfsync = "{args.fsync}"\n\n'
                f'[listen]\nsmtp = "127.0.0.1:0"\n\n'
                f'[delivery]\nconnection_limit = {args.delivery_connections or args.connections}\n\n'
                f'[daemon]\nprocesses = {args.processes}\n\n'
                f'[[route]]\nmatch = "*"\nrelay = "127.0.0.1:{sink.port}"\n')
    proc = spawn([sys.executable, "-m", "sender", "run", "--config", config], cwd=REPO, env=child_env(),
                 stdout=subprocess.PIPE, stderr=open(os.path.join(workdir, "sender.stderr"), "w"), text=True)
    try:
        line = read_line_until(proc, "listening on", deadline, "sender run")
        port = int(re.search(r":(\d+) ", line).group(1))
        cpu0 = proc_cpu_seconds(proc.pid)
        res = inject(port, args, sink, deadline, "sender")
        res["cpu"] = proc_cpu_seconds(proc.pid) - cpu0
        res["rss_mb"] = proc_peak_rss_mb(proc.pid)
    finally:
        stop_process(proc, wait=60)
    time.sleep(0.1)   # let the reader thread take the last lines
    stopped = [ln for ln in proc.lines if "stopped;" in ln]
    # One stop line per shard: add their counts up.
    totals: dict[str, int] = {}
    for ln in stopped:
        for part in ln.split("stopped;", 1)[1].split(","):
            what, n = part.strip().rsplit(" ", 1)
            totals[what] = totals.get(what, 0) + int(n)
    res["stop_line"] = ("sender: stopped; " + ", ".join(f"{what} {n}" for what, n in totals.items())
                        if stopped else f"(no stop line; exit status {proc.returncode})")
    res["shards"] = [int(m.group(1)) for ln in stopped if (m := re.search(r"accepted (\d+)", ln))]
    if proc.returncode != 0:
        raise BenchError(f"sender run exited {proc.returncode} on SIGTERM; see {workdir}/sender.stderr")
    return res


# ---------------------------------------------------------------------------- postfix

class PostfixInstance:
    """A private, loopback-only Postfix: its own config, queue and data directories under
    ``root``, smtpd on ``port``, everything relayed to the sink. Only this instance is ever
    started or stopped (``postfix -c DIR``, then its master PID)."""

    def __init__(self, root: str, sink_port: int, concurrency: int) -> None:
        self.root = Path(root)
        self.etc, self.queue, self.data = self.root / "etc", self.root / "queue", self.root / "data"
        self.port = free_port()
        self.master_pid: int | None = None
        # Postfix daemons run as the postfix user: every directory on the way must be searchable.
        os.chmod(self.root.parent, 0o755)
        self.root.mkdir(mode=0o755)
        for d in (self.etc, self.queue, self.data):
            d.mkdir()
        shutil.chown(self.data, "postfix", "postfix")
        self.maillog = self.root / "maillog"
        (self.etc / "main.cf").write_text("\n".join([
            "compatibility_level = 3.6",
            f"queue_directory = {self.queue}",
            f"data_directory = {self.data}",
            f"maillog_file = {self.maillog}",
            f"maillog_file_prefixes = {self.root}",
            "inet_interfaces = 127.0.0.1",
            "inet_protocols = ipv4",
            "myhostname = bench.localhost",
            "mydestination =",
            "mynetworks = 127.0.0.0/8",
            "local_recipient_maps =",
            "alias_maps =",
            "alias_database =",
            "smtpd_relay_restrictions = permit_mynetworks, reject",
            "smtpd_tls_security_level = none",
            "smtp_tls_security_level = none",
            f"relayhost = [127.0.0.1]:{sink_port}",
            f"default_transport = smtp:[127.0.0.1]:{sink_port}",
            f"smtp_destination_concurrency_limit = {concurrency}",
            f"default_destination_concurrency_limit = {concurrency}",
            "",
        ]))
        (self.etc / "master.cf").write_text(self._master_cf())

    def _master_cf(self) -> str:
        """The system master.cf with smtpd moved to our port, no chroot (the temp queue has no
        chroot files), and no other listeners or pipe transports."""
        src = next((p for p in ("/etc/postfix/master.cf", "/usr/share/postfix/master.cf.dist")
                    if os.path.exists(p)), None)
        if src is None:
            raise BenchError("postfix: no master.cf to start from")
        out, skip = [], False
        for line in open(src):
            if line.startswith("#") or not line.strip():
                continue
            if line[0].isspace():
                if not skip:
                    out.append(line)
                continue
            f = line.split()
            skip = len(f) < 8 or f[7] == "pipe" or (f[1] == "inet" and f[0] != "smtp")
            if skip:
                continue
            if f[1] == "inet":
                f[0] = f"127.0.0.1:{self.port}"
            f[4] = "n"
            out.append(" ".join(f) + "\n")
        return "".join(out)

    def _postfix(self, *verb: str, timeout: float = 60) -> None:
        r = subprocess.run([tool("postfix"), "-c", str(self.etc), *verb], capture_output=True, text=True,
                           timeout=timeout)
        if r.returncode != 0:
            raise BenchError(f"postfix -c {self.etc} {' '.join(verb)} failed ({r.returncode}): "
                             f"{(r.stdout + r.stderr).strip()} {self.log_tail()}")

    def log_tail(self) -> str:
        try:
            return "maillog: " + " | ".join(self.maillog.read_text().splitlines()[-5:])
        except OSError:
            return ""

    def start(self, deadline: Deadline) -> None:
        self._postfix("check")
        CLEANUP.add(self.stop)
        self._postfix("start")
        pidfile = self.queue / "pid" / "master.pid"
        while not pidfile.exists():
            deadline.check("postfix master.pid")
            time.sleep(0.05)
        self.master_pid = int(pidfile.read_text().strip())
        wait_listening(self.port, deadline, "postfix smtpd")

    def stop(self) -> None:
        if self.master_pid is None:
            return
        try:
            self._postfix("stop", timeout=30)
        except (BenchError, subprocess.TimeoutExpired) as e:
            print(f"postfix stop: {e}", file=sys.stderr)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for _ in range(100):
                if not pid_alive(self.master_pid):
                    self.master_pid = None
                    return
                time.sleep(0.05)
            try:
                os.kill(self.master_pid, sig)
            except ProcessLookupError:
                pass


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


_RUNS = itertools.count(1)


def run_postfix(args, sink, workdir: str, deadline: Deadline) -> dict:
    if os.geteuid() != 0:
        raise BenchError("postfix: a private instance needs root")
    pf = PostfixInstance(os.path.join(workdir, f"postfix-{next(_RUNS)}"), sink.port, args.connections)
    try:
        pf.start(deadline)
        res = inject(pf.port, args, sink, deadline, "postfix")
    finally:
        pf.stop()
    return res


# ---------------------------------------------------------------------------- aiosmtplib

def aiosmtplib_worker(port: int, messages: int, connections: int, size: int) -> None:
    """Child process: K reused aiosmtplib connections on uvloop, no queue. Prints JSON with
    the wall and CPU seconds of the sending loop only."""
    import asyncio
    import aiosmtplib
    import uvloop

    async def main() -> dict:
        clients = [aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=30)
                   for _ in range(connections)]
        for c in clients:
            await c.connect()
        message = make_message(size)
        left = [messages]

        async def work(c) -> None:
            while left[0] > 0:
                left[0] -= 1
                await c.sendmail(SENDER_ADDR, [RCPT_ADDR], message)

        cpu0, t0 = time.process_time(), time.time()
        await asyncio.gather(*(work(c) for c in clients))
        res = {"seconds": time.time() - t0, "cpu": time.process_time() - cpu0, "messages": messages}
        for c in clients:
            await c.quit()
        return res

    print(json.dumps(uvloop.run(main())), flush=True)


def run_aiosmtplib(args, sink, deadline: Deadline) -> dict:
    base = sink.count
    proc = spawn([sys.executable, __file__, "--aiosmtplib-worker", str(sink.port), "--messages", str(args.messages),
                  "--connections", str(args.connections), "--size", str(args.size)],
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        out, err = proc.communicate(timeout=deadline.left())
    except subprocess.TimeoutExpired:
        raise BenchError("aiosmtplib: still running at the global timeout") from None
    if proc.returncode != 0:
        raise BenchError(f"aiosmtplib worker exited {proc.returncode}: {err.strip()[-500:]}")
    res = json.loads(out.strip().splitlines()[-1])
    sink.wait_for(base + args.messages, deadline, "aiosmtplib")
    return res


# ---------------------------------------------------------------------------- report

def rate(res: dict) -> float:
    return res["messages"] / res["seconds"] if res["seconds"] > 0 else float("nan")


def report(args, cmdline: str, setup: str, results: dict, errors: dict) -> None:
    rows: list[tuple[str, str]] = []
    s = results.get("sender")
    if s:
        rows.append((f"sender end to end (fsync={args.fsync})",
                     f"{rate(s):>9,.0f} msgs/s   {s['messages']:,} msgs in {s['seconds']:.2f} s"))
        lat = s["latencies"]
        how = (f"{len(lat):,} paced samples on 1 extra connection beside smtp-source" if s["sampled"]
               else f"every transaction of the Python injector, {len(lat):,}")
        rows.append(("  accept latency p50 / p99",
                     f"{percentile(lat, 50) * 1e3:>9.2f} / {percentile(lat, 99) * 1e3:.2f} ms ({how})"))
        rows.append(("  daemon CPU per 10,000 msgs", f"{s['cpu'] / s['messages'] * 1e4:>9.2f} s"
                     f"   ({s['messages'] / s['cpu']:,.0f} msgs per CPU second)"))
        rows.append(("  daemon peak RSS (VmHWM)", f"{s['rss_mb']:>9.1f} MB"))
        rows.append(("  daemon on SIGTERM", "   " + s["stop_line"]))
        if len(s["shards"]) > 1:
            rows.append(("  accepted per shard", "   " + " / ".join(f"{n:,}" for n in s["shards"])))
    d = results.get("direct")
    if d:
        rows.append(("smtp-source -> smtp-sink direct", f"{rate(d):>9,.0f} msgs/s   (no queue: the ceiling)"))
    p = results.get("postfix")
    if p:
        rows.append(("postfix end to end", f"{rate(p):>9,.0f} msgs/s   {p['messages']:,} msgs in {p['seconds']:.2f} s"))
        if p["latencies"]:
            rows.append(("  accept latency p50 / p99", f"{percentile(p['latencies'], 50) * 1e3:>9.2f} / "
                         f"{percentile(p['latencies'], 99) * 1e3:.2f} ms ({len(p['latencies']):,} samples)"))
    a = results.get("aiosmtplib")
    if a:
        rows.append(("aiosmtplib+uvloop -> sink", f"{rate(a):>9,.0f} msgs/s   "
                     f"{a['messages'] / a['cpu']:,.0f} msgs per CPU second (no queue)"))
    for name, err in errors.items():
        rows.append((name, f"   FAILED: {err}"))
    ratios = []
    if s and p:
        ratios.append(("sender / postfix (end to end)", f"{rate(s) / rate(p):>9.2f}x"))
    if s and d:
        ratios.append(("sender / smtp-source direct", f"{rate(s) / rate(d):>9.2f}x"))
    if s and a:
        ratios.append(("msgs per CPU-s: sender / aiosmtplib",
                       f"{(s['messages'] / s['cpu']) / (a['messages'] / a['cpu']):>9.2f}x"))
    pairs = [(results.get("sender" if k == 1 else f"sender {k}"), results.get("postfix" if k == 1 else f"postfix {k}"))
             for k in range(1, args.pairs + 1)]
    pairs = [(rate(sp), rate(pp)) for sp, pp in pairs if sp and pp]
    if len(pairs) > 1:
        for k, (sr, pr) in enumerate(pairs, 1):
            rows.append((f"pair {k}: sender / postfix", f"{sr:>9,.0f} / {pr:,.0f} msgs/s = {sr / pr:.2f}x"))
        ordered = sorted(sr / pr for sr, pr in pairs)
        mid = len(ordered) // 2
        median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
        ratios.append((f"sender / postfix, median of {len(pairs)} pairs", f"{median:>9.2f}x"))
    width = max(len(r[0]) for r in rows + ratios) if rows else 0
    print()
    print(f"command: {cmdline}")
    print(f"setup:   {setup}")
    print()
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if ratios:
        print()
        for name, value in ratios:
            print(f"{name:<{width}}  {value}")


# ---------------------------------------------------------------------------- main

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=20000)
    p.add_argument("--connections", type=int, default=20, help="injection connections and delivery connection limit")
    p.add_argument("--size", type=int, default=2048, help="message body bytes (smtp-source -l)")
    p.add_argument("--fsync", choices=("always", "batch", "never"), default="batch")
    p.add_argument("--processes", type=int, default=2, help="sender's daemon.processes (engine processes)")
    p.add_argument("--delivery-connections", type=int, default=8,
                   help="sender's delivery connection_limit (fewer, busier connections pipeline more)")
    p.add_argument("--vs-postfix", action="store_true", help="also measure smtp-source direct, Postfix, aiosmtplib")
    p.add_argument("--pairs", type=int, default=1,
                   help="with --vs-postfix: run sender and Postfix this many times, alternating, and "
                        "report the median ratio (a shared machine's speed drifts between runs)")
    p.add_argument("--timeout", type=float, default=600.0, help="global limit in seconds for the whole run")
    p.add_argument("--python-only", action="store_true",
                   help="use sender's sink and the Python injector even if Postfix's tools are installed")
    p.add_argument("--aiosmtplib-worker", type=int, metavar="PORT", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.messages < 1 or a.connections < 1 or a.size < 1 or a.timeout <= 0 or a.pairs < 1:
        p.error("--messages, --connections, --size, --timeout and --pairs must be positive")
    if a.pairs > 1 and not a.vs_postfix:
        p.error("--pairs needs --vs-postfix")
    if a.python_only and a.vs_postfix:
        p.error("--python-only and --vs-postfix exclude each other")
    return a


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    global PYTHON_ONLY
    PYTHON_ONLY = args.python_only
    if args.aiosmtplib_worker:
        aiosmtplib_worker(args.aiosmtplib_worker, args.messages, args.connections, args.size)
        return 0
    cmdline = shlex.join([os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable,
                          os.path.relpath(__file__), *argv])
    # Installing is setup, bounded by apt-get's own timeouts; the global limit starts after it.
    if args.vs_postfix and not install_postfix():
        print("throughput: --vs-postfix needs Postfix's smtp-source, smtp-sink and postfix", file=sys.stderr)
        return 2
    if not args.vs_postfix and not args.python_only and not have_postfix_tools():
        install_postfix()          # best effort; the Python sink and injector stand in otherwise
    timed_out = False
    timer = arm_timeout(args.timeout)
    deadline = Deadline(args.timeout)
    results: dict = {}
    errors: dict = {}
    setup = ""
    try:
        workdir = tempfile.mkdtemp(prefix="sender-bench-")
        CLEANUP.add(lambda: shutil.rmtree(workdir, ignore_errors=True))
        sink = SmtpSink(deadline) if tool("smtp-sink") else SenderSink(deadline, workdir)
        injector = (f"smtp-source -d -s {args.connections} -m {args.messages} -l {args.size}"
                    if tool("smtp-source") else f"Python injector, {args.connections} connections")
        sink_name = f"{sink.name} ({postfix_version()})" if isinstance(sink, SmtpSink) else sink.name
        setup = (f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}; injector: {injector}; "
                 f"sink: {sink_name}; delivery connection_limit "
                 f"{args.delivery_connections or args.connections}; daemon.processes {args.processes}")
        print(f"throughput: {setup}", file=sys.stderr, flush=True)
        phases = [("sender", lambda: run_sender(args, sink, workdir, deadline))]
        if args.vs_postfix:
            phases += [
                ("direct", lambda: inject(sink.port, args, sink, deadline, "direct", sample=False)),
                ("postfix", lambda: run_postfix(args, sink, workdir, deadline)),
                ("aiosmtplib", lambda: run_aiosmtplib(args, sink, deadline)),
            ]
            for k in range(2, args.pairs + 1):
                phases += [(f"sender {k}", lambda: run_sender(args, sink, workdir, deadline)),
                           (f"postfix {k}", lambda: run_postfix(args, sink, workdir, deadline))]
        for name, phase in phases:
            print(f"throughput: {name} ...", file=sys.stderr, flush=True)
            try:
                results[name] = phase()
            except BenchError as e:
                errors[name] = str(e)
            except ImportError as e:
                errors[name] = f"{e} (pip install '.[bench]')"
            except Exception as e:   # report it with the other figures, after cleanup
                errors[name] = f"{type(e).__name__}: {e}"
    except GlobalTimeout:
        timed_out = True
    finally:
        disarm_timeout(timer)
        CLEANUP.run()
    if timed_out:
        print(f"throughput: global timeout of {args.timeout:g} s reached; stopped everything it started",
              file=sys.stderr)
        report(args, cmdline, setup, results, errors)
        return 3
    report(args, cmdline, setup, results, errors)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

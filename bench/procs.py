"""Process hygiene shared by the benchmarks: everything started is stopped by PID, every wait
is bounded by one global deadline, and CPU and memory are read from /proc."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Which benchmark speaks in messages: the script's name.
NAME = Path(sys.argv[0]).stem


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BenchError(Exception):
    """A phase could not complete; the message says which and why."""


# ---------------------------------------------------------------------------- process hygiene

class Cleanup:
    """Everything this run started, undone by PID in reverse order; safe to call twice and
    from the timeout thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._actions: list = []

    def add(self, action) -> None:
        with self._lock:
            self._actions.append(action)

    def run(self) -> None:
        with self._lock:
            actions, self._actions = self._actions[::-1], []
        for action in actions:
            try:
                action()
            except Exception as e:  # keep undoing the rest
                print(f"cleanup: {e}", file=sys.stderr)


CLEANUP = Cleanup()


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, wait: float = 10.0) -> None:
    """Signal one child by PID, then SIGKILL it if it does not exit in time."""
    if proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, sig)
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        print(f"{NAME}: PID {proc.pid} ({shlex.join(map(str, proc.args[1:4]))}) still running "
              f"{wait:g} s after SIGTERM; sending SIGKILL", file=sys.stderr)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
    except ProcessLookupError:
        pass


def spawn(cmd: list[str], **kw) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, **kw)
    CLEANUP.add(lambda: stop_process(proc))
    return proc


class Deadline:
    """The global time limit: every wait asks it how long is left."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def check(self, what: str) -> None:
        if self.left() <= 0:
            raise BenchError(f"global timeout while waiting for {what}")


class GlobalTimeout(BaseException):
    """Raised in the main thread by SIGALRM; a BaseException so no phase swallows it."""


def arm_timeout(seconds: float) -> threading.Timer:
    """Past the limit, SIGALRM unwinds the main thread through its finally blocks. A backstop
    thread a minute later stops what was started and exits 3 even if the main thread hangs."""
    def on_alarm(signum, frame):
        raise GlobalTimeout()

    def backstop() -> None:
        print(f"{NAME}: still not stopped after the global timeout; stopping everything started",
              file=sys.stderr, flush=True)
        CLEANUP.run()
        os._exit(3)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    t = threading.Timer(seconds + 60, backstop)
    t.daemon = True
    t.start()
    return t


def disarm_timeout(backstop: threading.Timer) -> None:
    signal.setitimer(signal.ITIMER_REAL, 0)
    backstop.cancel()


def child_env() -> dict:
    """Children import ``sender`` from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


def read_line_until(proc: subprocess.Popen, marker: str, deadline: Deadline, what: str) -> str:
    """Read the child's stdout until a line containing ``marker``; a reader thread keeps the
    wait bounded by the deadline and drains later output into ``proc.lines``."""
    found: list[str] = []
    seen = threading.Event()

    def drain() -> None:
        for line in proc.stdout:
            proc.lines.append(line.rstrip("\n"))
            if not found and marker in line:
                found.append(line.strip())
                seen.set()
        seen.set()

    proc.lines = []
    proc.reader = threading.Thread(target=drain, daemon=True)
    proc.reader.start()
    if not seen.wait(min(30.0, deadline.left())) or not found:
        raise BenchError(f"{what} did not print {marker!r} (exit status {proc.poll()}); output: {proc.lines[-5:]}")
    return found[0]


# ---------------------------------------------------------------------------- /proc

def proc_tree(pid: int) -> list[int]:
    """``pid`` and its direct children (the shard processes with ``--processes`` > 1)."""
    pids = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        pids.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return pids


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its direct children."""
    total = 0
    for p in proc_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def proc_peak_rss_mb(pid: int) -> float:
    """Sum of VmHWM over ``pid`` and its direct children."""
    total = 0.0
    for p in proc_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1]) / 1024
        except OSError:
            continue
    return total

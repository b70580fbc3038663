"""Small helpers shared by the loopback, CLI and crash tests.

``RawSMTP`` speaks SMTP as raw bytes, so tests control exactly what goes on the wire (dot
stuffing, bare LFs, pipelining) and see each reply line as the server wrote it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import trio

from sender.model import JournalRecord

ROOT = Path(__file__).resolve().parent.parent

_REPLY_LINE = re.compile(rb"^(\d{3})([ -])(.*)$")
_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3} ")


class RawSMTP:
    """A line-level SMTP client over any trio stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buf = bytearray()

    @classmethod
    async def connect(cls, host: str, port: int) -> "RawSMTP":
        return cls(await trio.open_tcp_stream(host, port))

    async def _line(self) -> bytes:
        while True:
            nl = self._buf.find(b"\r\n")
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[: nl + 2]
                return line
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError(f"connection closed; unparsed: {bytes(self._buf)!r}")
            self._buf += data

    async def reply(self) -> str:
        """The next reply, its lines joined by "\\n" ("250-a\\n250 b")."""
        lines = []
        while True:
            line = await self._line()
            m = _REPLY_LINE.match(line)
            assert m, f"malformed reply line {line!r}"
            lines.append(line.decode())
            if m.group(2) == b" ":
                return "\n".join(lines)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def cmd(self, line: str) -> str:
        await self.send(line.encode() + b"\r\n")
        return await self.reply()

    async def hello(self) -> str:
        greeting = await self.reply()
        assert greeting.startswith("220 "), greeting
        ehlo = await self.cmd("EHLO client.test")
        assert ehlo.startswith("250"), ehlo
        return ehlo

    async def aclose(self) -> None:
        await self.stream.aclose()


def has_enhanced_code(reply: str) -> bool:
    """Every line carries an RFC 3463 code whose class matches the reply's first digit."""
    for line in reply.split("\n"):
        code, text = line[:3], line[4:]
        if not _ENHANCED.match(text) or text[0] != code[0]:
            return False
    return True


def journal_records(spool: str | os.PathLike) -> list:
    """Every record in every segment, oldest first, read straight from the bytes on disk
    (stops at the first bad frame of a segment). Independent of the Journal class, so a test
    can see what was written, not what replay chooses to keep."""
    out = []
    header = struct.Struct("<II")
    for seg in sorted(Path(spool).glob("*.seg")):
        data = seg.read_bytes()
        off = 0
        while off + header.size <= len(data):
            length, _crc = header.unpack_from(data, off)
            end = off + header.size + length
            if length == 0 or end > len(data):
                break
            try:
                out.append(msgspec.msgpack.decode(data[off + header.size: end], type=JournalRecord))
            except msgspec.DecodeError:
                break
            off = end
    return out


# ----------------------------------------------------------------------- subprocesses


def free_port() -> int:
    """A loopback port nobody listens on right now (connects are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def spawn(args: list[str], out_path: Path) -> subprocess.Popen:
    """Start ``python -m sender ARGS`` with stdout and stderr in files (never a pipe that
    could fill up and block the child)."""
    out = open(out_path, "wb")
    err = open(out_path.with_suffix(".err"), "wb")
    try:
        return subprocess.Popen([sys.executable, "-m", "sender", *args], stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, env=subprocess_env(), cwd=ROOT)
    finally:
        out.close()
        err.close()


def wait_for_line(proc: subprocess.Popen, out_path: Path, pattern: str, timeout: float = 15.0) -> re.Match:
    """Poll the child's stdout file for a line matching ``pattern``."""
    rx = re.compile(pattern, re.M)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = rx.search(out_path.read_text(errors="replace"))
        if m:
            return m
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    err = out_path.with_suffix(".err")
    raise AssertionError(
        f"no line matching {pattern!r} (exit status {proc.poll()}); stdout:\n{out_path.read_text()}\n"
        f"stderr:\n{err.read_text() if err.exists() else ''}")


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
    """Signal the child by its PID and reap it; SIGKILL if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


# ----------------------------------------------------------------------- engines on in-memory sinks


class Sinks:
    """In-memory sinks by host name, for an Engine's ``open_stream``; a host with no sink
    refuses connections. ``connects`` keeps (virtual time, host) of every attempt."""

    def __init__(self, **by_host) -> None:
        self.by_host = by_host
        self.connects: list[tuple[float, str]] = []

    async def open_stream(self, host, port, source=""):
        self.connects.append((trio.current_time(), host))
        sink = self.by_host.get(host)
        if sink is None:
            raise OSError(111, "Connection refused")
        return await sink.open_stream(host, port, source)


async def start_engine(nursery, config, sinks: Sinks):
    """Run every sink in memory, then an Engine delivering to them; returns the engine."""
    from sender.engine import Engine

    for sink in sinks.by_host.values():
        await nursery.start(sink.run_in_memory)
    return await nursery.start(Engine(config, open_stream=sinks.open_stream).run)


async def until(cond, step: float = 0.05) -> None:
    """Sleep in steps until ``cond()`` holds (on the autojump clock the steps cost nothing)."""
    while not cond():
        await trio.sleep(step)


# ----------------------------------------------------------------------- webhook receiver


class HookReceiver:
    """A loopback HTTP endpoint for webhooks, on a real socket: keeps (headers, body) of every
    POST and answers each with the next status of ``statuses``, then 200.

    ``async with trio.open_nursery() as n: url = await n.start(receiver.run)``.
    """

    def __init__(self, statuses: list[int] | tuple[int, ...] = ()) -> None:
        self.statuses = list(statuses)
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.answered: list[int] = []

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        task_status.started(f"http://127.0.0.1:{port}/hooks")
        await trio.serve_listeners(self._serve, listeners)

    async def _serve(self, stream) -> None:
        import h11

        conn = h11.Connection(h11.SERVER)
        headers: dict[str, str] = {}
        body = b""
        async with stream:
            with trio.move_on_after(10):
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(65536)
                        conn.receive_data(data)
                        if not data:
                            return
                    elif isinstance(event, h11.Request):
                        headers = {k.decode().lower(): v.decode() for k, v in event.headers}
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                status = self.statuses.pop(0) if self.statuses else 200
                self.received.append((headers, body))
                self.answered.append(status)
                await stream.send_all(conn.send(h11.Response(status_code=status, headers=[
                    ("content-length", "2"), ("connection", "close")])) + conn.send(h11.Data(data=b"ok"))
                    + conn.send(h11.EndOfMessage()))

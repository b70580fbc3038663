"""The root nursery of ``sender run``: engine, SMTP listener, signal handling; and the
supervisor that runs several such processes when ``daemon.processes`` > 1.

On SIGTERM or SIGINT: stop accepting (close the listener), let transactions in flight finish
within the grace period, flush the journal, return (the CLI then exits 0). On SIGHUP: read
the config file again and apply its traffic shaping rules without a restart (a config with
an error is refused whole, with the error logged, and the running rules stay).

Sharding: one Python process saturates one core long before the network does, so a daemon
can run N independent engine processes. Each owns its journal (``spool/shard-I``) and 1/N of
every connection limit. The supervisor binds the SMTP port and hands the listening socket to
every shard, with a :class:`LoadBoard`: a few bytes of shared memory holding each shard's open
sessions. A shard accepts only while no sibling has fewer (applications keep long-lived
connection pools, and SO_REUSEPORT's hashing would leave one shard with most of them), and the
supervisor says it is listening only once every shard is. The HTTP API's port is shared the
same way (by the kernel: requests are short), and each shard also listens on a private loopback
port, written on the board, where its siblings pass it the requests it owns
(:mod:`sender.inject.peers`). Nothing else is shared, so a shard's crash affects only its own
in-flight messages. Children die with the supervisor
(PR_SET_PDEATHSIG), so killing the supervisor is killing the daemon.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import mmap
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import msgspec
import trio

from .config import Config, ConfigError, parse_hostport
from .engine import Engine
from .journal import Journal
from .inject.http import bind_http, serve_http
from .inject.peers import Peers
from .inject.smtpd import serve_smtp
from .smtp.sockets import FastListener, open_listener

__all__ = ["SHARD_TOKEN", "LoadBoard", "Shard", "check_spool_layout", "run_daemon", "run_supervisor", "set_scheduling", "shard_config",
           "spool_dirs"]

log = logging.getLogger("sender.daemon")

SHARD_TOKEN = "SENDER_SHARD_TOKEN"      # environment of a shard process: see Shard.token


class LoadBoard:
    """Open SMTP sessions per shard, in shared memory (a memfd the shards inherit); -1 marks
    a shard that is not listening yet. Bound to one shard (``index``), it is that shard's
    :class:`~sender.smtp.sockets.Balance`. It also holds each shard's private HTTP port and
    its HTTP requests in progress.
    """

    def __init__(self, fd: int, count: int, index: int | None = None) -> None:
        self.fd, self.count, self.index = fd, count, index
        self._map = mmap.mmap(fd, 12 * count)
        self._cells = memoryview(self._map).cast("i")
        self._slots = self._cells[:count]
        self._ports = self._cells[count:2 * count]
        self.requests = self._cells[2 * count:]     # HTTP requests in progress, per shard

    @classmethod
    def create(cls, count: int) -> "LoadBoard":
        fd = os.memfd_create("sender-load-board")
        os.ftruncate(fd, 12 * count)
        board = cls(fd, count)
        for i in range(count):
            board._slots[i] = -1
        return board

    def all_listening(self) -> bool:
        return min(self._slots) >= 0

    def listening(self) -> None:
        self._slots[self.index] = 0

    def admit(self) -> bool:
        mine = self._slots[self.index]
        return all(n < 0 or n >= mine for n in self._slots)

    def opened(self) -> None:
        self._slots[self.index] += 1

    def closed(self) -> None:
        self._slots[self.index] -= 1

    def set_peer_port(self, port: int) -> None:
        self._ports[self.index] = port

    def peer_port(self, index: int) -> int:
        return self._ports[index]

    def close(self) -> None:
        self._slots.release()
        self._ports.release()
        self.requests.release()
        self._cells.release()
        self._map.close()
        os.close(self.fd)


class Shard(NamedTuple):
    """What a shard process gets from its supervisor."""

    board: LoadBoard                    # bound to this shard
    smtp: socket.socket | None          # the listening sockets it shares with its siblings
    http: socket.socket | None
    token: str                          # proves a request passed on by a sibling


async def run_daemon(config: Config, *, repair: bool = False, grace: float = 30.0,
                     shard: Shard | None = None,
                     reload: Callable[[], Config] | None = None,
                     task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run until SIGTERM/SIGINT (or cancellation).

    Args:
      shard: set in a shard process of a sharded daemon.
      reload: reads the config again, on SIGHUP.
      task_status: started with the engine once the listener is bound.
    """
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        engine = Engine(config, repair=repair, id_suffix=None if shard is None else shard.board.index)
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            # The replayed queue can be millions of long-lived objects: keep them out of the
            # collector's scans, and collect the young generation less often under load.
            gc.freeze()
            gc.set_threshold(20_000, 50, 100)
            set_scheduling(config.daemon.scheduling)
            listener_scope = trio.CancelScope()

            async def listener(task_status=trio.TASK_STATUS_IGNORED) -> None:
                with listener_scope:
                    shared = None if shard is None else FastListener(shard.smtp, balance=shard.board)
                    await serve_smtp(engine, config.listen.smtp, listener=shared, task_status=task_status)

            http_scope = trio.CancelScope()

            async def http_listener(task_status=trio.TASK_STATUS_IGNORED) -> None:
                with http_scope:
                    if shard is None:
                        await serve_http(engine, config.listen.http, task_status=task_status)
                        return
                    private = bind_http("127.0.0.1:0")
                    board = shard.board
                    board.set_peer_port(private.getsockname()[1])
                    peers = Peers(board.index, board.count, board.peer_port, shard.token, board.requests)
                    await serve_http(engine, sockets=[shard.http, private], peers=peers, task_status=task_status)

            if config.listen.http and shard is not None:
                await nursery.start(http_listener)      # its private port is on the board first
            if shard is not None:
                shard.board.listening()
            if config.listen.smtp:
                host, port = await nursery.start(listener)
                if shard is None:
                    _say(f"sender: listening on {host}:{port} (SMTP)")
            if config.listen.http and shard is None:
                host, port = await nursery.start(http_listener)
                _say(f"sender: listening on {host}:{port} (HTTP)")
            task_status.started(engine)
            stop = trio.Event()

            async def on_signals() -> None:
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        _reload_rules(engine, reload)
                        continue
                    log.info("received %s: shutting down", signal.Signals(signum).name)
                    break
                stop.set()

            async def on_drained() -> None:
                await engine.drained.wait()
                _say("sender: drained; shutting down")
                stop.set()

            async with trio.open_nursery() as watchers:
                watchers.start_soon(on_signals)
                watchers.start_soon(on_drained)
                await stop.wait()
                watchers.cancel_scope.cancel()
            listener_scope.cancel()
            http_scope.cancel()
            await engine.shutdown(grace)
            nursery.cancel_scope.cancel()
    st = engine.statistics()
    _say(f"sender: stopped; accepted {st.accepted}, delivered {st.delivered}, deferred {st.deferred}, "
          f"bounced {st.bounced}, expired {st.expired}, still queued {st.live_messages}")


def _reload_rules(engine: Engine, reload: Callable[[], Config] | None) -> None:
    if reload is None:
        log.warning("received SIGHUP: no config file to read again")
        return
    try:
        config = reload()
    except ConfigError as e:
        log.error("received SIGHUP: config not reloaded, the running rules stay: %s", e)
        return
    engine.replace_rules(config)
    _say("sender: shaping rules reloaded")


def _say(line: str) -> None:
    """One status line in one write: shards share stdout, and with unbuffered output print()
    writes the text and the newline separately, so two shards' lines could interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def set_scheduling(policy: str) -> None:
    """Apply ``daemon.scheduling`` to the calling thread (the event loop's); the fsync thread
    keeps the normal policy, so its wake-ups stay prompt."""
    if policy != "batch":
        return
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError) as e:   # not Linux, or not allowed
        log.warning("daemon.scheduling = \"batch\" not applied: %s", e)


def shard_config(config: Config, index: int, count: int) -> Config:
    """The config of shard ``index`` of ``count``: its own spool (and event folder) and its
    share of the spool limit. (Each shard takes 1/count of every rate and connection limit: see shaping.Rules.)"""
    spool = msgspec.structs.replace(config.spool, path=str(Path(config.spool.path) / f"shard-{index}"),
                                    max_bytes=max(1, config.spool.max_bytes // count))
    events = config.events
    if events.path:                     # (by default they are in the shard's spool already)
        events = msgspec.structs.replace(events, path=str(Path(events.path) / f"shard-{index}"))
    return msgspec.structs.replace(config, spool=spool, events=events)


def spool_dirs(path: str | os.PathLike) -> list[Path]:
    """Journal directories of a spool: its shard directories, or the spool itself."""
    shards = sorted(Path(path).glob("shard-*"), key=lambda p: int(p.name.split("-")[1]))
    return shards or [Path(path)]


def check_spool_layout(config: Config) -> None:
    """Refuse a process count that would leave queued mail in a journal nobody reads.

    Raises:
      ConfigError: naming ``daemon.processes`` and the journal that still holds mail.
    """
    root = Path(config.spool.path)
    n = config.daemon.processes
    used = {root} if n == 1 else {root / f"shard-{i}" for i in range(n)}
    for d in [root, *root.glob("shard-*")]:
        if d in used or not d.is_dir():
            continue
        queued = len(Journal(d).replay(read_only=True))
        if queued:
            raise ConfigError(f"daemon.processes: {d} still holds {queued} queued messages that "
                              f"processes = {n} would not read; run with the process count that "
                              f"wrote it until it is empty")


def _die_with_parent() -> None:
    """In a child: receive SIGKILL when the supervisor dies, whatever killed it."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_supervisor(config_path: str, config: Config, *, repair: bool, grace: float) -> int:
    """Start ``daemon.processes`` shard processes, relay SIGTERM/SIGINT/SIGHUP, wait for all.

    Returns 0 when every shard stopped cleanly, else the first non-zero exit status.
    """
    n = config.daemon.processes
    listener = open_listener(*parse_hostport(config.listen.smtp, "listen.smtp")) if config.listen.smtp else None
    try:
        http = bind_http(config.listen.http) if config.listen.http else None
    except BaseException:
        if listener is not None:
            listener.socket.close()
        raise
    board = LoadBoard.create(n)
    fds = (board.fd, listener.socket.fileno() if listener else -1, http.fileno() if http else -1)
    cmd = [sys.executable, "-m", "sender", "run", "--config", config_path, "--grace", str(grace),
           "--inherit", ",".join(map(str, fds))]
    env = {**os.environ, SHARD_TOKEN: secrets.token_hex(16)}
    if repair:
        cmd.append("--repair")
    children: list[subprocess.Popen] = []
    stopping = False

    def forward(signum, _frame) -> None:
        for c in children:
            if c.poll() is None:
                c.send_signal(signum)

    def relay(signum, _frame) -> None:
        nonlocal stopping
        stopping = True
        forward(signum, _frame)

    old = {sig: signal.signal(sig, relay) for sig in (signal.SIGTERM, signal.SIGINT)}
    old[signal.SIGHUP] = signal.signal(signal.SIGHUP, forward)
    try:
        for i in range(n):
            children.append(subprocess.Popen(cmd + ["--shard", f"{i}/{n}"], pass_fds=[fd for fd in fds if fd >= 0],
                                             env=env, preexec_fn=_die_with_parent))
        while not board.all_listening() and all(c.poll() is None for c in children):
            time.sleep(0.01)
        if board.all_listening():
            for sock, what in ((listener.socket if listener else None, "SMTP"), (http, "HTTP")):
                if sock is not None:
                    host, port = sock.getsockname()[:2]
                    _say(f"sender: listening on {host}:{port} ({what}, {n} processes)")
        status = 0
        remaining = list(children)
        while remaining:
            try:
                pid, code = os.wait()
            except ChildProcessError:   # reaped already (by poll() in relay)
                pid, code = -1, 0
            for c in remaining:
                if c.pid == pid:
                    c.returncode = os.waitstatus_to_exitcode(code)
            for c in [c for c in remaining if c.returncode is not None]:
                remaining.remove(c)
                if c.returncode != 0 and not status:
                    status = c.returncode if c.returncode > 0 else 1
                    if not stopping:
                        log.error("shard process %d exited with %s: stopping the others", c.pid, c.returncode)
                        relay(signal.SIGTERM, None)
        return status
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for c in children:
            if c.poll() is None:
                c.kill()
        if listener is not None:
            listener.socket.close()
        if http is not None:
            http.close()
        board.close()

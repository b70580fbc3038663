"""Lean TCP streams and listeners on trio's low-level I/O, for the SMTP hot path.

trio's ``SocketStream`` pays for generality on every call (conflict detection, context
managers, a wrapper socket class). SMTP sessions do one small send and one small receive per
command group, so that overhead was most of the CPU per message. These classes try the
syscall first and only wait on the event loop when the kernel says it would block; they are
full ``trio.abc`` streams, so ``trio.SSLStream`` can still wrap them for STARTTLS.

Waiting goes through :class:`EdgePoller` rather than ``trio.lowlevel.wait_readable``: trio
re-arms a one-shot epoll registration (one ``epoll_ctl`` plus bookkeeping) on every wait, and a
request/reply protocol waits once per command. The poller registers each socket once,
edge-triggered, in an epoll set of its own that trio watches as a single descriptor.

Errors follow trio's contract: a broken connection raises ``trio.BrokenResourceError``, use
after close raises ``trio.ClosedResourceError``; connect failures raise ``OSError``.
"""

from __future__ import annotations

import errno
import os
import select
import socket
from typing import Protocol

import outcome
import trio
from trio.lowlevel import (Abort, RunVar, cancel_shielded_checkpoint, checkpoint, checkpoint_if_cancelled,
                           current_task, reschedule, spawn_system_task, wait_readable,
                           wait_task_rescheduled, wait_writable)

__all__ = ["Balance", "EdgePoller", "FastStream", "FastListener", "connect_tcp", "open_listener"]

_RECV = 65536
_IN = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_OUT = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
_POLLER: RunVar["EdgePoller"] = RunVar("sender_edge_poller")


class EdgePoller:
    """Readiness of every :class:`FastStream` of one trio run, from one edge-triggered epoll set.

    A system task waits (through trio) for the set's own descriptor, then wakes the task
    waiting on each socket that became ready; readiness that arrives while nobody waits is
    remembered, so an edge is never lost. Wake-ups may be spurious: callers retry the syscall
    and wait again on EAGAIN.
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._readers: dict[int, trio.lowlevel.Task] = {}
        self._writers: dict[int, trio.lowlevel.Task] = {}
        self.readable: set[int] = set()     # became readable while nobody waited
        self.writable: set[int] = set()

    @staticmethod
    def current() -> "EdgePoller":
        """The poller of the running trio run (started on first use)."""
        try:
            return _POLLER.get()
        except LookupError:
            poller = EdgePoller()
            _POLLER.set(poller)
            spawn_system_task(poller._run, name="sender.edge_poller")
            return poller

    def register(self, fd: int) -> None:
        # Assume ready: the first wait then costs at most one EAGAIN, and an fd number reused
        # from a closed socket starts clean.
        self.readable.add(fd)
        self.writable.add(fd)
        self._epoll.register(fd, _IN | _OUT | select.EPOLLET)

    def forget(self, fd: int) -> None:
        """Before closing ``fd``: unregister it and fail its waiters with ClosedResourceError."""
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass
        self.readable.discard(fd)
        self.writable.discard(fd)
        for waiters in (self._readers, self._writers):
            task = waiters.pop(fd, None)
            if task is not None:
                reschedule(task, outcome.Error(trio.ClosedResourceError("socket was closed")))

    async def wait_readable(self, fd: int) -> None:
        await self._wait(fd, self._readers)

    async def wait_writable(self, fd: int) -> None:
        await self._wait(fd, self._writers)

    @staticmethod
    async def _wait(fd: int, waiters: dict[int, trio.lowlevel.Task]) -> None:
        if fd in waiters:
            raise trio.BusyResourceError("another task is already waiting on this socket")
        waiters[fd] = current_task()

        def abort(_):
            del waiters[fd]
            return Abort.SUCCEEDED

        await wait_task_rescheduled(abort)

    async def _run(self) -> None:
        epoll, readers, writers = self._epoll, self._readers, self._writers
        try:
            while True:
                await wait_readable(epoll.fileno())
                for fd, flags in epoll.poll(0):
                    if flags & _IN:
                        task = readers.pop(fd, None)
                        if task is None:
                            self.readable.add(fd)
                        else:
                            reschedule(task)
                    if flags & _OUT:
                        task = writers.pop(fd, None)
                        if task is None:
                            self.writable.add(fd)
                        else:
                            reschedule(task)
        finally:
            epoll.close()


def _close(sock: socket.socket) -> None:
    """Wake any task waiting on ``sock`` (it gets ClosedResourceError), then close it."""
    trio.lowlevel.notify_closing(sock)
    sock.close()


class FastStream(trio.abc.HalfCloseableStream):
    """A non-blocking TCP socket as a trio stream. One task sends, one task receives."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.socket = sock
        self._fd = sock.fileno()
        self._poller: EdgePoller | None = None     # bound at the first wait, inside trio
        self._closed = False

    def _bind(self) -> EdgePoller:
        self._poller = poller = EdgePoller.current()
        poller.register(self._fd)
        return poller

    def getpeername(self):
        return self.socket.getpeername()

    async def send_all(self, data) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")
        sock = self.socket
        view = memoryview(data)
        total = len(view)
        sent = 0
        try:
            while sent < total:
                try:
                    sent += sock.send(view[sent:])
                except BlockingIOError:
                    poller = self._poller or self._bind()
                    if self._fd in poller.writable:
                        poller.writable.discard(self._fd)
                    else:
                        await poller.wait_writable(self._fd)
        except OSError as e:
            if self._closed:
                raise trio.ClosedResourceError("stream is closed") from None
            raise trio.BrokenResourceError(f"send failed: {e}") from e

    async def wait_send_all_might_not_block(self) -> None:
        poller = self._poller or self._bind()
        if self._fd in poller.writable:
            await checkpoint()
        else:
            await poller.wait_writable(self._fd)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")
        sock, fd = self.socket, self._fd
        poller = self._poller or self._bind()
        n = max_bytes or _RECV
        try:
            # Request/response traffic: unless the poller saw data arrive, the answer is
            # rarely there yet, so wait first instead of paying for a failing recv().
            while True:
                if fd in poller.readable:
                    poller.readable.discard(fd)
                    await checkpoint_if_cancelled()
                else:
                    await poller.wait_readable(fd)
                try:
                    data = sock.recv(n)
                except BlockingIOError:
                    continue
                if len(data) == n:
                    # Maybe more is queued, and no new edge will say so.
                    poller.readable.add(fd)
                    await cancel_shielded_checkpoint()
                return data
        except OSError as e:
            if self._closed:
                raise trio.ClosedResourceError("stream is closed") from None
            raise trio.BrokenResourceError(f"receive failed: {e}") from e

    async def send_eof(self) -> None:
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        await checkpoint()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            if self._poller is not None:
                self._poller.forget(self._fd)
            _close(self.socket)
        await checkpoint()


async def connect_tcp(host: str, port: int, *, source: str = "") -> FastStream:
    """Connect to ``host:port`` (a name is resolved in a thread), bound to ``source`` if given.

    Tries each address of the host in turn. Raises OSError when none accepts.
    """
    infos = await trio.to_thread.run_sync(
        socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM, 0, 0, abandon_on_cancel=True)
    last: OSError | None = None
    for family, type_, proto, _, addr in infos:
        sock = socket.socket(family, type_, proto)
        try:
            sock.setblocking(False)
            if source:
                sock.bind((source, 0))
            err = sock.connect_ex(addr)
            if err in (errno.EINPROGRESS, errno.EWOULDBLOCK):
                await wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
            return FastStream(sock)
        except BaseException as e:
            sock.close()
            if not isinstance(e, OSError):
                raise
            last = e
    raise last or OSError(errno.EHOSTUNREACH, f"no address for {host}")


class Balance(Protocol):
    """Spreads connections over processes that accept from one shared listening socket."""

    def admit(self) -> bool:
        """Whether this process should take the next connection now."""

    def opened(self) -> None:
        """This process accepted a connection."""

    def closed(self) -> None:
        """A connection this process accepted has ended."""


class FastListener(trio.abc.Listener[FastStream]):
    """A listening TCP socket whose ``accept`` returns :class:`FastStream` objects.

    With a ``balance``, a process that should leave a pending connection to a sibling waits
    up to ``DEFER_LIMIT`` seconds for the sibling to take it, then takes it itself.
    """

    DEFER_STEP = 0.002
    DEFER_LIMIT = 0.1

    def __init__(self, sock: socket.socket, balance: Balance | None = None) -> None:
        sock.setblocking(False)
        self.socket = sock
        self.balance = balance
        self._closed = False

    async def accept(self) -> FastStream:
        deferred = 0.0
        while True:
            if self._closed:
                raise trio.ClosedResourceError("listener is closed")
            if self.balance is not None and deferred < self.DEFER_LIMIT and not self.balance.admit():
                deferred += self.DEFER_STEP
                await trio.sleep(self.DEFER_STEP)
                continue
            try:
                conn, _ = self.socket.accept()
            except BlockingIOError:
                deferred = 0.0
                await wait_readable(self.socket)
                continue
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    await trio.sleep(0.1)  # out of descriptors: back off instead of spinning
                    continue
                if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            if self.balance is not None:
                self.balance.opened()
            await checkpoint()
            return FastStream(conn)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            _close(self.socket)
        await checkpoint()


def open_listener(host: str, port: int, *, backlog: int = 1024) -> FastListener:
    """Bind and listen on ``host:port`` (port 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return FastListener(sock)
